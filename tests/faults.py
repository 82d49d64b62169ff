"""Fault injection for the tests: kill (or hold) a training worker at a chosen rank, epoch and step.

A test trains with ``train.before_step=tests.faults:maybe_fail`` (``HOOK``) and writes a JSON trigger
file such as ``{"rank": 0, "epoch": 1, "step": 2}`` to ``trigger_path()``. The worker of that rank
deletes the file and calls ``os._exit`` just before that optimizer step of that epoch, the way an OOM
kill or a lost node ends a process: no exception, no cleanup. Deleting first makes the fault fire
once, so the restarted worker group runs through. Without the file nothing happens.

``"action": "pause"`` instead holds the worker there while the file exists (at most ``"max_s"``
seconds): a test can then kill the driver at a known point, after a checkpoint and before the run
ends, however fast or slow the machine is. ``"wait_for": PATH`` (with optional ``"wait_for_text"``)
makes the worker first wait, at most ``"max_s"`` seconds, until that file exists and contains the
text, e.g. until Ray Train has recorded a checkpoint in its run snapshot: a worker that dies within
one controller poll of reporting takes its unregistered report with it, and the test is about
resuming from a checkpoint, not about that race.

The trigger file's path is the environment variable ``ENV_VAR``. tests/conftest.py sets it before the
session's Ray starts, because a Ray worker has the environment of the process that started its node,
not of the driver using it (a CLI run joining the session's Ray through ``RAY_ADDRESS``); the cluster
test starts its nodes with it. Workers import this module from the repository root, which Ray puts on
their ``sys.path`` (the driver's working directory, or the job's uploaded working dir).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV_VAR", "EXIT_CODE", "HOOK", "Fault", "arm", "fire", "maybe_fail", "trigger_path"]

ENV_VAR = "MMRAY_TEST_FAULT_FILE"
HOOK = "tests.faults:maybe_fail"  # the train.before_step value that installs this injector
EXIT_CODE = 43  # distinctive, so a log reader can tell an injected death from a real one


@dataclass(frozen=True)
class Fault:
    path: str  # the trigger file; the fault is armed while it exists

    def spec(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None


def trigger_path() -> Path:
    """Where the workers of this test session look for the trigger file."""
    return Path(os.environ[ENV_VAR])


def arm(**spec: object) -> Path:
    """Writes the trigger file (``rank``, ``epoch``, ``step``, ``action``, ``max_s``, ``wait_for`` ...);
    returns its path, which the test removes to disarm or release it."""
    path = trigger_path()
    path.write_text(json.dumps(spec))
    return path


def maybe_fail(rank: int, epoch: int, step: int) -> None:
    """The ``train.before_step`` hook: ``fire`` with the session's trigger file."""
    path = os.environ.get(ENV_VAR)
    fire(Fault(path) if path else None, rank, epoch, step)


def fire(fault: Fault | None, rank: int, epoch: int, step: int, exit_fn: Callable[[int], None] = os._exit) -> None:
    """Exits (or pauses) the process when ``fault`` is armed for this ``(rank, epoch, step)``.

    Args:
        step: the optimizer step within the epoch (0-based) about to be taken.
        exit_fn: ``os._exit``; tests pass a recorder instead.
    """
    if fault is None:
        return
    spec = fault.spec()
    if spec is None or (spec.get("rank", 0), spec.get("epoch", 0), spec.get("step", 0)) != (rank, epoch, step):
        return
    deadline = time.monotonic() + float(spec.get("max_s", 300))
    if spec.get("wait_for"):
        while not _contains(spec["wait_for"], spec.get("wait_for_text", "")) and time.monotonic() < deadline:
            time.sleep(0.1)
    if spec.get("action", "exit") == "pause":
        print(f"mmray test fault: rank {rank} pauses at epoch {epoch} step {step}", flush=True)
        while os.path.exists(fault.path) and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    try:
        os.remove(fault.path)
    except FileNotFoundError:  # another process of the same rank got there first
        return
    print(f"mmray test fault: rank {rank} exits at epoch {epoch} step {step}", flush=True)
    exit_fn(EXIT_CODE)


def _contains(path: str, text: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return text in f.read()
    except FileNotFoundError:
        return False
