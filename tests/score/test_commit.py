"""The commit protocol on its own (no Ray): staging, publish, markers, stale staging, S3 copy phase."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mmray.config import StorageConfig
from mmray.data import schema as S
from mmray.score import commit
from mmray.score.commit import Target


def stage_run(target: Target, file_rows: list[int], bad: int = 0) -> tuple[commit.Staging, dict, dict]:
    """A complete staging directory: data files whose rows name the run, a quarantine, markers to write."""
    st = commit.open_staging(target, uuid.uuid4().hex[:12])
    files = []
    for i, n in enumerate(file_rows):
        name = f"part-{i:05d}.parquet"
        ids = [f"{st.run_id}-{i}-{j}" for j in range(n)]
        pq.write_table(pa.table({"id": ids, "run_id": [st.run_id] * n}), st.file(name), filesystem=st.fs)
        files.append({"name": name, "rows": n})
    st.fs.create_dir(st.file(commit.QUARANTINE), recursive=True)
    quarantine = pa.table({"id": [f"bad{j}" for j in range(bad)], "stage": ["preprocess"] * bad,
                           "column": ["image"] * bad, "error": ["x"] * bad}, schema=S.QUARANTINE_SCHEMA)  # fmt: skip
    pq.write_table(quarantine, st.file(commit.QUARANTINE_FILE), filesystem=st.fs)
    counts = {"rows_in": sum(file_rows) + bad, "rows_scored": sum(file_rows), "rows_quarantined": bad}
    identity = commit.run_identity([], "m1", {"rows_per_file": 10}, target.partition)
    manifest = {"run_id": st.run_id, "files": files, "identity": identity, **counts}
    return st, manifest, {"run_id": st.run_id, **counts}


def publish(st: commit.Staging, manifest: dict, success: dict) -> None:
    """``commit.publish`` under the target's lease, as a scoring run does it."""
    with commit.lease(st.target) as held:
        commit.publish(st, manifest, success, held)


def visible_parquet(target: Target) -> list[str]:
    """What a plain Parquet reader sees: non-hidden files under the target."""
    fs, path = target.resolve()
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(os.path.basename(i.path) for i in infos
                  if i.type == pafs.FileType.File and not os.path.basename(i.path).startswith(("_", ".")))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Partition values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("partition", [{"date": "2024-05-01"}, {"region": "eu_west-1", "hour": "07"},
                                       {"d": "2024-05-01T00:00"}])  # fmt: skip
def test_valid_partitions_become_hive_paths_with_sorted_keys(tmp_path, partition):
    target = Target(str(tmp_path / "out"), partition)
    assert target.uri == os.path.join(tmp_path, "out", *(f"{k}={partition[k]}" for k in sorted(partition)))


def test_partition_key_order_is_one_target_and_one_identity(tmp_path):
    ab, ba = Target(str(tmp_path / "out"), {"a": "1", "b": "2"}), Target(str(tmp_path / "out"), {"b": "2", "a": "1"})
    assert ab.uri == ba.uri == os.path.join(tmp_path, "out", "a=1", "b=2")
    assert commit.run_identity([], "m", {}, ab.partition) == commit.run_identity([], "m", {}, {"b": "2", "a": "1"})


BAD_VALUES = {  # partition value -> what the error names
    "../../etc": "'/'", "..": "'..'", "a..b": "'..'", "2024/05": "'/'", "a\\b": "'\\\\'", "x\ny": "'\\n'",
    "x\x00": "'\\x00'", "a=b": "'='", "2024-*": "'*'", "": "non-empty",
}  # fmt: skip
BAD_KEYS = ("_date", "da/te", "")


@pytest.mark.parametrize(
    "partition, fragment",
    [*(({"date": v}, f) for v, f in BAD_VALUES.items()), *(({k: "1"}, "invalid partition key") for k in BAD_KEYS)],
)
def test_invalid_partitions_are_refused_before_any_path_is_built(partition, fragment):
    with pytest.raises(ValueError) as e:
        Target("/tmp/never-created", partition)
    assert fragment in str(e.value)


