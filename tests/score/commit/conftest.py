"""Helpers for the commit protocol's tests: a complete staging directory, a publish under the lease, what
a plain Parquet reader sees, a killed owner, and S3 targets on the moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mmray.config import StorageConfig
from mmray.data import schema
from mmray.score import commit, lease
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
    ids = [f"bad{j}" for j in range(bad)]
    rows = {"id": ids, "stage": ["preprocess"] * bad, "column": ["image"] * bad, "error": ["x"] * bad}
    rows["row"] = range(sum(file_rows), sum(file_rows) + bad)
    quarantine = pa.table(rows, schema=schema.QUARANTINE_SCHEMA)
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
    names = [os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File]
    return sorted(n for n in names if not n.startswith(("_", ".")))


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def mark_owner_dead(st: commit.Staging, **fields: object) -> None:
    """As if the process that owns ``st`` (on this host, boot and PID namespace) had been killed;
    ``fields`` override the record's."""
    owner = {**lease.process_record(), "pid": _dead_pid(), "token": "gone", **fields}
    with st.fs.open_output_stream(st.file("_owner.json")) as f:
        f.write(json.dumps(owner).encode())


@pytest.fixture
def s3_target(s3_server, s3_bucket) -> Target:
    return Target(f"s3://{s3_bucket}/preds", {"date": "2024-05-01"}, StorageConfig(s3_endpoint_url=s3_server))


@pytest.fixture(params=["local", "s3"])
def any_target(request, tmp_path) -> Target:
    if request.param == "local":
        return Target(str(tmp_path / "out"), {"date": "d1"})
    return request.getfixturevalue("s3_target")
