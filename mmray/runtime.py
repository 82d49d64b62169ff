"""Connecting to Ray: an embedded local instance by default, a cluster when an address is given."""

from __future__ import annotations

import os

import ray

__all__ = ["RAY_CLIENT_UNSUPPORTED", "init_ray"]

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

    Raises:
        ValueError: a ``ray://`` (Ray Client) address, before connecting (see ``RAY_CLIENT_UNSUPPORTED``).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        raise ValueError(f"--address / RAY_ADDRESS {address}: {RAY_CLIENT_UNSUPPORTED}")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # An embedded instance has no remote clients, so Ray 2.60's token auth only gets in the way.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
