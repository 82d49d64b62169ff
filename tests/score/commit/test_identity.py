"""Run identity: it changes with the model, the input's content, the settings and the partition, and
with nothing else (not a touched file)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from mmray.data import storage
from mmray.score import commit


def test_identity_changes_with_model_inputs_settings_and_partition(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"x")
    fs, _ = storage.resolve(str(tmp_path))
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


def test_new_content_of_the_same_size_and_mtime_is_a_new_identity(tmp_path):
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"id": ["a1", "a2", "a3"], "x": [1, 2, 3]}), path, compression="none")
    stat = os.stat(path)
    fs, _ = storage.resolve(str(tmp_path))
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
