"""Connecting to Ray (an embedded local instance by default, a cluster when an address is given) and
checking, before a job starts, that the cluster can hold everything the job holds at once.

The budget check exists because Ray never fails an over-subscribed job: actor pools and trainer
workers that reserve the CPUs Ray Data's read, list and map tasks need leave those tasks queued forever
(``ListFiles ... 0 row``, ``backpressured:tasks(ResourceBudget)``). Each part of a job is a
``Demand`` naming the config keys that size it, so the error says what to change.

What the budget cannot see (another job taking the CPUs mid-run, a UDF blocked on I/O, a node lost)
is left to a no-progress watchdog, ``data.stall_timeout_s``. It is Ray Data's own: ``guard_stalls`` sets
the dataset's ``DataContext.execution_no_progress_timeout_s`` (Ray 2.60's ``NoProgressGuard``; Ray's
default is 30 minutes), which the streaming executor checks after every scheduling step in the
process that runs it: the driver for scoring's write and training's preprocessing passes, the
``SplitCoordinator`` actor for the trainer workers' shards (its dataset carries the context along).
That was chosen over a polling thread on the driver, or a timeout around each trainer worker's
``next(batch)``: the guard sees every operator's queues where they live, so it counts only time in
which no block moved anywhere (a slow training step with full buffers upstream is not a stall of
the stream it waits on until it outlasts the timeout too), it needs no private API to find the
executor, and the failure takes Ray's own path: the executor shuts its tasks and actors down, and the
error reaches whoever waits on the stream (``write_parquet``, a worker's iterator, then
``TorchTrainer.fit``). ``failing_on_stall`` turns it, wherever it surfaces, into ``StallError``
with Ray's stage summary and the key to change.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
import ray.data
from ray.data.exceptions import ExecutionTimeoutError

from mmray.console import quiet_ray_data, ray_init_options, say

__all__ = [
    "READ_TASKS",
    "RAY_CLIENT_UNSUPPORTED",
    "Demand",
    "ResourceBudgetError",
    "STALL_KEY",
    "StallError",
    "actor_device",
    "check_resources",
    "cluster_capacity",
    "failing_on_stall",
    "guard_stalls",
    "init_ray",
    "release_ray",
    "total_demand",
]

RAY_CLIENT_UNSUPPORTED = (
    "Ray Client addresses (ray://) cannot run mmray: Ray Data's streaming executor needs a driver "
    "attached to the cluster (on Ray 2.60 it fails with \"'Worker' object has no attribute 'core_worker'\"), "
    "and Ray documents Client as unsuited to Train/Tune. Submit the job instead (ray job submit --address "
    "http://HEAD:8265 --working-dir . -- python jobs/train.py ...; see README 'Where it runs'), or run on a "
    "node of the cluster with --address auto or HEAD:6379"
)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Starts or joins Ray once per process.

    Args:
        address: ``auto`` or ``host:port`` (the GCS); None uses ``RAY_ADDRESS`` when set, else an
            embedded local instance (inside ``ray job submit`` the job's cluster is picked up).
        num_cpus: CPUs of an embedded instance (None: all of this machine's).

    Ray's own output is on only when verbose (``mmray.console``).

    Raises:
        ValueError: a ``ray://`` (Ray Client) address, before connecting (see ``RAY_CLIENT_UNSUPPORTED``).
    """
    global _connected_here
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        raise ValueError(f"--address / RAY_ADDRESS {address}: {RAY_CLIENT_UNSUPPORTED}")
    if address:
        ray.init(address=address, **ray_init_options())
        say(f"joined the Ray cluster at {address}")
    else:
        # An embedded instance has no remote clients, so Ray 2.60's token auth only gets in the way.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, **ray_init_options())
        say(f"started a local Ray instance ({ray.cluster_resources().get('CPU', 0):g} CPUs)")
    _connected_here = True
    quiet_ray_data()


_connected_here = False  # init_ray started or joined Ray in this process (not a caller before it)


def release_ray() -> None:
    """Disconnects (and stops an embedded instance) only when ``init_ray`` connected this process: a
    caller that had Ray running before, such as a notebook or a test session calling ``cli.main``,
    keeps it."""
    global _connected_here
    if _connected_here and ray.is_initialized():
        ray.shutdown()
    _connected_here = False


def actor_device(num_gpus: float) -> str:
    """The torch device of an actor that Ray started with ``num_gpus`` GPUs: Ray, not mmray, picks the
    GPU (it sets the actor's ``CUDA_VISIBLE_DEVICES``), so ``"cuda"`` is whichever one it gave; an actor
    without GPUs runs on ``"cpu"``. The one place the pools' device is derived from their resources."""
    return "cuda" if num_gpus > 0 else "cpu"


class ResourceBudgetError(ValueError):
    """The job would hold more than the cluster has: it would wait forever instead of running."""


