"""The no-progress watchdog (``data.stall_timeout_s``) through the real CLI on the session's 2-CPU Ray:
a stage that cannot be scheduled, because something the budget check cannot see holds the CPUs its
tasks need, fails the job with exit 2, Ray Data's stage summary and the key, instead of hanging.

``cli.main`` runs in this process (it keeps the session's Ray), which saves an interpreter start per test.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

from mmray import cli
from mmray.data.synthetic import make_dataset
from tests.helpers import tiny_overrides
from tests.score.conftest import TASK, make_checkpoint

pytestmark = pytest.mark.integration

STALL_S = 4  # data.stall_timeout_s of the scoring run: it stalls before any worker needs to start
# Training's: no block moves while Ray starts a read task's worker process or a preprocessing actor
# (~3 s here in one test process; over 20 s on a 2-core machine running two test workers, where a
# ListFiles task was stopped at 20 s), and those passes must get through before the stall.
TRAIN_STALL_S = 45 if os.environ.get("PYTEST_XDIST_WORKER") else 25
HOOK = "tests.test_stall_e2e:take_a_cpu_at_the_first_step"


class Holder:
    """Another job's actor: it holds its CPUs until it dies."""

    def ready(self) -> bool:
        return True


_held: list = []  # in a trainer worker: the holder, alive as long as the worker (its owner)


def marker(run_name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"mmray-stall-{run_name}"


def take_a_cpu_at_the_first_step(rank: int, epoch: int, step: int) -> None:
    """``train.before_step``: before rank 0's first step another job takes 1 CPU (once the epoch's read
    tasks have let it go), so the next split's read task can never run while the worker trains."""
    if rank or epoch or step or _held:
        return
    import ray.train

    holder = ray.remote(num_cpus=1)(Holder).remote()
    ray.get(holder.ready.remote(), timeout=120)
    _held.append(holder)
    marker(ray.train.get_context().get_experiment_name()).write_text("held")


def wait_until_free(cpus: float) -> None:
    """Until the session's Ray has ``cpus`` CPUs free again (a killed actor's go back asynchronously),
    so the tests after these find the cluster as it was."""
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.2)


@contextmanager
def held_elsewhere(cpus: float, for_s: float | None = None) -> Iterator[None]:
    """Another job's actor holds ``cpus`` CPUs inside, or for ``for_s`` seconds once it has them; after,
    the session's Ray has them back."""
    free = ray.available_resources().get("CPU", 0)
    holder = ray.remote(num_cpus=cpus)(Holder).remote()
    release = threading.Timer(for_s or 0, ray.kill, args=(holder,))
    try:
        ray.get(holder.ready.remote(), timeout=120)
        if for_s:
            release.start()
        yield
    finally:
        release.cancel()
        ray.kill(holder)
        wait_until_free(free)


def stalls(args: list[str], capsys) -> tuple[str, float]:
    """Runs the CLI, which must fail with exit 2; returns (stderr, seconds)."""
    started = time.monotonic()
    code = cli.main(args)
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    return err, took


def assert_names_the_stall(err: str, job: str, stage: str = "ReadFiles") -> None:
    assert f"{job} was stopped: its data stream made no progress for {STALL_S} s (data.stall_timeout_s)" in err
    assert "Operators still running:" in err and stage in err, err[-3000:]  # Ray Data's own stage summary
    assert "0 finished" in err
    assert f"raise data.stall_timeout_s (now {STALL_S})" in err and "data.stall_timeout_s=0" in err