# --------------------------------------------------------------------------------------------------
# Local disk
# --------------------------------------------------------------------------------------------------


def test_staging_is_invisible_and_publish_makes_exactly_the_manifest_files_visible(tmp_path):
    target = Target(str(tmp_path / "out"), {"date": "2024-05-01"})
    st, manifest, success = stage_run(target, [4, 4, 2], bad=1)
    assert not os.path.exists(target.uri)
    assert pads.dataset(str(tmp_path / "out"), format="parquet").count_rows() == 0  # staging is hidden
    assert commit.committed_run(target) is None

    publish(st, manifest, success)

    assert visible_parquet(target) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(os.listdir(target.uri)) == ["_SUCCESS", "_manifest.json", "_quarantine", "part-00000.parquet",
                                              "part-00001.parquet", "part-00002.parquet"]  # fmt: skip
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
    real = commit._rename_into_place

    def check(staging, final, run_id):
        seen["staged"] = sorted(os.listdir(staging))
        seen["target_exists"] = os.path.exists(final)
        real(staging, final, run_id)

    monkeypatch.setattr(commit, "_rename_into_place", check)
    publish(st, manifest, success)
    assert seen == {"staged": ["_SUCCESS", "_manifest.json", "_owner.json", "_quarantine", "part-00000.parquet"],
                    "target_exists": False}  # fmt: skip
    assert sorted(os.listdir(target.uri)) == ["_SUCCESS", "_manifest.json", "_quarantine", "part-00000.parquet"]


def test_overwrite_swaps_the_whole_partition_in_one_step(tmp_path, monkeypatch):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    old, manifest, success = stage_run(target, [3, 3, 3])
    publish(old, manifest, success)
    new, manifest, success = stage_run(target, [5])
    observed = {}
    real = commit._exchange

    def exchange(a, b):
        observed["before"] = (commit.committed_run(target)["run_id"], visible_parquet(target))
        swapped = real(a, b)
        observed["after"] = (commit.committed_run(target)["run_id"], visible_parquet(target))
        return swapped

    monkeypatch.setattr(commit, "_exchange", exchange)
    publish(new, manifest, success)
    old_files = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert observed == {"before": (old.run_id, old_files), "after": (new.run_id, ["part-00000.parquet"])}
    assert set(commit.read_committed(target).column("run_id").to_pylist()) == {new.run_id}
    assert os.listdir(tmp_path / "out") == ["date=d1"]  # the previous partition is gone, no staging left


def test_overwrite_falls_back_to_two_renames_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(commit, "_exchange", lambda a, b: False)
    target = Target(str(tmp_path / "out"))
    for rows in ([2, 2], [3]):
        st, manifest, success = stage_run(target, rows)
        publish(st, manifest, success)
    assert visible_parquet(target) == ["part-00000.parquet"]
    assert commit.read_committed(target).column("run_id").to_pylist() == [st.run_id] * 3
    assert os.listdir(tmp_path) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def mark_owner_dead(st: commit.Staging) -> None:
    """As if the process that owns ``st`` had been killed."""
    owner = {"host": os.uname().nodename, "pid": _dead_pid(), "token": "gone", "created": 0}
    with st.fs.open_output_stream(st.file("_owner.json")) as f:
        f.write(json.dumps(owner).encode())


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


def test_rejected_quarantine_never_touches_a_committed_result(tmp_path):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    bad = pa.table({"id": ["x"], "stage": ["preprocess"], "column": ["image"], "error": ["boom"]},
                   schema=S.QUARANTINE_SCHEMA)  # fmt: skip
    first = commit.write_rejected_quarantine(target, bad, "e" * 12)
    assert first == os.path.join(target.uri, "_quarantine", "part-00000.parquet")
    assert commit.committed_run(target) is None and visible_parquet(target) == []

    st, manifest, success = stage_run(target, [2], bad=2)
    publish(st, manifest, success)
    second = commit.write_rejected_quarantine(target, bad, "f" * 12)
    assert second == os.path.join(target.uri, "_quarantine", f"_rejected-{'f' * 12}.parquet")
    assert pq.read_table(os.path.join(target.uri, commit.QUARANTINE_FILE)).num_rows == 2  # the committed one
    assert commit.committed_run(target)["run_id"] == st.run_id