@dataclass(frozen=True)
class Demand:
    """``count`` units (workers, actors, tasks) of ``per_unit`` resources, all held at once, sized by
    the config ``keys``."""

    keys: str
    count: float
    per_unit: dict[str, float]


# Ray Data's read, file-listing and task-pool map operators ask for one whole CPU each, and one of them
# must be able to run while every pool and worker holds its share.
READ_TASKS = Demand("Ray Data's read/list/map tasks (1 whole CPU, fixed)", 1, {"CPU": 1.0})


def cluster_capacity() -> tuple[dict[str, float], str]:
    """What the cluster can hold: the autoscaler's maximum when it has one (as Ray Train itself
    checks), else the nodes there now. Returns (resources, where that figure came from)."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # private API: the check falls back to the nodes present, never fails for it
        limits = None
    if limits:
        return {k: float(v) for k, v in limits.items()}, "its autoscaler's maximum"
    return {k: float(v) for k, v in ray.cluster_resources().items()}, "ray.cluster_resources()"


def _largest_node() -> dict[str, float]:
    largest: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for k, v in node.get("Resources", {}).items():
                largest[k] = max(largest.get(k, 0.0), float(v))
    return largest


def total_demand(demands: list[Demand]) -> dict[str, float]:
    """Resource -> the amount ``demands`` hold together (zero amounts left out)."""
    totals: dict[str, float] = {}
    for d in demands:
        for resource, amount in d.per_unit.items():
            if amount > 0:
                totals[resource] = totals.get(resource, 0.0) + d.count * amount
    return totals


def check_resources(job: str, demands: list[Demand]) -> None:
    """Fails in seconds when ``demands`` (held at the same time) exceed the cluster.

    Raises:
        ResourceBudgetError: naming the resource, what the cluster has, and each demand's keys and size.
    """
    capacity, source = cluster_capacity()
    for resource, need in sorted(total_demand(demands).items()):
        have = capacity.get(resource, 0.0)
        if need > have + 1e-9:
            parts = "; ".join(
                f"{d.keys}: {d.count:g} x {d.per_unit[resource]:g}" for d in demands if d.per_unit.get(resource, 0) > 0
            )
            raise ResourceBudgetError(
                f"{job} would wait forever: it holds {need:g} {resource} at once ({parts}) but the cluster has "
                f"{have:g} {resource} ({source}). Lower those settings, or add nodes"
            )
    if source != "ray.cluster_resources()":
        return  # nodes an autoscaler would add are not known here
    largest = _largest_node()
    for d in demands:
        for resource, amount in d.per_unit.items():
            if amount > largest.get(resource, 0.0) + 1e-9:
                raise ResourceBudgetError(
                    f"{job} would wait forever: {d.keys} asks for {amount:g} {resource} in one process, but the "
                    f"largest node has {largest.get(resource, 0.0):g} {resource}"
                )


STALL_KEY = "data.stall_timeout_s"
# Ray's own advice (ds.context...) starts here; mmray's message names its config key instead.
_RAY_ADVICE = "\nIf this is expected"


class StallError(ValueError):
    """A Ray Data execution made no progress for ``data.stall_timeout_s``: it would have waited forever."""


def guard_stalls(ds: ray.data.Dataset, timeout_s: float) -> ray.data.Dataset:
    """``ds`` (and every dataset derived from it) fails with Ray's ``ExecutionTimeoutError`` after
    ``timeout_s`` seconds without progress; 0 turns the guard off (Ray's -1)."""
    ds.context.execution_no_progress_timeout_s = timeout_s if timeout_s > 0 else -1
    return ds


def _timeout_in(error: BaseException) -> ExecutionTimeoutError | None:
    """The ``ExecutionTimeoutError`` behind ``error``: itself, its cause or context, the exception a
    ``RayTaskError`` carries (a trainer worker's shard iterator), or a trainer worker's failure
    (``WorkerGroupError.worker_failures``), however deep."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, ExecutionTimeoutError):
            return cause  # the original, without the RayTaskError's traceback text
        if isinstance(e, ExecutionTimeoutError):
            return e
        todo += [e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    return None


@contextmanager
def failing_on_stall(job: str, timeout_s: float) -> Iterator[None]:
    """Re-raises a Ray Data no-progress timeout from inside as ``StallError``; other errors pass.

    Raises:
        StallError: naming the job, Ray Data's summary of each stage still running, and the key.
    """
    try:
        yield
    except Exception as e:
        found = _timeout_in(e)
        if found is None:
            raise
        summary = str(found).split(_RAY_ADVICE, 1)[0].strip()
        raise StallError(
            f"{job} was stopped: its data stream made no progress for {timeout_s:g} s ({STALL_KEY}). "
            f"Ray Data: {summary}\nA stage with active tasks but nothing finished is usually waiting for "
            f"resources something else on the cluster holds (`ray status`), or a UDF that blocks. If a stage "
            f"is legitimately this slow, raise {STALL_KEY} (now {timeout_s:g}), or set {STALL_KEY}=0 to disable "
            "the watchdog"
        ) from e
