"""Scoring end to end on the session's Ray: layout, no-op rerun, SIGKILL + resume, atomic overwrite,
--evaluate, too many bad rows, and the same commit guarantees on S3 (moto).

The runs that matter as processes (the baseline and every killed run) go through the real ``mmray score``
CLI; reruns call ``run_scoring`` in this process, which already holds the session's Ray.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from mmray.config import StorageConfig, load_config
from mmray.data import storage
from mmray.data.pipeline import DataQualityError
from mmray.score import commit
from mmray.score.job import run_scoring
from tests.helpers import REPO, run_cli
from tests.score.conftest import CLASSES, write_input

pytestmark = pytest.mark.integration

DATE = "2024-05-01"
ROWS = 600
FILES = ROWS // 50  # score.rows_per_file=50 below
FAST = ["data.preprocess.batch_size=64", "score.batch_size=64", "score.rows_per_file=50"]
SLOW = ["data.preprocess.batch_size=2", "score.batch_size=2", "score.rows_per_file=50"]  # seconds of writing


def score_args(checkpoint: str, source: str, output: str, *extra: str) -> list[str]:
    return [
        "score",
        "--checkpoint",
        checkpoint,
        "--input",
        source,
        "--output",
        output,
        "--partition",
        f"date={DATE}",
        *extra,
    ]


def score_here(checkpoint: str, source: str, output: str, *overrides: str, **kwargs) -> dict:
    """``run_scoring`` in this process (no interpreter start-up), partitioned like the CLI runs."""
    return run_scoring(load_config(None, list(overrides)), checkpoint, source, output, {"date": DATE}, **kwargs)


def by_id(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "duplicate ids in the output"
    return {r["id"]: r for r in rows}


def assert_same_predictions(got: pa.Table, want: pa.Table) -> None:
    """Same ids, same classes, same probabilities (bit-identical here; 1e-6 allows another BLAS path)."""
    got, want = by_id(got), by_id(want)
    assert got.keys() == want.keys()
    for i, row in got.items():
        assert row["prediction"] == want[i]["prediction"]
        np.testing.assert_allclose(row["probabilities"], want[i]["probabilities"], rtol=0, atol=1e-6)


def left_in(out: Path) -> list[str]:
    """The output directory's entries, less the (hidden, empty) lock file the committer keeps beside a
    local partition: ``_lease-<partition>``."""
    return sorted(n for n in os.listdir(out) if not n.startswith("_lease-"))


def start_killable(args: list[str], ray_address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "mmray.cli", *args], cwd=REPO, env=env, stdout=f, stderr=f)


def kill_at(proc: subprocess.Popen, writing, log: Path, delay: float = 0.0, timeout: float = 300) -> bool:
    """SIGKILLs ``proc`` ``delay`` seconds after ``writing()`` first reports staged data files.

    Returns:
        True when the kill landed; False when the run had already ended by itself (successfully).
    """
    deadline = time.monotonic() + timeout
    while not writing():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc={proc.returncode}) before it wrote anything:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run never started writing")
        time.sleep(0.02)
    try:
        proc.wait(timeout=delay)  # a run that finishes meanwhile is an outcome too, not an error
    except subprocess.TimeoutExpired:
        pass
    if proc.poll() is not None:
        assert proc.returncode == 0, log.read_text()[-3000:]
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.returncode == 0:  # it finished between the poll and the signal: an outcome too
        return False
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return True


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    return write_input(tmp_path_factory.mktemp("score_in") / "in", ROWS, seed=11, prefix="k")


@pytest.fixture(scope="module")
def reference(trained, source, ray_address, tmp_path_factory) -> dict:
    """One uninterrupted run (with --evaluate: the input is labelled): the baseline for the other tests."""
    out = tmp_path_factory.mktemp("reference") / "preds"
    args = score_args(trained["checkpoint"], source["path"], str(out), "--evaluate", *FAST)
    result = run_cli(args, ray_address).json
    target = commit.Target(str(out), {"date": DATE})
    return {"out": out, "target": target, "result": result, "table": commit.read_committed(target)}


def test_committed_output_has_every_id_once_in_sized_files_with_lineage(reference, source, trained):
    out, result = reference["out"], reference["result"]
    partition = out / f"date={DATE}"
    assert result["status"] == "committed" and result["rows_in"] == result["rows_scored"] == ROWS
    assert left_in(out) == [f"date={DATE}"]  # no staging left behind
    assert sorted(os.listdir(partition)) == [
        "_SUCCESS",
        "_manifest.json",
        "_metrics.json",
        "_quarantine",
        *(f"part-{i:05d}.parquet" for i in range(FILES)),
    ]
    assert [pq.read_metadata(partition / f"part-{i:05d}.parquet").num_rows for i in range(FILES)] == [50] * FILES
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()  # a plain reader
    assert sorted(by_id(table)) == sorted(source["ids"])
    assert table.column_names == [
        "id",
        "prediction",
        "confidence",
        "probabilities",
        "model_id",
        "scored_at",
        "run_id",
        "date",
    ]
    assert set(table.column("prediction").to_pylist()) <= set(CLASSES)
    assert set(table.column("model_id").to_pylist()) == {result["model_id"]}
    assert set(table.column("run_id").to_pylist()) == {result["run_id"]}
    manifest = json.loads((partition / "_manifest.json").read_text())
    assert manifest["checkpoint"] == trained["checkpoint"] and manifest["tasks"][0]["classes"] == list(CLASSES)
    assert [f["name"] for f in manifest["files"]] == [f"part-{i:05d}.parquet" for i in range(FILES)]
    inputs = {Path(i["path"]).name for i in manifest["identity"]["inputs"]}
    assert inputs == {"part-00000.parquet", "part-00001.parquet"}
    assert json.loads((partition / "_SUCCESS").read_text())["rows_quarantined"] == 0


def test_rerun_is_a_noop_that_says_so(reference, source, trained, capfd):
    partition = reference["out"] / f"date={DATE}"
    before = {p.name: p.stat().st_mtime_ns for p in partition.rglob("*")}
    result = score_here(trained["checkpoint"], source["path"], str(reference["out"]), *FAST, evaluate=True)
    assert result["status"] == "already scored" and result["run_id"] == reference["result"]["run_id"]
    assert "already scored" in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in partition.rglob("*")} == before


def test_a_different_setting_or_model_needs_overwrite(reference, source, trained, tiny_checkpoint):
    with pytest.raises(commit.OutputExistsError, match=r"rows_per_file.*Pass --overwrite"):
        score_here(trained["checkpoint"], source["path"], str(reference["out"]), "score.rows_per_file=7")
    with pytest.raises(commit.OutputExistsError, match=r"model_id .* -> .*Pass --overwrite"):
        score_here(str(tiny_checkpoint), source["path"], str(reference["out"]), *FAST)


# Seconds after the first staged file appears: at once (mid-write), and later, when the run may be
# copying, committing or already done. Whichever outcome a kill produced, the output must be either
# nothing visible or a complete commit; a run is never seen half-written.
KILL_DELAYS = (0.0, 0.5, 2.0)


def test_killed_runs_leave_nothing_visible_or_a_complete_commit_and_a_rerun_scores_every_id_exactly_once(
    reference, source, trained, ray_address, tmp_path
):
    before_commit = []
    for delay in KILL_DELAYS:
        out = tmp_path / f"preds-{delay}"
        log = tmp_path / f"killed-{delay}.log"
        proc = start_killable(score_args(trained["checkpoint"], source["path"], str(out), *SLOW), ray_address, log)
        staged = str(out / f"_staging-*-date={DATE}" / "_raw" / "*.parquet")
        killed = kill_at(proc, lambda staged=staged: glob.glob(staged), log, delay=delay)
        partition = out / f"date={DATE}"
        if partition.exists():  # the commit (one rename) happened before the kill, or there was no kill
            assert sorted(p.name for p in partition.glob("part-*")) == [f"part-{i:05d}.parquet" for i in range(FILES)]
            assert (partition / "_SUCCESS").exists() and (partition / "_manifest.json").exists()
            table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
            assert_same_predictions(table.drop_columns(["date"]), reference["table"])  # every id exactly once
        else:
            assert killed, f"delay {delay}: the run ended without committing:\n{log.read_text()[-3000:]}"
            assert pads.dataset(str(out), format="parquet").count_rows() == 0  # plain readers see nothing
            assert glob.glob(str(out / "_staging-*"))  # only hidden staging is left
            before_commit.append(out)
    assert before_commit, "every kill landed after the commit: nothing showed that a killed run stays invisible"

    out = before_commit[0]
    result = score_here(trained["checkpoint"], source["path"], str(out), *FAST)
    assert result["status"] == "committed" and result["rows_scored"] == ROWS
    assert left_in(out) == [f"date={DATE}"]  # the killed run's staging was cleaned
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert_same_predictions(table.drop_columns(["date"]), reference["table"])


def _snapshot(path: Path):
    """One consistent view of a directory (read through its fd), or None when it was replaced meanwhile."""
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return "missing"
    try:
        names = os.listdir(dfd)

        def read(name: str) -> bytes:
            fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                return f.read()

        success = json.loads(read("_SUCCESS")) if "_SUCCESS" in names else None
        parts = [
            pq.read_table(pa.BufferReader(read(n)))
            for n in sorted(names)
            if n.endswith(".parquet") and not n.startswith(("_", "."))
        ]
    except FileNotFoundError:
        parts = None  # files vanished: only the replaced (old) directory loses files
    if os.stat(path).st_ino != os.fstat(dfd).st_ino:
        os.close(dfd)
        return None
    os.close(dfd)
    assert parts is not None, "files vanished from the current partition directory"
    table = pa.concat_tables(parts) if parts else None
    run_ids = frozenset(table.column("run_id").to_pylist()) if table is not None else frozenset()
    return (success or {}).get("run_id"), run_ids, table.num_rows if table is not None else 0


def test_overwrite_replaces_the_partition_atomically(reference, source, trained, tmp_path):
    out = tmp_path / "preds"
    shutil.copytree(reference["out"], out)
    partition, old_run = out / f"date={DATE}", reference["result"]["run_id"]
    views, failures, stop = [], [], threading.Event()

    def reader():
        # As fast as the filesystem allows. An exception here would only be a warning in pytest, so
        # it is kept and raised by the test itself; a file vanishing under the reader is one.
        try:
            while not stop.is_set():
                view = _snapshot(partition)
                if view is not None:
                    views.append(view)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread below
            failures.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        result = score_here(
            trained["checkpoint"], source["path"], str(out), *FAST, "score.rows_per_file=120", overwrite=True
        )
    finally:
        stop.set()
        thread.join()
    if failures:
        raise AssertionError(f"the reader failed while the partition was swapped: {failures[0]!r}") from failures[0]
    views.append(_snapshot(partition))
    new_run = result["run_id"]
    assert "missing" not in views  # never a moment without the partition
    old_view, new_view = (old_run, frozenset([old_run]), ROWS), (new_run, frozenset([new_run]), ROWS)
    assert views[0] == old_view and views[-1] == new_view
    assert set(views) == {old_view, new_view}, "a reader saw a mixed state"
    assert sorted(p.name for p in partition.glob("part-*")) == [f"part-{i:05d}.parquet" for i in range(5)]
    assert left_in(out) == [f"date={DATE}"]
    assert_same_predictions(commit.read_committed(commit.Target(str(out), {"date": DATE})), reference["table"])


def test_evaluate_writes_training_metrics_next_to_the_output(reference, source):
    partition = reference["out"] / f"date={DATE}"
    metrics = json.loads((partition / "_metrics.json").read_text())
    assert metrics == pytest.approx(reference["result"]["metrics"])
    assert metrics["rows"] == ROWS and metrics["rows_unlabeled"] == 0
    assert {"loss", "accuracy", "macro_f1", "label/accuracy"} <= set(metrics)
    truth = pq.read_table(source["path"], columns=["id", "label"])
    labels = dict(zip(truth.column("id").to_pylist(), truth.column("label").to_pylist()))
    correct = [labels[r["id"]] == r["prediction"] for r in reference["table"].to_pylist()]
    assert metrics["accuracy"] == pytest.approx(np.mean(correct))
    assert json.loads((partition / "_manifest.json").read_text())["metrics"] == "_metrics.json"


def test_too_many_bad_rows_writes_the_quarantine_and_commits_nothing(trained, tmp_path):
    bad = write_input(tmp_path / "bad", 40, seed=13, prefix="b", bad=10)
    out = tmp_path / "preds"
    with pytest.raises(DataQualityError) as e:
        score_here(trained["checkpoint"], bad["path"], str(out), "data.max_bad_fraction=0.2")
    partition = out / f"date={DATE}"
    assert "10 of 40 rows (25.0%) were quarantined, above data.max_bad_fraction=0.2" in str(e.value)
    assert "nothing was committed" in str(e.value) and str(partition / commit.QUARANTINE_FILE) in str(e.value)
    assert sorted(os.listdir(partition)) == ["_quarantine"]  # no data, no markers
    assert sorted(pq.read_table(partition / commit.QUARANTINE_FILE).column("id").to_pylist()) == sorted(bad["bad_ids"])
    assert pads.dataset(str(out), format="parquet").count_rows() == 0 and left_in(out) == [f"date={DATE}"]


# --------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------


def test_on_s3_a_killed_run_is_invisible_resumes_exactly_once_reruns_as_noop_and_overwrites_cleanly(
    reference, source, trained, ray_address, s3_server, s3_bucket, tmp_path
):
    store = StorageConfig(s3_endpoint_url=s3_server)
    ckpt = f"s3://{s3_bucket}/ckpt"
    storage.copy_dir_to(trained["checkpoint"], ckpt, store)  # predictor actors fetch it themselves
    out = f"s3://{s3_bucket}/preds"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")

    def objects() -> dict[str, str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="preds/")
        return {o["Key"]: o["ETag"] + str(o["LastModified"]) for p in pages for o in p.get("Contents", [])}

    def visible() -> list[str]:
        """Data a plain reader would pick up: not hidden, not a (zero-byte) directory marker."""

        def hidden(key: str) -> bool:
            return any(part.startswith(("_", ".")) for part in key.split("/"))

        return sorted(k for k in objects() if not k.endswith("/") and not hidden(k))

    endpoint = f"storage.s3_endpoint_url={s3_server}"
    proc = start_killable(score_args(ckpt, source["path"], out, *SLOW, endpoint), ray_address, tmp_path / "k.log")
    assert kill_at(proc, lambda: any("/_raw/" in k for k in objects()), tmp_path / "k.log"), "the run ended first"
    assert visible() == [] and not any(k.endswith("_SUCCESS") for k in objects())

    result = score_here(ckpt, source["path"], out, *FAST, endpoint)
    target = commit.Target(out, {"date": DATE}, store)
    assert result["status"] == "committed" and result["model_id"] == reference["result"]["model_id"]
    assert not any("_staging-" in k for k in objects())  # the killed run's staging was cleaned
    assert visible() == [f"preds/date={DATE}/part-{i:05d}.parquet" for i in range(FILES)]
    assert_same_predictions(commit.read_committed(target), reference["table"])

    before = objects()
    assert score_here(ckpt, source["path"], out, *FAST, endpoint)["status"] == "already scored"
    assert objects() == before

    score_here(ckpt, source["path"], out, *FAST, "score.rows_per_file=1000", endpoint, overwrite=True)
    assert visible() == [f"preds/date={DATE}/part-00000.parquet"]  # the stale names are gone
    assert_same_predictions(commit.read_committed(target), reference["table"])