def test_a_target_holding_foreign_data_is_never_replaced(tmp_path):
    user_data = tmp_path / "warehouse"
    (user_data / "events").mkdir(parents=True)
    (user_data / "report.csv").write_text("a,b\n")
    with pytest.raises(commit.OutputExistsError, match=r"holds data mmray did not write \(events, report.csv\)"):
        commit.check_replaceable(Target(str(user_data)))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(commit.OutputExistsError, match="is a file"):
        commit.check_replaceable(Target(str(tmp_path / "afile")))

    target = Target(str(tmp_path / "out"), {"date": "d1"})
    commit.check_replaceable(target)  # absent
    os.makedirs(os.path.join(target.uri, "_quarantine"))
    commit.check_replaceable(target)  # a rejected run's quarantine only
    st, manifest, success = stage_run(target, [2])
    publish(st, manifest, success)
    commit.check_replaceable(target)  # a commit
    with pytest.raises(commit.OutputExistsError, match="date=d1"):
        commit.check_replaceable(Target(str(tmp_path / "out")))  # the root of partitions is not a commit


def test_identity_changes_with_model_inputs_settings_and_partition(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"x")
    fs, _ = commit.storage.resolve(str(tmp_path))
    inputs = commit.fingerprint_inputs([str(tmp_path / "a.parquet")], fs)
    base = commit.run_identity(inputs, "m1", {"rows_per_file": 10}, {"date": "d1"})
    assert base == commit.run_identity(inputs, "m1", {"rows_per_file": 10}, {"date": "d1"})
    changed = {
        "model": commit.run_identity(inputs, "m2", {"rows_per_file": 10}, {"date": "d1"}),
        "settings": commit.run_identity(inputs, "m1", {"rows_per_file": 11}, {"date": "d1"}),
        "partition": commit.run_identity(inputs, "m1", {"rows_per_file": 10}, {"date": "d2"}),
        "inputs": commit.run_identity([{**inputs[0], "size": 2}], "m1", {"rows_per_file": 10}, {"date": "d1"}),
    }
    assert len({base["digest"], *(c["digest"] for c in changed.values())}) == 5
    assert commit.identity_differences(base, changed["model"]) == ["model_id m1 -> m2"]
    assert "input files changed" in commit.identity_differences(base, changed["inputs"])[0]


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


@pytest.fixture
def s3_target(s3_server, s3_bucket) -> Target:
    return Target(f"s3://{s3_bucket}/preds", {"date": "2024-05-01"}, StorageConfig(s3_endpoint_url=s3_server))


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
    assert not commit._staging_dirs(fs, path)


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
    assert commit._staging_dirs(fs, path) == []
    assert visible_parquet(s3_target) == ["part-00000.parquet", "part-00001.parquet"]
    ids = commit.read_committed(s3_target).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8 and all(i.startswith(rerun.run_id) for i in ids)


# --------------------------------------------------------------------------------------------------
# The local commit path: what may be replaced, owner records, the two-rename fallback
# --------------------------------------------------------------------------------------------------


def test_a_target_with_only_hidden_entries_is_user_data_and_never_replaced(tmp_path):
    target = Target(str(tmp_path / "home"))
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "id_ed25519").write_text("secret")
    (tmp_path / "home" / "_archive").mkdir()
    with pytest.raises(commit.OutputExistsError, match=r"holds data mmray did not write \(.ssh, _archive\)"):
        commit.check_replaceable(target)
    os.makedirs(tmp_path / "empty")
    commit.check_replaceable(Target(str(tmp_path / "empty")))  # empty: fine


