"""Nightly scoring: dates, time zones and input checks (no Ray), then the real job and a backfill."""

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

from mmray.cli import main
from mmray.config import load_config
from mmray.data.synthetic import SCHEMA
from mmray.score import commit
from mmray.score.nightly import (
    MAX_BACKFILL_DAYS,
    NightlyError,
    date_range,
    latest_checkpoint,
    parse_date,
    resolve_date,
    run_nightly,
    yesterday,
)
from tests.helpers import CLI_TIMEOUT, REPO
from tests.score.conftest import write_input

BERLIN_AFTER_MIDNIGHT = dt.datetime(2024, 3, 1, 23, 30, tzinfo=dt.timezone.utc)  # 00:30 on 2024-03-02 in Berlin


@pytest.mark.parametrize("text", ["2024-5-01", "20240501", "2024-02-30", "2024-05-01/..", "Yesterday", ""])
def test_bad_dates_are_refused(text):
    with pytest.raises(NightlyError, match="--date"):
        resolve_date(text)


def test_yesterday_is_the_day_before_in_the_stated_time_zone():
    late_evening_in_new_york = dt.datetime(2024, 3, 1, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert yesterday("UTC", late_evening_in_new_york) == "2024-03-01"  # 04:30 UTC on 2024-03-02
    assert yesterday("America/New_York", late_evening_in_new_york) == "2024-02-29"
    # A job scheduled shortly after midnight in Berlin scores the Berlin day that just ended.
    assert resolve_date("yesterday", "Europe/Berlin", BERLIN_AFTER_MIDNIGHT) == "2024-03-01"
    assert resolve_date(None, "UTC", BERLIN_AFTER_MIDNIGHT) == "2024-02-29"
    assert resolve_date("2024-02-29", "Asia/Tokyo") == parse_date("2024-02-29") == "2024-02-29"


def test_unknown_time_zone_is_refused_even_with_an_explicit_date():
    with pytest.raises(NightlyError, match=r"--tz 'Mars/Olympus'"):
        resolve_date("2024-05-01", "Mars/Olympus")


def test_date_range_is_inclusive_ordered_and_bounded():
    assert date_range("2024-02-27", "2024-03-01") == ["2024-02-27", "2024-02-28", "2024-02-29", "2024-03-01"]
    assert date_range("2024-05-01", "2024-05-01") == ["2024-05-01"]
    with pytest.raises(NightlyError, match="--from 2024-05-02 is after --to 2024-05-01"):
        date_range("2024-05-02", "2024-05-01")
    with pytest.raises(NightlyError, match=str(MAX_BACKFILL_DAYS)):
        date_range("2000-01-01", "2024-01-01")


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


def test_latest_pointer_is_found_where_the_launcher_writes_it(tmp_path, monkeypatch):
    """``~`` and relative storage paths resolve as in ``mmray.train.launcher.storage_root``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for root in (tmp_path / "home" / "runs", tmp_path / "rel"):
        root.mkdir(parents=True)
        (root / "latest.json").write_text(json.dumps({"checkpoint": f"{root}/ckpt"}))
    assert latest_checkpoint(load_config(None, ["train.storage_path=~/runs"])) == f"{tmp_path}/home/runs/ckpt"
    assert latest_checkpoint(load_config(None, ["train.storage_path=rel/"])) == f"{tmp_path}/rel/ckpt"


def test_missing_or_empty_input_partition_fails_before_any_scoring(tmp_path):
    cfg = load_config(
        None, [f"score.input={tmp_path / 'in'}", f"score.output={tmp_path / 'out'}", "score.checkpoint=/never/read"]
    )
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--from", "2024-05-01"], "needs both --from and --to"),
        (["--date", "2024-05-01", "--from", "2024-05-01", "--to", "2024-05-02"], "either --date or --from/--to"),
        (["--date", "yesterday", "--tz", "Nowhere/Town"], "--tz 'Nowhere/Town'"),
    ],
)
def test_cli_refuses_bad_date_arguments(args, message, capsys):
    assert main(["nightly", *args, "score.input=/in", "score.output=/out"]) == 2
    assert message in capsys.readouterr().err


def test_cli_logs_its_resolved_config_with_secrets_redacted(tmp_path, monkeypatch, capsys):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert (
        main(
            [
                "nightly",
                "--date",
                "2024-05-01",
                f"score.input={tmp_path}/in",
                f"score.output={tmp_path}/{secret}",
                "score.checkpoint=/never/read",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    prefix = "mmray nightly: config (non-default keys; --verbose for all) "
    logged = next(line for line in err.splitlines() if line.startswith(prefix))
    config = json.loads(logged[len(prefix) :])
    assert config["score"]["output"] == f"{tmp_path}/***" and config["score"]["checkpoint"] == "/never/read"
    assert secret not in err and "date=2024-05-01 does not exist" in err


# --------------------------------------------------------------------------------------------------
# The real job (integration)
# --------------------------------------------------------------------------------------------------

DATES = ("2024-05-01", "2024-05-02", "2024-05-03")
BAD_ROWS = {"2024-05-02": 3}
RAY_CONNECT = "mmray: joined the Ray cluster at"  # init_ray's line when it joins a running instance


def nightly(args: list[str], ray_address: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.run(
        [sys.executable, "jobs/nightly_score.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.mark.integration
def test_nightly_scores_dated_partitions_backfills_gaps_and_reruns_safely(trained, ray_address, tmp_path):
    inputs = {
        d: write_input(tmp_path / "in" / f"date={d}", 40, seed=20 + i, prefix=f"n{i}-", bad=BAD_ROWS.get(d, 0))
        for i, d in enumerate(DATES)
    }
    out = tmp_path / "out"
    overrides = [
        f"train.storage_path={trained['storage_path']}",
        "data.preprocess.batch_size=64",
        "score.batch_size=64",
    ]
    common = ["--input", str(tmp_path / "in"), "--output", str(out), *overrides]

    first = nightly(["--date", DATES[0], *common], ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_json(first)["status"] == "committed" and last_json(first)["date"] == DATES[0]
    assert "mmray nightly: config (non-default keys; --verbose for all) {" in first.stderr  # logged at start

    # Backfill a range around it: 04-30 and 05-04 have no input, 05-01 is committed, 05-02/05-03 are gaps.
    backfill = nightly(["--from", "2024-04-30", "--to", "2024-05-04", *common], ray_address)
    assert backfill.returncode == 2, backfill.stderr[-3000:]
    assert "backfill: 2 of 5 dates failed: 2024-04-30, 2024-05-04" in backfill.stderr
    summary = last_json(backfill)  # the JSON line comes even when some dates failed
    assert summary["committed"] == list(DATES[1:]) and summary["skipped"] == [DATES[0]]
    assert summary["failed"] == ["2024-04-30", "2024-05-04"] and summary["checkpoint"] == trained["checkpoint"]
    assert "date=2024-04-30 does not exist" in summary["partitions"][0]["error"]
    assert backfill.stderr.count(RAY_CONNECT) == 1  # two dates scored on one Ray connection

    for d in DATES:
        target = commit.Target(str(out), {"date": d})
        manifest = commit.committed_run(target)
        assert manifest["checkpoint"] == trained["checkpoint"]  # from latest.json
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
    assert last_json(again)["status"] == "already scored"
    refill = nightly(["--from", DATES[0], "--to", DATES[-1], *common], ray_address)
    assert refill.returncode == 0 and last_json(refill)["skipped"] == list(DATES)
    assert RAY_CONNECT not in refill.stderr  # nothing to score: Ray is never started
    assert tree(out) == before

    # No --date: yesterday in UTC+14. The job reads the clock between these two readings, so its date is
    # one of them (they differ only when the run straddles midnight there).
    first_reading = yesterday("Pacific/Kiritimati")
    missing = nightly(["--tz", "Pacific/Kiritimati", *common], ray_address)
    readings = {first_reading, yesterday("Pacific/Kiritimati")}
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert any(f"date={d} does not exist" in missing.stderr for d in readings), missing.stderr[-3000:]
    assert tree(out) == before
