"""Checkpoint validation on the driver: weights that do not parse or do not fit the model the checkpoint's
own config builds, and a ``train_state.pt`` that is not plain tensors, are refused with one line naming
the file; ``mmray score`` does so with exit 2 before Ray starts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmray import checkpoint
from mmray.checkpoint import TRAIN_STATE_FILE, WEIGHTS_FILE, CheckpointError
from tests.helpers import run_cli
from tests.score.conftest import TASK, make_checkpoint, write_input


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), [TASK])


def corrupted(clean: Path, tmp_path: Path, damage) -> Path:
    """A copy of ``clean`` whose weights ``damage(state) -> state | bytes`` rewrote."""
    copy = Path(shutil.copytree(clean, tmp_path / "copy"))
    damaged = damage(load_file(str(copy / WEIGHTS_FILE)))
    if isinstance(damaged, bytes):
        (copy / WEIGHTS_FILE).write_bytes(damaged)
    else:
        save_file(damaged, str(copy / WEIGHTS_FILE))
    return copy


def first_key(state: dict) -> str:
    return sorted(state)[0]


def reshaped(state: dict) -> dict:
    name = first_key(state)
    return {**state, name: torch.zeros(*state[name].shape, 2)}


def dropped(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != first_key(state)}


def renamed(state: dict) -> dict:
    return {**dropped(state), "head.extra.weight": state[first_key(state)]}


class Payload:
    """What a hostile ``train_state.pt`` holds: an object whose unpickling runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_clean_checkpoint_passes(clean):
    checkpoint.check_weights(clean)
    checkpoint.check_train_state(clean)  # none: a checkpoint exported for scoring


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: os.urandom(4096), "not a readable safetensors file"),
        (lambda s: b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage", "not a readable safetensors file"),
        (reshaped, "has shape"),
        (dropped, "does not match the model its mmray.json builds: missing 1 tensors"),
        (renamed, "1 unexpected tensors (head.extra.weight)"),
    ],
    ids=["random", "torn-header", "shape", "missing", "unexpected"],
)
def test_weights_that_do_not_fit_the_checkpoints_model_are_refused_in_one_line(clean, tmp_path, damage, message):
    copy = corrupted(clean, tmp_path, damage)
    with pytest.raises(CheckpointError) as e:
        checkpoint.check_weights(copy)
    assert str(e.value).startswith(f"{copy / WEIGHTS_FILE}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_train_state_with_a_pickle_payload_is_refused_without_running_it(clean, tmp_path):
    copy, marker = Path(shutil.copytree(clean, tmp_path / "copy")), tmp_path / "ran"
    torch.save({"epoch": 1, "optimizer": Payload(marker)}, copy / TRAIN_STATE_FILE)
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as e:
        checkpoint.check_train_state(copy)
    assert str(e.value).startswith(f"{copy / TRAIN_STATE_FILE}: ") and "\n" not in str(e.value)
    (copy / TRAIN_STATE_FILE).write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(CheckpointError, match="is not a readable training state"):
        checkpoint.check_train_state(copy)
    torch.save({"epoch": 1, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}}, copy / TRAIN_STATE_FILE)
    checkpoint.check_train_state(copy)
    assert not marker.exists()


@pytest.mark.parametrize("damage", [lambda s: os.urandom(4096), reshaped], ids=["random", "shape"])
def test_score_refuses_a_corrupt_checkpoint_before_ray_starts(clean, tmp_path, damage):
    copy = corrupted(clean, tmp_path, damage)
    source = write_input(tmp_path / "in", rows=8, seed=3, prefix="c")
    args = ["score", "--checkpoint", str(copy), "--input", source["path"], "--output", str(tmp_path / "out")]
    proc = run_cli(args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if str(copy / WEIGHTS_FILE) in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Ray" not in proc.stderr and not (tmp_path / "out").exists()


def train_from(tmp_path: Path, start: str) -> subprocess.CompletedProcess:
    """``mmray train`` on data that does not exist, starting from ``start`` (``key=checkpoint``): a
    checkpoint that fails its check fails first, so the data is never read."""
    missing = tmp_path / "no-such-data"
    args = ["train", "--config", "configs/demo.yaml", f"data.train={missing}", f"data.val={missing}", start]
    return run_cli([*args, f"train.storage_path={tmp_path / 'runs'}"], check=False, timeout=120)


def test_train_refuses_a_resume_from_with_a_pickle_payload_before_ray_starts(clean, tmp_path):
    copy, marker = Path(shutil.copytree(clean, tmp_path / "copy")), tmp_path / "ran"
    torch.save({"epoch": 1, "optimizer": Payload(marker)}, copy / TRAIN_STATE_FILE)
    proc = train_from(tmp_path, f"train.resume_from={copy}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{copy / TRAIN_STATE_FILE}: holds objects other than tensors" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert "Ray" not in proc.stderr  # refused before a local Ray was started (seconds, not a cluster's start-up)
    damaged = corrupted(clean, tmp_path / "w", reshaped)
    proc = train_from(tmp_path, f"model.init_from={damaged}")
    assert proc.returncode == 2 and f"{damaged / WEIGHTS_FILE}: tensor" in proc.stderr
    assert "Ray" not in proc.stderr