def test_the_owner_record_guards_staging_until_after_the_rename(tmp_path, monkeypatch):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    st, manifest, success = stage_run(target, [3])
    real = commit._rename_into_place

    def rename_after_another_runs_cleanup(staging, final, run_id):
        assert commit.clean_stale_staging(target) == []  # e.g. an "already scored" rerun's cleanup
        real(staging, final, run_id)

    monkeypatch.setattr(commit, "_rename_into_place", rename_after_another_runs_cleanup)
    publish(st, manifest, success)
    assert commit.committed_run(target)["run_id"] == st.run_id
    assert "_owner.json" not in os.listdir(target.uri) and os.listdir(tmp_path / "out") == ["date=d1"]


def test_an_unreadable_owner_record_counts_as_a_dead_owner(tmp_path):
    target = Target(str(tmp_path / "out"))
    torn, live = commit.open_staging(target, "a" * 12), commit.open_staging(target, "b" * 12)
    with open(torn.file("_owner.json"), "wb") as f:
        f.write(b'{"host": "h", "pi')  # a record cut short (written in place by an older version)
    assert commit.clean_stale_staging(target) == [torn.path]
    assert os.path.isdir(live.path)
    assert json.loads(open(live.file("_owner.json")).read())["pid"] == os.getpid()
    assert not [n for n in os.listdir(live.path) if ".tmp" in n]  # written via a temporary file, renamed


def test_two_rename_fallback_killed_between_the_renames_is_restored_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setattr(commit, "_exchange", lambda a, b: False)  # as on NFS: no renameat2 exchange
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


def test_publish_refuses_once_the_lease_is_lost(tmp_path):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    st, manifest, success = stage_run(target, [2])
    with commit.lease(target) as held:
        os.remove(tmp_path / "out" / "_lease-date=d1")  # e.g. removed by hand; another run may take it
        with pytest.raises(commit.LeaseLostError, match="removed while this run held it"):
            commit.publish(st, manifest, success, held)
    assert not os.path.exists(target.uri) and commit.committed_run(target) is None


# --------------------------------------------------------------------------------------------------
# Identity by content, and readers that never mix two publishes
# --------------------------------------------------------------------------------------------------


def test_new_content_of_the_same_size_and_mtime_is_a_new_identity(tmp_path):
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"id": ["a1", "a2", "a3"], "x": [1, 2, 3]}), path, compression="none")
    stat = os.stat(path)
    fs, _ = commit.storage.resolve(str(tmp_path))
    before = commit.fingerprint_inputs([str(path)], fs)
    pq.write_table(pa.table({"id": ["a1", "b2", "a3"], "x": [1, 5, 3]}), path, compression="none")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p / rsync -a leave it
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = commit.fingerprint_inputs([str(path)], fs)
    assert before[0]["content"] != after[0]["content"] and before[0]["content"].startswith("footer-sha256:")
    old, new = (commit.run_identity(i, "m1", {}, {}) for i in (before, after))
    assert old["digest"] != new["digest"]
    assert commit.identity_differences(old, new) == ["input files changed (paths, sizes or content)"]
    os.utime(path)  # touching a file is not new content
    assert commit.fingerprint_inputs([str(path)], fs) == after


@pytest.fixture(params=["local", "s3"])
def any_target(request, tmp_path) -> Target:
    if request.param == "local":
        return Target(str(tmp_path / "out"), {"date": "d1"})
    return request.getfixturevalue("s3_target")


def test_read_committed_never_mixes_two_publishes(any_target, monkeypatch):
    first, manifest, success = stage_run(any_target, [2, 2, 2])
    publish(first, manifest, success)
    second, manifest2, success2 = stage_run(any_target, [2, 2, 2])
    real_read = pq.read_table
    calls = []

    def read_while_another_run_publishes(*args, **kwargs):
        calls.append(args[0])
        table = real_read(*args, **kwargs)
        if len(calls) == 1:
            publish(second, manifest2, success2)  # lands after the reader picked the first manifest
        return table

    monkeypatch.setattr(pq, "read_table", read_while_another_run_publishes)
    table = commit.read_committed(any_target)
    assert table.column("run_id").to_pylist() == [second.run_id] * 6 and len(calls) > 3
