"""The one place mmray reads Ray internals: the GCS placement-group table, to free the placement groups
of trials that ASHA stopped.

When ASHA stops a trial, Tune kills the trial actor and with it the Train controller it owns, before
the controller can remove its worker group's placement group. Ray Train's detached
``PlacementGroupCleaner`` frees it only through the State API, which a Ray without dashboard (the
embedded one, the tests') does not serve, and the GCS frees it only when the job ends; until then the
next trials wait for resources that never come back. Such a group is useless to anyone: only its
creator held it. No public API names a placement group's creator, hence the GCS table, read in
``_orphaned_placement_groups`` alone; if a Ray upgrade moves it, the sweep goes on with one warning.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from mmray.console import say

__all__ = ["RAY_CHECKED", "janitor", "release_orphaned_placement_groups"]

RAY_CHECKED = "2.60.0"  # the Ray version whose internals _orphaned_placement_groups was checked against


def _orphaned_placement_groups() -> list[Any]:
    """The ids of this job's placement groups whose creating actor has died (private Ray API).

    Checked on Ray 2.60.0: ``ray._private.state.state._connect_and_get_accessor()
    .get_placement_group_table()`` returns each group as a serialized ``gcs_pb2.PlacementGroupTableData``
    whose ``creator_actor_dead``, ``creator_actor_id`` and ``creator_job_id`` no public API exposes. If a
    Ray release moves or renames any of it, this raises (``ImportError``, ``AttributeError``, a protobuf
    decode error ...); ``release_orphaned_placement_groups`` turns that into a warning.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    orphans = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        orphan = (
            pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
            and not pg.is_detached
            and pg.creator_actor_dead
            and not ray.ActorID(pg.creator_actor_id).is_nil()  # a driver's own groups count as actor-dead
            and pg.creator_job_id.hex() == job
        )
        if orphan:
            orphans.append(ray.PlacementGroupID(pg.placement_group_id))
    return orphans


def release_orphaned_placement_groups() -> int:
    """Removes this job's placement groups whose creating actor has died; returns how many (0, after
    one warning, when Ray's internals are not what they were checked on: stopped trials' resources
    then come back only when the job ends, and later trials may wait for them)."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        orphans = _orphaned_placement_groups()
    except Exception as e:  # whatever a moved private API raises: the cleanup is lost, not the sweep
        _warn_moved(f"{type(e).__name__}: {e}")
        return 0
    for pg_id in orphans:
        remove_placement_group(PlacementGroup(pg_id))
    return len(orphans)


@functools.cache
def _warn_moved(error: str) -> None:
    """Once per distinct error: the janitor calls every few seconds."""
    import ray

    say(
        f"warning: cannot free stopped trials' placement groups: Ray {ray.__version__}'s placement-group "
        f"table is not the one mmray was checked on (Ray {RAY_CHECKED}): {error}; the sweep goes on, but a "
        "stopped trial's resources come back only when this job ends",
        "tune",
    )


def janitor(interval_s: float = 2.0) -> Any:
    """A Tune callback that runs ``release_orphaned_placement_groups`` at most every ``interval_s``."""
    import ray.tune

    class Janitor(ray.tune.Callback):
        last = 0.0

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() - self.last >= interval_s:
                self.last = time.monotonic()
                released = release_orphaned_placement_groups()
                if released:
                    say(f"released {released} placement group(s) of stopped trials", "tune")

    return Janitor()
