"""The tests' fault injector (``tests.faults``) fires once, at exactly the configured rank, epoch and step,
and loads as a ``train.before_step`` hook."""

from __future__ import annotations

import json
import threading
import time

from mmray.train.hooks import load_before_step
from tests.faults import ENV_VAR, EXIT_CODE, HOOK, Fault, fire


def armed(tmp_path, **spec) -> Fault:
    path = tmp_path / "fault.json"
    path.write_text(json.dumps(spec))
    return Fault(str(path))


def test_fires_once_at_the_configured_point(tmp_path):
    fault = armed(tmp_path, rank=1, epoch=2, step=3)
    exits: list[int] = []
    for rank, epoch, step in [(0, 2, 3), (1, 1, 3), (1, 2, 2)]:
        fire(fault, rank, epoch, step, exit_fn=exits.append)
    assert exits == [] and fault.spec() is not None  # still armed
    fire(fault, 1, 2, 3, exit_fn=exits.append)
    assert exits == [EXIT_CODE]
    assert fault.spec() is None  # disarmed before exiting: the restarted worker runs through
    fire(fault, 1, 2, 3, exit_fn=exits.append)
    assert exits == [EXIT_CODE]


def test_defaults_are_rank0_epoch0_step0(tmp_path):
    exits: list[int] = []
    fire(armed(tmp_path), 0, 0, 0, exit_fn=exits.append)
    assert exits == [EXIT_CODE]


def test_no_fault_configured_or_file_absent_does_nothing(tmp_path):
    exits: list[int] = []
    fire(None, 0, 0, 0, exit_fn=exits.append)
    fire(Fault(str(tmp_path / "missing.json")), 0, 0, 0, exit_fn=exits.append)
    assert exits == []


def test_pause_holds_until_the_file_is_removed(tmp_path):
    fault = armed(tmp_path, epoch=1, action="pause", max_s=0.3)
    exits: list[int] = []
    started = time.monotonic()
    fire(fault, 0, 1, 0, exit_fn=exits.append)  # returns at max_s: the file is still there
    assert time.monotonic() - started >= 0.3  # it did hold (a lower bound, not a speed check)
    assert exits == [] and fault.spec() is not None
    fault_path = tmp_path / "fault.json"
    fault_path.unlink()
    fire(fault, 0, 1, 0, exit_fn=exits.append)  # disarmed: no-op
    assert exits == []


def test_wait_for_holds_the_fault_until_the_event_file_says_so(tmp_path):
    snapshot = tmp_path / "snapshot.json"
    fault = armed(tmp_path, wait_for=str(snapshot), wait_for_text="checkpoint_epoch0000", max_s=5)
    exits: list[int] = []
    snapshot.write_text('{"checkpoints": []}')
    timer = threading.Timer(0.3, lambda: snapshot.write_text('{"checkpoints": ["checkpoint_epoch0000"]}'))
    timer.start()
    started = time.monotonic()
    fire(fault, 0, 0, 0, exit_fn=exits.append)
    assert time.monotonic() - started >= 0.3  # waited for the text, not just for the file
    assert exits == [EXIT_CODE]


def test_the_hook_reads_the_trigger_file_the_environment_names(tmp_path, monkeypatch):
    hook = load_before_step(HOOK)  # what a worker does with train.before_step=tests.faults:maybe_fail
    trigger = tmp_path / "fault.json"
    monkeypatch.setenv(ENV_VAR, str(trigger))
    trigger.write_text(json.dumps({"rank": 0, "epoch": 1, "step": 0, "action": "pause", "max_s": 0.2}))
    started = time.monotonic()
    hook(0, 1, 0)  # armed here: holds for max_s (the file stays)
    assert time.monotonic() - started >= 0.2 and trigger.exists()
