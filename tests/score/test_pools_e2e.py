"""Both scoring layouts through the real CLI and Ray: the same predictions, row for row, whichever pool
layout ran (``score.pools``); ``--verbose`` says where the seconds went, from Ray's own task events."""

from __future__ import annotations

import re

import pyarrow.dataset as pads
import pytest

from mmray import cli
from tests.score.conftest import TASK, make_checkpoint

pytestmark = pytest.mark.integration


def _score(args: list[str], capsys) -> str:
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    return err


def _predictions(folder) -> dict[str, tuple]:
    table = pads.dataset(str(folder), format="parquet").to_table(columns=["id", "prediction", "probabilities"])
    return {r["id"]: (r["prediction"], r["probabilities"]) for r in table.to_pylist()}


def test_fused_and_split_pools_score_every_row_alike_and_verbose_names_the_seconds(
    ray_session, demo_data, tmp_path, capsys, monkeypatch
):
    # --verbose sets MMRAY_VERBOSE for the processes mmray starts; the tests after this one run in this
    # process and start CLI subprocesses: they must find it as it was.
    monkeypatch.setenv("MMRAY_VERBOSE", "0")
    ckpt = make_checkpoint(tmp_path, [TASK])
    base = ["score", "--checkpoint", str(ckpt), "--input", demo_data["test"]["path"], "score.batch_size=16"]
    fused = _score([*base, "--output", str(tmp_path / "fused"), "--verbose"], capsys)
    split = _score([*base, "--output", str(tmp_path / "split"), "score.pools=split", "--verbose"], capsys)
    rows = demo_data["test"]["rows"]
    a, b = _predictions(tmp_path / "fused"), _predictions(tmp_path / "split")
    assert len(a) == rows and a.keys() == b.keys()
    for row_id, (label, probs) in a.items():
        assert b[row_id][0] == label and b[row_id][1] == pytest.approx(probs, abs=1e-6), row_id
    # 60 rows at 16 a batch: fewer than 8 batches, so one actor whatever the configured pools
    assert f"mmray score: {rows:,} rows: 1 actor(s) reading, preprocessing and predicting" in fused
    line = re.search(
        r"^mmray score: [\d.]+ s: plan [\d.]+, lease [\d.]+, ray [\d.]+, stream [\d.]+ \((.*)\), "
        r"finalize [\d.]+, publish [\d.]+$",
        fused,
        re.M,
    )
    assert line, fused[-2000:]
    assert re.match(
        r"actors up at [\d.]+: start-up [\d.]+ in 1 actor\(s\) of 1 planned; first batch done at [\d.]+; "
        r"write [\d.]+",
        line.group(1),
    ), line.group(1)
    assert f"mmray score: {rows:,} rows: 1 preprocessing + 1 predicting actor(s)" in split
    assert "in 2 actor(s) of 2 planned" in split
