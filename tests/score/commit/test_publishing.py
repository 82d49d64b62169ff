"""Publishing: exactly the manifest's files become visible, markers last; the local swap replaces a
partition in one step (two renames without renameat2); S3's copy phase is gated by ``_SUCCESS``."""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from mmray.score import commit
from mmray.score.commit import Target, atomic
from mmray.score.commit.staging import staging_dirs
from tests.score.commit.conftest import mark_owner_dead, publish, stage_run, visible_parquet

# --------------------------------------------------------------------------------------------------
# Local disk: one rename, or an exchange of the whole partition
# --------------------------------------------------------------------------------------------------


def test_staging_is_invisible_and_publish_makes_exactly_the_manifest_files_visible(tmp_path):
    target = Target(str(tmp_path / "out"), {"date": "2024-05-01"})
    st, manifest, success = stage_run(target, [4, 4, 2], bad=1)
    assert not os.path.exists(target.uri)
    assert pads.dataset(str(tmp_path / "out"), format="parquet").count_rows() == 0  # staging is hidden
    assert commit.committed_run(target) is None

    publish(st, manifest, success)

    assert visible_parquet(target) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(os.listdir(target.uri)) == [
        "_SUCCESS",
        "_manifest.json",
        "_quarantine",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert os.listdir(tmp_path / "out") == ["date=2024-05-01"]  # staging renamed away, nothing left
    assert commit.committed_run(target)["run_id"] == st.run_id
    assert json.loads(open(os.path.join(target.uri, "_SUCCESS")).read())["rows_quarantined"] == 1
    assert [os.path.basename(f) for f in commit.committed_files(target)] == visible_parquet(target)
    table = pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 10 and set(table.column("run_id").to_pylist()) == {st.run_id}
    assert commit.read_committed(target).num_rows == 10


def test_markers_are_complete_before_the_rename_makes_anything_visible(tmp_path, monkeypatch):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    st, manifest, success = stage_run(target, [3])
    seen = {}
    real = atomic.rename_into_place

    def check(staging, final, run_id):
        seen["staged"] = sorted(os.listdir(staging))
        seen["target_exists"] = os.path.exists(final)
        real(staging, final, run_id)

    monkeypatch.setattr(atomic, "rename_into_place", check)
    publish(st, manifest, success)
    staged = ["_SUCCESS", "_manifest.json", "_owner.json", "_quarantine", "part-00000.parquet"]
    assert seen == {"staged": staged, "target_exists": False}
    assert sorted(os.listdir(target.uri)) == ["_SUCCESS", "_manifest.json", "_quarantine", "part-00000.parquet"]


def test_overwrite_swaps_the_whole_partition_in_one_step(tmp_path, monkeypatch):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    old, manifest, success = stage_run(target, [3, 3, 3])
    publish(old, manifest, success)
    new, manifest, success = stage_run(target, [5])
    observed = {}
    real = atomic.exchange

    def exchange(a, b):
        observed["before"] = (commit.committed_run(target)["run_id"], visible_parquet(target))
        swapped = real(a, b)
        observed["after"] = (commit.committed_run(target)["run_id"], visible_parquet(target))
        return swapped

    monkeypatch.setattr(atomic, "exchange", exchange)
    publish(new, manifest, success)
    old_files = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert observed == {"before": (old.run_id, old_files), "after": (new.run_id, ["part-00000.parquet"])}
    assert set(commit.read_committed(target).column("run_id").to_pylist()) == {new.run_id}
    assert os.listdir(tmp_path / "out") == ["date=d1"]  # the previous partition is gone, no staging left


def test_overwrite_falls_back_to_two_renames_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    target = Target(str(tmp_path / "out"))
    for rows in ([2, 2], [3]):
        st, manifest, success = stage_run(target, rows)
        publish(st, manifest, success)
    assert visible_parquet(target) == ["part-00000.parquet"]
    assert commit.read_committed(target).column("run_id").to_pylist() == [st.run_id] * 3
    assert os.listdir(tmp_path) == ["out"]


def test_publish_refuses_once_the_lease_is_lost(tmp_path):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    st, manifest, success = stage_run(target, [2])
    with commit.lease(target) as held:
        os.remove(tmp_path / "out" / "_lease-date=d1")  # e.g. removed by hand; another run may take it
        with pytest.raises(commit.LeaseLostError, match="removed while this run held it"):
            commit.publish(st, manifest, success, held)
    assert not os.path.exists(target.uri) and commit.committed_run(target) is None


# --------------------------------------------------------------------------------------------------
# S3 (moto server): no rename, a short copy phase gated by _SUCCESS
# --------------------------------------------------------------------------------------------------


class RecordingFS:
    """Delegates to a pyarrow filesystem, records mutating calls, optionally fails the n-th copy."""

    def __init__(self, fs, fail_on_copy: int | None = None):
        self._fs, self.ops, self._fail, self._copies = fs, [], fail_on_copy, 0

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in ("copy_file", "delete_file", "open_output_stream", "delete_dir", "delete_dir_contents"):
            return attr

        def call(*args, **kwargs):
            if name == "copy_file":
                self._copies += 1
                if self._copies == self._fail:
                    raise OSError("simulated crash during the copy phase")
            self.ops.append((name, args[-1] if name == "copy_file" else args[0]))
            return attr(*args, **kwargs)

        return call


def test_s3_publish_writes_markers_last_and_leaves_no_stale_names(s3_target):
    old, manifest, success = stage_run(s3_target, [2, 2, 2])
    publish(old, manifest, success)
    new, manifest, success = stage_run(s3_target, [3, 1], bad=1)
    recording = RecordingFS(new.fs)
    publish(dataclasses.replace(new, fs=recording), manifest, success)

    final = new.final
    assert recording.ops[0] == ("delete_file", f"{final}/_SUCCESS")  # gated readers wait from here on
    writes = [path for op, path in recording.ops if op in ("open_output_stream", "copy_file")]
    assert writes[-2:] == [f"{final}/_manifest.json", f"{final}/_SUCCESS"]
    assert ("delete_file", f"{final}/part-00002.parquet") in recording.ops
    assert visible_parquet(s3_target) == ["part-00000.parquet", "part-00001.parquet"]
    assert sorted(commit.read_committed(s3_target).column("run_id").to_pylist()) == [new.run_id] * 4
    fs, path = s3_target.resolve()
    assert pq.read_table(f"{path}/{commit.QUARANTINE_FILE}", filesystem=fs).num_rows == 1
    assert not staging_dirs(fs, path)


def test_s3_crash_in_the_copy_phase_is_never_committed_and_a_rerun_repairs_it(s3_target):
    first, manifest, success = stage_run(s3_target, [2, 2, 2])
    publish(first, manifest, success)
    crashed, manifest, success = stage_run(s3_target, [4, 4])
    with pytest.raises(OSError, match="simulated crash"):
        publish(dataclasses.replace(crashed, fs=RecordingFS(crashed.fs, fail_on_copy=2)), manifest, success)
    assert commit.committed_run(s3_target) is None  # _SUCCESS went first: gated readers never mix runs
    with pytest.raises(FileNotFoundError, match="no committed scoring output"):
        commit.committed_files(s3_target)
    mark_owner_dead(crashed)

    rerun, manifest, success = stage_run(s3_target, [4, 4])  # its open_staging removes the crashed staging
    publish(rerun, manifest, success)
    fs, path = s3_target.resolve()
    assert staging_dirs(fs, path) == []
    assert visible_parquet(s3_target) == ["part-00000.parquet", "part-00001.parquet"]
    ids = commit.read_committed(s3_target).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8 and all(i.startswith(rerun.run_id) for i in ids)
