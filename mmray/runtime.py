"""Connecting to Ray: an embedded local instance by default, a cluster when an address is given."""

from __future__ import annotations

import os

import ray

__all__ = ["init_ray"]


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Starts or joins Ray once per process.

    Args:
        address: ``ray://...``, ``auto`` or ``host:port``; None uses ``RAY_ADDRESS`` when set, else an
            embedded local instance (inside ``ray job submit`` the job's cluster is picked up).
        num_cpus: CPUs of an embedded instance (None: all of this machine's).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # An embedded instance has no remote clients, so Ray 2.60's token auth only gets in the way.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
