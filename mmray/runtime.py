"""Connecting to Ray (an embedded local instance by default, a cluster when an address is given) and
checking, before a job starts, that the cluster can hold everything the job holds at once.

The budget check exists because Ray never fails an over-subscribed job: actor pools and trainer
workers that reserve the CPUs Ray Data's read, list and map tasks need leave those tasks queued forever
(``ListFiles ... 0 row``, ``backpressured:tasks(ResourceBudget)``). Each part of a job is a
``Demand`` naming the config keys that size it, so the error says what to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from mmray.console import quiet_ray_data, ray_init_options, say

__all__ = [
    "READ_TASKS",
    "RAY_CLIENT_UNSUPPORTED",
    "Demand",
    "ResourceBudgetError",
    "check_resources",
    "cluster_capacity",
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
