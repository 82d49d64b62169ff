"""Two real ``mmray score`` processes on one target, running at once, locally and on S3 (moto).

The overlap is made certain, not hoped for: scorer A starts, and once the target's lease names A and A
has joined Ray (it is scoring), A is stopped (SIGSTOP), so it holds the lease for as long as it takes
scorer B to run from start to end; then A goes on. B must find the lease held (exit 2, one line naming
A's pid, nothing done), A must commit, and the commit must hold every input id exactly once, all A's.
A run that arrives after the commit is a no-op naming it ("already scored"). Both processes join the
session's Ray.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from mmray.config import StorageConfig
from mmray.score import commit
from mmray.score.commit.target import LEASE, companion
from tests.helpers import CLI_TIMEOUT, REPO, run_cli
from tests.score.conftest import write_input

pytestmark = pytest.mark.integration

ROWS = 40
TINY = ["data.preprocess.batch_size=16", "score.batch_size=16", "score.rows_per_file=16"]
DATE = "2024-05-01"
# init_ray's line: A is stopped after it, under the lease, and not inside ray.init, where the stop would
# test Ray's connection timeouts instead of the lease.
JOINED = "mmray: joined the Ray cluster at"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    return write_input(tmp_path_factory.mktemp("race_in") / "in", ROWS, seed=21, prefix="r")


def lease_holder(target: commit.Target) -> dict | None:
    """The record in ``target``'s lease (a file beside a local target, an object in an S3 one); None
    while there is none, or while its holder is still writing it."""
    fs, final = target.resolve()
    try:
        with fs.open_input_stream(companion(fs, final, LEASE)) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def score_during_lease(args: list[str], target: commit.Target, ray_address: str, logs: Path) -> tuple[dict, dict]:
    """Runs scorer B from start to end while scorer A holds ``target``'s lease: A is stopped once the
    lease names it and it has joined Ray, and continued once B has exited.

    Returns:
        (A, B), each ``{"rc", "json", "stderr"}``, A's with its ``"pid"``. Fails when A ends before it
        is caught scoring, or when the lease changed while A was stopped.
    """
    a_out, a_err = logs / "a.out", logs / "a.err"
    with open(a_out, "w") as out, open(a_err, "w") as err:
        a = subprocess.Popen(
            [sys.executable, "-m", "mmray.cli", "score", *args],
            cwd=REPO,
            env={**os.environ, "RAY_ADDRESS": ray_address},
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        while (held := lease_holder(target) or {}).get("pid") != a.pid or JOINED not in a_err.read_text():
            assert a.poll() is None, f"A ended before it was caught scoring:\n{a_err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"A was never caught scoring:\n{a_err.read_text()[-3000:]}"
            time.sleep(0.02)
        a.send_signal(signal.SIGSTOP)
        b = run_cli(["score", *args], ray_address, check=False)
        # A's record, unchanged (an S3 lease is not even renewed): A held the lease all through B's run.
        assert lease_holder(target) == held, (
            f"the lease changed while A was stopped; B exited {b.returncode}:\n{b.stderr[-2000:]}"
        )
    finally:
        a.send_signal(signal.SIGCONT)
        try:
            a.wait(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            a.kill()
            raise
    lines = [line for line in a_out.read_text().splitlines() if line.strip()]
    first = {"pid": a.pid, "rc": a.returncode, "stderr": a_err.read_text()}
    first["json"] = json.loads(lines[-1]) if a.returncode == 0 else None
    return first, {"rc": b.returncode, "json": b.json, "stderr": b.stderr}


def one_commit(a: dict, b: dict, target_uri: str) -> dict:
    """Checks the overlap's outcome: B refused because of A's lease and did nothing, A committed;
    returns A's JSON."""
    for r in (a, b):
        assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    assert b["rc"] == 2, (b["rc"], b["json"], b["stderr"][-3000:])
    last = b["stderr"].strip().splitlines()[-1]
    holder = f"(pid {a['pid']} on host {socket.gethostname()} since "  # A: B saw A's lease
    assert last.startswith(f"mmray score: error: {target_uri} is being scored by another run {holder}"), last
    assert last.endswith("; nothing was done: rerun after it finishes"), last
    assert a["rc"] == 0 and a["json"]["status"] == "committed", (a["rc"], a["stderr"][-3000:])
    return a["json"]


def assert_every_id_once(target: commit.Target, winner: dict, source: dict) -> None:
    table = commit.read_committed(target)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(source["ids"]) and len(ids) == len(set(ids)) == ROWS
    assert set(table.column("run_id").to_pylist()) == {winner["run_id"]}
    assert commit.committed_run(target)["run_id"] == winner["run_id"]


def assert_already_scored(args: list[str], ray_address: str, winner: dict) -> None:
    """Two more runs, started together after the commit: both are no-ops naming it."""
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    command = [sys.executable, "-m", "mmray.cli", "score", *args]
    procs = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert (result["status"], result["run_id"]) == ("already scored", winner["run_id"])
        assert {k: result[k] for k in ("rows_in", "rows_scored", "rows_quarantined")} == {
            k: winner[k] for k in ("rows_in", "rows_scored", "rows_quarantined")
        }


def _score_args(trained: dict, source: dict, out: str, *overrides: str) -> list[str]:
    """``mmray score`` arguments for the racing partition of ``source``."""
    where = ["--checkpoint", trained["checkpoint"], "--input", source["path"], "--output", out]
    return [*where, "--partition", f"date={DATE}", *TINY, *overrides]


def test_two_local_scorers_of_one_partition_commit_exactly_once(trained, source, ray_address, tmp_path):
    out = tmp_path / "preds"
    target = commit.Target(str(out), {"date": DATE})
    args = _score_args(trained, source, str(out))
    winner = one_commit(*score_during_lease(args, target, ray_address, tmp_path), target.uri)
    assert_every_id_once(target, winner, source)
    assert sorted(os.listdir(out)) == [f"date={DATE}"]  # no staging, no lease left
    assert_already_scored(args, ray_address, winner)


def test_two_s3_scorers_of_one_partition_commit_exactly_once(
    trained, source, ray_address, s3_server, s3_bucket, tmp_path
):
    out = f"s3://{s3_bucket}/preds"
    target = commit.Target(out, {"date": DATE}, StorageConfig(s3_endpoint_url=s3_server))
    args = _score_args(trained, source, out, f"storage.s3_endpoint_url={s3_server}")
    winner = one_commit(*score_during_lease(args, target, ray_address, tmp_path), target.uri)
    assert_every_id_once(target, winner, source)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="preds/")["Contents"]]
    assert not [k for k in keys if "_staging-" in k or k.endswith("/_lease")]  # released, cleaned
    assert_already_scored(args, ray_address, winner)
