"""Over-subscribed settings fail in seconds through the real CLI on the session's 2-CPU Ray, with exit
2 and a message naming the keys, where they used to hang forever at ``ListFiles ... 0 row``."""

from __future__ import annotations

import time

import pytest

from tests.helpers import run_cli, tiny_overrides
from tests.score.conftest import TASK, make_checkpoint

pytestmark = pytest.mark.integration

FAST = 120  # seconds: a process start, Ray connect and the job's checks; a hang would hit run_cli's timeout


def fails_fast(args: list[str], ray_address: str) -> str:
    started = time.monotonic()
    proc = run_cli(args, ray_address, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - started < FAST
    return proc.stderr


def test_scoring_with_a_whole_cpu_per_predictor_fails_fast(ray_address, tmp_path, demo_data):
    """The issue's case: score.num_cpus=1 on 2 CPUs: on CPU one pool of (1 + 1) actors that read,
    preprocess and predict, 1 CPU each, + 1 (the output's write tasks); refused whatever the input's
    size (a small one would start one actor, but the same config on a larger one could never run)."""
    ckpt = make_checkpoint(tmp_path, [TASK])
    err = fails_fast(
        [
            "score",
            "--checkpoint",
            str(ckpt),
            "--input",
            demo_data["test"]["path"],
            "--output",
            str(tmp_path / "preds"),
            "score.num_cpus=1",
        ],
        ray_address,
    )
    assert "mmray score would wait forever: it holds 3 CPU at once" in err
    keys = "(data.preprocess.concurrency + score.concurrency) x max(data.preprocess.num_cpus, score.num_cpus): 2 x 1"
    assert keys in err and "has 2 CPU" in err
    assert not any((tmp_path / "preds").glob("*.parquet"))  # nothing committed


@pytest.mark.parametrize(
    "extra, keys",
    [
        (
            {"train.num_workers": 2, "train.resources_per_worker.CPU": 1},
            "train.num_workers x train.resources_per_worker: 2 x 1",
        ),
        (
            {"train.num_workers": 2, "data.cache": "never"},
            "data.preprocess.concurrency x data.preprocess.num_cpus: 1 x 0.5",
        ),
        ({"data.preprocess.concurrency": 3}, "data.preprocess.concurrency x data.preprocess.num_cpus: 3 x 0.5"),
    ],
)
def test_over_subscribed_training_fails_fast_naming_the_keys(extra, keys, ray_address, tmp_path, demo_data):
    """Trainer workers that leave no CPU for reads; streamed splits (preprocessing runs while the
    workers train: 1 + 0.5 + 1 > 2); a preprocessing pool that leaves none."""
    err = fails_fast(
        ["train", "--config", "configs/demo.yaml", *tiny_overrides(demo_data, tmp_path / "runs", **extra)], ray_address
    )
    assert "would wait forever" in err and keys in err and "has 2 CPU" in err
    # Known before any work: no split was preprocessed (its quarantine file comes with the first pass),
    # and no run folder was left behind (64 workers once failed after 124 s of preprocessing).
    assert not list((tmp_path / "runs").glob("*/quarantine/*.parquet"))
    assert not list((tmp_path / "runs").glob("*/tokenizer"))
