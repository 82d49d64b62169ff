"""Two real ``mmray score`` processes on one target, started together, locally and on S3 (moto).

Each round must end with exactly one commit holding every input id exactly once; the other process
either finds the lease held (exit 2, one line naming the holder) or, when it arrives after the winner
committed, reports "already scored" with the winner's run (exit 0). Both join the session's Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from mmray.config import StorageConfig
from mmray.score import commit
from tests.helpers import CLI_TIMEOUT, REPO
from tests.score.conftest import write_input

pytestmark = pytest.mark.integration

ROWS = 40
TINY = ["data.preprocess.batch_size=16", "score.batch_size=16", "score.rows_per_file=16"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    return write_input(tmp_path_factory.mktemp("race_in") / "in", ROWS, seed=21, prefix="r")


def race(args: list[str], ray_address: str, logs: Path) -> list[dict]:
    """Starts two identical ``mmray score`` processes at once; returns each one's rc, JSON and stderr."""
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    procs = []
    for i in range(2):
        err = open(logs / f"race-{len(list(logs.iterdir()))}-{i}.log", "w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmray.cli", "score", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        procs.append((proc, err))
    results = []
    for proc, err in procs:
        try:
            out, _ = proc.communicate(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            raise
        err.seek(0)
        lines = [line for line in out.splitlines() if line.strip()]
        results.append(
            {
                "rc": proc.returncode,
                "json": json.loads(lines[-1]) if proc.returncode == 0 else None,
                "stderr": err.read(),
            }
        )
        err.close()
    return results


def one_commit(results: list[dict], target_uri: str) -> dict:
    """Checks the round's outcome: one winner, a clean loser; returns the winner's JSON."""
    for r in results:
        assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    won = [r for r in results if r["rc"] == 0 and r["json"]["status"] == "committed"]
    assert len(won) == 1, [(r["rc"], r["json"], r["stderr"][-1500:]) for r in results]
    winner = won[0]["json"]
    (loser,) = [r for r in results if r is not won[0]]
    if loser["rc"] == 2:
        last = loser["stderr"].strip().splitlines()[-1]
        assert last.startswith(f"mmray score: error: {target_uri} is being scored by another run (pid "), last
        assert "nothing was done" in last
    else:
        assert loser["rc"] == 0, loser["stderr"][-3000:]
        assert loser["json"]["status"] == "already scored" and loser["json"]["run_id"] == winner["run_id"]
        assert {k: loser["json"][k] for k in ("rows_in", "rows_scored", "rows_quarantined")} == {
            k: winner[k] for k in ("rows_in", "rows_scored", "rows_quarantined")
        }
    return winner


def assert_every_id_once(target: commit.Target, winner: dict, source: dict) -> None:
    table = commit.read_committed(target)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(source["ids"]) and len(ids) == len(set(ids)) == ROWS
    assert set(table.column("run_id").to_pylist()) == {winner["run_id"]}
    assert commit.committed_run(target)["run_id"] == winner["run_id"]


def test_two_local_scorers_of_one_partition_commit_exactly_once(trained, source, ray_address, tmp_path):
    out, logs = tmp_path / "preds", tmp_path / "logs"
    logs.mkdir()
    for date in ("2024-05-01", "2024-05-02"):
        target = commit.Target(str(out), {"date": date})
        args = [
            "--checkpoint",
            trained["checkpoint"],
            "--input",
            source["path"],
            "--output",
            str(out),
            "--partition",
            f"date={date}",
            *TINY,
        ]
        winner = one_commit(race(args, ray_address, logs), target.uri)
        assert_every_id_once(target, winner, source)
    assert sorted(os.listdir(out)) == ["date=2024-05-01", "date=2024-05-02"]  # no staging, no lease left

    # Both arrive after the commit: both are no-ops naming it.
    results = race(args, ray_address, logs)
    assert [(r["rc"], r["json"]["status"], r["json"]["run_id"]) for r in results] == [
        (0, "already scored", winner["run_id"])
    ] * 2


def test_two_s3_scorers_of_one_partition_commit_exactly_once(
    trained, source, ray_address, s3_server, s3_bucket, tmp_path
):
    out, logs = f"s3://{s3_bucket}/preds", tmp_path / "logs"
    logs.mkdir()
    store = StorageConfig(s3_endpoint_url=s3_server)
    for date in ("2024-05-01", "2024-05-02"):
        target = commit.Target(out, {"date": date}, store)
        args = [
            "--checkpoint",
            trained["checkpoint"],
            "--input",
            source["path"],
            "--output",
            out,
            "--partition",
            f"date={date}",
            *TINY,
            f"storage.s3_endpoint_url={s3_server}",
        ]
        winner = one_commit(race(args, ray_address, logs), target.uri)
        assert_every_id_once(target, winner, source)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="preds/")["Contents"]]
    assert not [k for k in keys if "_staging-" in k or k.endswith("/_lease")]  # released, cleaned