def test_scoring_whose_write_task_cannot_be_scheduled_fails_with_rays_stage_summary(
    ray_session, demo_data, tmp_path, capsys
):
    """1.5 of the 2 CPUs are held elsewhere: the budget (2 x 0.5 + 1 of 2) passes, the scoring actor
    (0.5) starts, but the task that writes its rows (one whole CPU) never runs."""
    ckpt = make_checkpoint(tmp_path, [TASK])
    args = ["score", "--checkpoint", str(ckpt), "--input", demo_data["test"]["path"]]
    with held_elsewhere(1.5):
        err, took = stalls([*args, "--output", str(tmp_path / "preds"), f"data.stall_timeout_s={STALL_S}"], capsys)
    assert_names_the_stall(err, "mmray score", stage="Write")
    assert took < 60, f"took {took:.0f} s"
    assert not list((tmp_path / "preds").glob("**/*.parquet"))  # nothing committed or left behind


def test_with_the_watchdog_off_a_stream_that_waits_longer_than_the_timeout_finishes(
    ray_session, demo_data, tmp_path, capsys
):
    """The same starved write as above, released after 2.5 x STALL_S: with data.stall_timeout_s=0 (off)
    the run waits it out and commits, where the guarded run above is stopped after STALL_S."""
    ckpt = make_checkpoint(tmp_path, [TASK])
    args = ["score", "--checkpoint", str(ckpt), "--input", demo_data["test"]["path"]]
    with held_elsewhere(1.5, for_s=2.5 * STALL_S):
        started = time.monotonic()
        code = cli.main([*args, "--output", str(tmp_path / "preds"), "data.stall_timeout_s=0"])
        took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "committed" in err and "no progress" not in err
    assert took > 2.5 * STALL_S  # it did wait longer than the guarded run is allowed to


def test_a_trainer_workers_shard_that_stops_flowing_fails_the_run(ray_session, tmp_path, capsys):
    """Streamed splits: epoch 0 trains, then the validation shard's read task never gets a CPU (the
    worker's hook gave it away), so the worker waits on its shard and Ray Data's guard in the split
    coordinator fails the run."""
    name, free = f"stall-{uuid.uuid4().hex[:8]}", ray.available_resources().get("CPU", 0)
    data = make_dataset(tmp_path / "data", rows=100, seed=3)  # a short epoch 0
    overrides = tiny_overrides(
        data,
        tmp_path / "runs",
        **{
            "train.num_workers": 1,
            "train.epochs": 2,
            "train.name": name,
            "train.before_step": HOOK,
            "data.cache": "never",
            "data.stall_timeout_s": TRAIN_STALL_S,
        },
    )
    try:
        err, took = stalls(["train", "--config", "configs/demo.yaml", *overrides], capsys)
        assert marker(name).exists(), f"the run stalled before training began:\n{err[-3000:]}"
    finally:
        marker(name).unlink(missing_ok=True)
        wait_until_free(free)  # the holder dies with the failed worker, its owner
    assert f"mmray train was stopped: its data stream made no progress for {TRAIN_STALL_S} s" in err
    assert "Operators still running:" in err and "ReadFiles" in err
    assert took < 240, f"took {took:.0f} s"


def test_a_cached_run_whose_splits_cannot_be_materialized_fails_the_run(ray_session, tmp_path, capsys):
    """Cached splits (``data.cache=always``) are materialized before any trainer worker starts, and the
    workers' shards then take blocks already in the object store (splitting them asks for no CPU): the
    passes that materialize them are where the cached path can stall. 1.5 of the 2 CPUs are held
    elsewhere, so the first one's read task never runs."""
    data = make_dataset(tmp_path / "data", rows=100, seed=3)
    overrides = tiny_overrides(
        data,
        tmp_path / "runs",
        **{"train.num_workers": 1, "data.cache": "always", "data.stall_timeout_s": STALL_S},
    )
    with held_elsewhere(1.5, for_s=60):  # a stall the watchdog misses ends, and fails here, instead of hanging
        err, took = stalls(["train", "--config", "configs/demo.yaml", *overrides], capsys)
    assert "data.cache=always: caching the preprocessed splits" in err
    assert_names_the_stall(err, "mmray train")
    assert took < 60, f"took {took:.0f} s"
    assert not list((tmp_path / "runs").glob("**/model.safetensors"))  # it stopped before training
