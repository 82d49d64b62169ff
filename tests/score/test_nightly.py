"""Nightly scoring: date handling and input checks (no Ray), then the real job on three dated partitions."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from mmray.config import load_config
from mmray.data.synthetic import SCHEMA
from mmray.score import commit
from mmray.score.nightly import NightlyError, latest_checkpoint, parse_date, run_nightly, yesterday_utc
from tests.helpers import CLI_TIMEOUT, REPO
from tests.score.conftest import write_input


@pytest.mark.parametrize("text", ["2024-5-01", "20240501", "2024-02-30", "2024-05-01/..", "yesterday", ""])
def test_bad_dates_are_refused(text):
    with pytest.raises(NightlyError, match="--date"):
        parse_date(text)


def test_default_date_is_yesterday_in_utc():
    late_evening_in_new_york = dt.datetime(2024, 3, 1, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert yesterday_utc(late_evening_in_new_york) == "2024-03-01"  # 04:30 UTC on 2024-03-02
    assert parse_date("2024-02-29") == "2024-02-29"


def test_checkpoint_comes_from_config_else_the_latest_pointer(tmp_path):
    runs = tmp_path / "runs"
    cfg = load_config(None, [f"train.storage_path={runs}"])
    with pytest.raises(NightlyError, match="latest.json"):
        latest_checkpoint(cfg)
    runs.mkdir()
    (runs / "latest.json").write_text(json.dumps({"run_dir": "r", "checkpoint": "/ckpts/c1"}))
    assert latest_checkpoint(cfg) == "/ckpts/c1"
    assert latest_checkpoint(load_config(None, [f"train.storage_path={runs}", "score.checkpoint=/ckpts/pinned"])) == (
        "/ckpts/pinned"
    )


def test_missing_or_empty_input_partition_fails_before_any_scoring(tmp_path):
    cfg = load_config(None, [f"score.input={tmp_path / 'in'}", f"score.output={tmp_path / 'out'}",
                             "score.checkpoint=/never/read"])  # fmt: skip
    with pytest.raises(NightlyError, match=r"date=2024-05-01 does not exist"):
        run_nightly(cfg, "2024-05-01")
    (tmp_path / "in" / "date=2024-05-02").mkdir(parents=True)
    with pytest.raises(NightlyError, match="is empty: no Parquet files"):
        run_nightly(cfg, "2024-05-02")
    (tmp_path / "in" / "date=2024-05-03").mkdir()
    pq.write_table(SCHEMA.empty_table(), tmp_path / "in" / "date=2024-05-03" / "part-0.parquet")
    with pytest.raises(NightlyError, match="is empty: 0 rows in 1 Parquet file"):
        run_nightly(cfg, "2024-05-03")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# The real job (integration)
# --------------------------------------------------------------------------------------------------

DATES = ("2024-05-01", "2024-05-02", "2024-05-03")
BAD_ROWS = {"2024-05-02": 3}


def nightly(args: list[str], ray_address: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.run([sys.executable, "jobs/nightly_score.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT)  # fmt: skip


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.mark.integration
def test_nightly_scores_three_dated_partitions_and_reruns_safely(trained, ray_address, tmp_path):
    inputs = {d: write_input(tmp_path / "in" / f"date={d}", 40, seed=20 + i, prefix=f"n{i}-", bad=BAD_ROWS.get(d, 0))
              for i, d in enumerate(DATES)}  # fmt: skip
    out = tmp_path / "out"
    overrides = [f"train.storage_path={trained['storage_path']}", "data.preprocess.batch_size=64",
                 "score.batch_size=64"]  # fmt: skip
    common = ["--input", str(tmp_path / "in"), "--output", str(out), *overrides]

    proc = nightly(["--date", DATES[0], *common], ray_address)  # the real entrypoint, once
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(proc.stdout.strip().splitlines()[-1])]
    cfg = load_config(None, overrides)
    for d in DATES[1:]:  # the same library call, without paying for another interpreter
        results.append(run_nightly(cfg, d, input_root=str(tmp_path / "in"), output_root=str(out)))
    for d, result in zip(DATES, results):
        assert result["status"] == "committed" and result["date"] == d
        assert result["checkpoint"] == trained["checkpoint"]  # from latest.json

    for d in DATES:
        target = commit.Target(str(out), {"date": d})
        manifest = commit.committed_run(target)
        ids = commit.read_committed(target).column("id").to_pylist()
        bad = set(inputs[d]["bad_ids"])
        assert sorted(ids) == sorted(set(inputs[d]["ids"]) - bad)  # every good id exactly once
        quarantine = pq.read_table(out / f"date={d}" / commit.QUARANTINE_FILE)
        assert set(quarantine.column("id").to_pylist()) == bad
        success = json.loads((out / f"date={d}" / "_SUCCESS").read_text())
        assert success["rows_in"] == 40 == success["rows_scored"] + success["rows_quarantined"]
        assert success["rows_quarantined"] == len(bad) and manifest["partition"] == {"date": d}
    everything = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert everything.num_rows == 120 - 3 and set(everything.column("date").to_pylist()) == set(DATES)

    before = tree(out)
    again = nightly(["--date", "2024-05-02", *common], ray_address)
    assert again.returncode == 0 and "already scored" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "already scored"
    assert tree(out) == before

    missing = nightly(common, ray_address)  # no --date: yesterday (UTC), which has no input here
    assert missing.returncode == 2 and f"date={yesterday_utc()} does not exist" in missing.stderr
    assert tree(out) == before
