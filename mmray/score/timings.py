"""Where a scoring run's seconds went, for ``--verbose``: the driver's steps, and inside the stream what
the actors spent starting (from Ray's task events), so a slow small partition says why.

``mmray score --verbose`` ends with one line such as::

    mmray score: 3.1 s: plan 0.04, lease 0.01, ray 0.00, stream 2.98 (actors up at 1.62: start-up 1.55
    in 1 actor(s); first batch done at 2.31; write 0.05), finalize 0.03, publish 0.02

Ray's task events are read only here, only when asked (``ray.timeline``: every event the cluster kept),
and a failure to read them never fails the run: the line then has the driver's steps alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

__all__ = ["StepTimes"]

_INIT, _SUBMIT, _WRITE = ").__init__", ").submit", "task::Write"
_EVENTS_WAIT_S = 3.0


class StepTimes:
    """Seconds per named step of one run, in the order first entered."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self.started = time.monotonic()
        self.stream_started: float | None = None  # epoch seconds: Ray's events are on that clock
        self.stream_detail = ""

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.monotonic() - began

    @contextlib.contextmanager
    def stream(self, actors: int, detail: bool) -> Iterator[None]:
        """The ``stream`` step; with ``detail``, also what its actors spent starting (Ray's events)."""
        self.stream_started = time.time()
        with self.step("stream"):
            yield
        if detail:
            self.stream_detail = _actor_detail(self.stream_started, actors)

    def line(self) -> str:
        total = time.monotonic() - self.started
        parts = [
            f"{name} {seconds:.2f}" + (f" ({self.stream_detail})" if name == "stream" and self.stream_detail else "")
            for name, seconds in self.steps.items()
        ]
        return f"{total:.1f} s: {', '.join(parts)}"


def _actor_detail(since: float, actors: int) -> str:
    """``actors up at S: start-up T in N actor(s); first batch done at F; write W`` from Ray's task events
    after ``since`` (epoch seconds); "" when they cannot be read."""
    try:
        import ray

        logging.getLogger("ray._private.state").setLevel(logging.ERROR)  # its notice about the API's future
        deadline = time.monotonic() + _EVENTS_WAIT_S
        while True:  # workers report their events every second or so: the last ones may still be on the way
            events = [e for e in ray.timeline() if e.get("ph") == "X" and e["ts"] >= since * 1e6]
            if any(e.get("cat") == _WRITE for e in events) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    except Exception:  # diagnostics only: the run already succeeded
        return ""
    kinds = [(e.get("cat", ""), e) for e in events]  # "task::MapWorker(MapBatches(SlicePreprocessor)).__init__"
    inits = [e for cat, e in kinds if cat.endswith(_INIT) and "MapWorker" in cat]
    submits = [e for cat, e in kinds if cat.endswith(_SUBMIT) and "MapWorker" in cat]
    writes = [e for cat, e in kinds if cat == _WRITE]
    if not inits:
        return ""
    up = max(e["ts"] + e["dur"] for e in inits) / 1e6 - since
    start_up = max(e["dur"] for e in inits) / 1e6
    out = [f"actors up at {up:.2f}: start-up {start_up:.2f} in {len(inits)} actor(s) of {actors} planned"]
    if submits:
        out.append(f"first batch done at {min(e['ts'] + e['dur'] for e in submits) / 1e6 - since:.2f}")
    if writes:
        out.append(f"write {sum(e['dur'] for e in writes) / 1e6:.2f}")
    return "; ".join(out)
