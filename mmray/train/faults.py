"""Test-only fault injection: kill (or hold) a training worker at a chosen rank, epoch and step.

Set ``MMRAY_FAULT_FILE`` (on the driver: the launcher forwards it to the workers) to the path of a
JSON file such as ``{"rank": 0, "epoch": 1, "step": 2}``. The worker of that rank deletes the file and
calls ``os._exit`` just before that optimizer step of that epoch, the way an OOM kill or a lost node
ends a process: no exception, no cleanup. Deleting first makes the fault fire once, so the restarted
worker group runs through. Without the variable nothing is read and nothing happens.

``"action": "pause"`` instead holds the worker there while the file exists (at most
``"max_s"`` seconds): a test can then kill the driver at a known point, after a checkpoint and
before the run ends, however fast or slow the machine is. ``"wait_for": PATH`` (with optional
``"wait_for_text"``) makes the worker first wait, at most ``"max_s"`` seconds, until that file
exists and contains the text, e.g. until Ray Train has recorded a checkpoint in its run snapshot:
a worker that dies within one controller poll of reporting takes its unregistered report with it,
and the test is about resuming from a checkpoint, not about that race.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ENV_VAR", "EXIT_CODE", "Fault", "maybe_fail"]

ENV_VAR = "MMRAY_FAULT_FILE"
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


def maybe_fail(fault: Fault | None, rank: int, epoch: int, step: int,
               exit_fn: Callable[[int], None] = os._exit) -> None:  # fmt: skip
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
        print(f"mmray fault injection: rank {rank} pauses at epoch {epoch} step {step}", flush=True)
        while os.path.exists(fault.path) and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    try:
        os.remove(fault.path)
    except FileNotFoundError:  # another process of the same rank got there first
        return
    print(f"mmray fault injection: rank {rank} exits at epoch {epoch} step {step}", flush=True)
    exit_fn(EXIT_CODE)


def _contains(path: str, text: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return text in f.read()
    except FileNotFoundError:
        return False
