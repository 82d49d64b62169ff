"""Staging: later runs remove a killed run's staging (and repair its half-done swap) but never a live
run's; the owner record protects staging until the rename has published it."""

from __future__ import annotations

import json
import os
import time

import pytest

from mmray.score import commit
from mmray.score.commit import Target, atomic
from tests.score.commit.conftest import mark_owner_dead, publish, stage_run


def test_later_runs_remove_stale_staging_but_never_a_live_run(tmp_path):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    live, dead, orphan = (commit.open_staging(target, c * 12) for c in "abc")
    other = commit.open_staging(Target(str(tmp_path / "out"), {"date": "d10"}), "d" * 12)
    mark_owner_dead(dead)  # a killed run on this host
    os.remove(orphan.file("_owner.json"))  # e.g. recreated by a late write task of a killed run
    os.remove(other.file("_owner.json"))  # another partition's: not this target's business

    removed = commit.clean_stale_staging(target)

    assert sorted(removed) == sorted([dead.path, orphan.path])
    assert os.path.isdir(live.path) and os.path.isdir(other.path)


def test_staging_of_an_owner_in_another_pid_namespace_is_kept_until_its_record_is_a_day_old(tmp_path):
    target = Target(str(tmp_path / "out"))
    theirs, old = commit.open_staging(target, "a" * 12), commit.open_staging(target, "b" * 12)
    for st, created in ((theirs, time.time()), (old, time.time() - 2 * 24 * 3600)):
        mark_owner_dead(st, pid_ns="pid:[4026532999]", created=created)  # a live pod's pid, not ours
    assert commit.clean_stale_staging(target) == [old.path]
    assert os.path.isdir(theirs.path)


def test_an_unreadable_owner_record_counts_as_a_dead_owner(tmp_path):
    target = Target(str(tmp_path / "out"))
    torn, live = commit.open_staging(target, "a" * 12), commit.open_staging(target, "b" * 12)
    with open(torn.file("_owner.json"), "wb") as f:
        f.write(b'{"host": "h", "pi')  # a record cut short (written in place by an older version)
    assert commit.clean_stale_staging(target) == [torn.path]
    assert os.path.isdir(live.path)
    assert json.loads(open(live.file("_owner.json")).read())["pid"] == os.getpid()
    assert not [n for n in os.listdir(live.path) if ".tmp" in n]  # written via a temporary file, renamed


def test_the_owner_record_guards_staging_until_after_the_rename(tmp_path, monkeypatch):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    st, manifest, success = stage_run(target, [3])
    real = atomic.rename_into_place

    def rename_after_another_runs_cleanup(staging, final, run_id):
        assert commit.clean_stale_staging(target) == []  # e.g. an "already scored" rerun's cleanup
        real(staging, final, run_id)

    monkeypatch.setattr(atomic, "rename_into_place", rename_after_another_runs_cleanup)
    publish(st, manifest, success)
    assert commit.committed_run(target)["run_id"] == st.run_id
    assert "_owner.json" not in os.listdir(target.uri) and os.listdir(tmp_path / "out") == ["date=d1"]


def test_two_rename_fallback_killed_between_the_renames_is_restored_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # as on NFS: no renameat2 exchange
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    old, manifest, success = stage_run(target, [2, 2])
    publish(old, manifest, success)
    killed, manifest, success = stage_run(target, [3])
    real_rename, tries = os.rename, []

    def killed_after_first_rename(src, dst):
        tries.extend([src] if src == killed.path else [])
        if len(tries) == 2:  # the first try is the plain rename onto the existing target (ENOTEMPTY)
            raise KeyboardInterrupt("killed between the two renames")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        publish(killed, manifest, success)
    monkeypatch.setattr(os, "rename", real_rename)
    mark_owner_dead(killed)
    assert not os.path.exists(target.uri)
    assert [n for n in os.listdir(tmp_path / "out") if n.startswith("_old-")] == [f"_old-{killed.run_id}-date=d1"]

    with commit.lease(target):
        removed = commit.clean_stale_staging(target)  # what the next run does first, under the lease
    assert removed == [killed.path]
    assert commit.committed_run(target)["run_id"] == old.run_id
    assert commit.read_committed(target).num_rows == 4
    assert os.listdir(tmp_path / "out") == ["date=d1"]

    rerun, manifest, success = stage_run(target, [3])  # the fallback again, to the end: -old is removed
    publish(rerun, manifest, success)
    assert commit.read_committed(target).column("run_id").to_pylist() == [rerun.run_id] * 3
    assert os.listdir(tmp_path / "out") == ["date=d1"]


def test_a_stale_old_directory_beside_a_present_target_is_removed(tmp_path):
    target = Target(str(tmp_path / "out"))
    st, manifest, success = stage_run(target, [1])
    publish(st, manifest, success)
    stale = tmp_path / f"_old-{'c' * 12}-out"
    (stale / "x").mkdir(parents=True)
    with commit.lease(target):
        assert commit.clean_stale_staging(target) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == ["out"]
