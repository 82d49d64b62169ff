"""The test-only fault hook fires once, at exactly the configured rank, epoch and step."""

from __future__ import annotations

import json
import threading
import time

from mmray.train.faults import EXIT_CODE, Fault, maybe_fail


def armed(tmp_path, **spec) -> Fault:
    path = tmp_path / "fault.json"
    path.write_text(json.dumps(spec))
    return Fault(str(path))


def test_fires_once_at_the_configured_point(tmp_path):
    fault = armed(tmp_path, rank=1, epoch=2, step=3)
    exits: list[int] = []
    for rank, epoch, step in [(0, 2, 3), (1, 1, 3), (1, 2, 2)]:
        maybe_fail(fault, rank, epoch, step, exit_fn=exits.append)
    assert exits == [] and fault.spec() is not None  # still armed
    maybe_fail(fault, 1, 2, 3, exit_fn=exits.append)
    assert exits == [EXIT_CODE]
    assert fault.spec() is None  # disarmed before exiting: the restarted worker runs through
    maybe_fail(fault, 1, 2, 3, exit_fn=exits.append)
    assert exits == [EXIT_CODE]


def test_defaults_are_rank0_epoch0_step0(tmp_path):
    exits: list[int] = []
    maybe_fail(armed(tmp_path), 0, 0, 0, exit_fn=exits.append)
    assert exits == [EXIT_CODE]


def test_no_fault_configured_or_file_absent_does_nothing(tmp_path):
    exits: list[int] = []
    maybe_fail(None, 0, 0, 0, exit_fn=exits.append)
    maybe_fail(Fault(str(tmp_path / "missing.json")), 0, 0, 0, exit_fn=exits.append)
    assert exits == []


def test_pause_holds_until_the_file_is_removed(tmp_path):
    fault = armed(tmp_path, epoch=1, action="pause", max_s=0.3)
    exits: list[int] = []
    started = time.monotonic()
    maybe_fail(fault, 0, 1, 0, exit_fn=exits.append)  # returns at max_s: the file is still there
    assert time.monotonic() - started >= 0.3  # it did hold (a lower bound, not a speed check)
    assert exits == [] and fault.spec() is not None
    fault_path = tmp_path / "fault.json"
    fault_path.unlink()
    maybe_fail(fault, 0, 1, 0, exit_fn=exits.append)  # disarmed: no-op
    assert exits == []


def test_wait_for_holds_the_fault_until_the_event_file_says_so(tmp_path):
    snapshot = tmp_path / "snapshot.json"
    fault = armed(tmp_path, wait_for=str(snapshot), wait_for_text="checkpoint_epoch0000", max_s=5)
    exits: list[int] = []
    snapshot.write_text('{"checkpoints": []}')
    timer = threading.Timer(0.3, lambda: snapshot.write_text('{"checkpoints": ["checkpoint_epoch0000"]}'))
    timer.start()
    started = time.monotonic()
    maybe_fail(fault, 0, 0, 0, exit_fn=exits.append)
    assert time.monotonic() - started >= 0.3  # waited for the text, not just for the file
    assert exits == [EXIT_CODE]
