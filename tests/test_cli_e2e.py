"""End to end through the real CLI: ``mmray demo`` (make-data -> train with 2 workers -> score -> report) on the
session's Ray, then ``mmray score`` of its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.helpers import CLI_TIMEOUT, REPO, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.smoke]  # smoke: `make test-fast` runs it too


@pytest.fixture(scope="module")
def demo(ray_address, tmp_path_factory) -> dict:
    """``mmray demo`` itself (make-data -> train with 2 workers -> score -> report), joining the session's
    cluster through ``--address`` (no RAY_ADDRESS). Its run serves every test here: one training, since
    each costs most of a minute of worker start-up on this machine."""
    root = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmray.cli",
            "demo",
            "--workdir",
            str(root),
            "--rows",
            "800",
            "--address",
            ray_address,
            "--config",
            "configs/demo.yaml",
            "train.epochs=3",
            "train.num_workers=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    data = {split: {"path": str(root / "data" / split)} for split in ("train", "val", "test")}
    return {"root": root, "proc": proc, "res": res, "result": res["train"], "data": data}


def test_train_reports_run_dir_checkpoint_and_metrics(demo):
    res = demo["result"]
    run_dir = Path(res["run_dir"])
    assert run_dir.parent == demo["root"] / "runs"
    assert {"accuracy", "macro_f1", "loss"} <= set(res["metrics"])
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] == res["metrics"]["accuracy"]
    ckpt = Path(res["checkpoint"])
    assert {"mmray.json", "model.safetensors", "tokenizer", "train_state.pt"} <= {p.name for p in ckpt.iterdir()}
    bundle = json.loads((ckpt / "mmray.json").read_text())
    assert bundle["tasks"][0]["classes"] == ["cat_blue", "cat_red", "dog_blue", "dog_red"]
    assert bundle["preprocess"]["image"]["size"] == 32


def test_training_learns(demo):
    history = [
        json.loads(line) for line in (Path(demo["result"]["run_dir"]) / "history.jsonl").read_text().splitlines()
    ]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert demo["result"]["metrics"]["accuracy"] >= 0.6  # chance is 0.25, one modality alone 0.5


def test_score_writes_every_id_exactly_once(demo, ray_address):
    out = demo["root"] / "preds"
    test_split = demo["data"]["test"]
    res = run_cli(
        ["score", "--checkpoint", demo["result"]["checkpoint"], "--input", test_split["path"], "--output", str(out)],
        ray_address,
    ).json
    assert res["rows_in"] == res["rows_scored"] == 120  # 15% of 800
    table = pads.dataset(str(out), format="parquet").to_table()
    assert {"id", "prediction", "confidence", "probabilities"} <= set(table.column_names)
    ids = table.column("id").to_pylist()
    expected = pads.dataset(test_split["path"], format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)
    for probs, conf in zip(table.column("probabilities").to_pylist(), table.column("confidence").to_pylist()):
        assert len(probs) == 4 and sum(probs) == pytest.approx(1.0, abs=1e-5) and conf == pytest.approx(max(probs))
    assert set(table.column("prediction").to_pylist()) <= {"cat_blue", "cat_red", "dog_blue", "dog_red"}


def test_cli_rejects_unknown_config_key(tmp_path):
    proc = run_cli(["train", "--config", "configs/demo.yaml", "train.epochz=1"], check=False)
    assert proc.returncode == 2 and "train.epochz" in proc.stderr


def test_demo_runs_make_data_train_score_on_the_cluster_given_by_address(demo, ray_address):
    proc, res, root = demo["proc"], demo["res"], demo["root"]
    assert f"mmray: joined the Ray cluster at {ray_address}" in proc.stderr  # not a new local Ray
    assert res["score"]["rows_in"] == res["score"]["rows_scored"] == 120  # 15% of 800
    assert json.loads((root / "runs" / "latest.json").read_text())["checkpoint"] == res["train"]["checkpoint"]
    preds = pads.dataset(str(root / "predictions"), format="parquet").to_table(columns=["id", "prediction"])
    labels = pads.dataset(str(root / "data" / "test"), format="parquet").to_table(columns=["id", "label"])
    truth = dict(zip(labels.column("id").to_pylist(), labels.column("label").to_pylist()))
    got = dict(zip(preds.column("id").to_pylist(), preds.column("prediction").to_pylist()))
    assert got.keys() == truth.keys()
    assert res["test_accuracy"] == pytest.approx(sum(got[i] == truth[i] for i in truth) / len(truth))
    assert f"mmray demo: test accuracy {res['test_accuracy']:.3f} (120 rows scored)" in proc.stdout
    # mmray's own lines, and none of Ray's: the whole output fits one screen.
    assert "mmray train: run " in proc.stderr and "epoch 3/3  train_loss " in proc.stderr
    assert "mmray score: committed 120 rows" in proc.stderr
    for chatter in ("Reporting training result", "Execution plan", "TrainController", "Progress bars"):
        assert chatter not in proc.stderr + proc.stdout
    assert len((proc.stderr + proc.stdout).splitlines()) <= 30, proc.stderr + proc.stdout
    # ... and it ends with the run's report, evaluated on the validation split
    report = Path(res["report"])
    assert report == Path(res["train"]["run_dir"]) / "report.html" and f"report:      {report}" in proc.stdout
    page = report.read_text()
    for variant in ("full", "text_masked", "image_masked"):
        assert f"<td>{variant}</td>" in page
    assert page.count('src="data:image/png;base64,') == 6  # curves x2, lr, confusion, per-class, calibration


def test_a_ray_client_address_is_refused_before_connecting(demo, tmp_path):
    """``--address ray://...`` (or RAY_ADDRESS): Ray Data cannot stream through Ray Client on Ray 2.60
    (the executor fails deep inside with "'Worker' object has no attribute 'core_worker'", after the
    job did its checks). The CLI says so at once, names the way that works, and starts no Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for how, extra_env in ((["--address", "ray://127.0.0.1:1"], {}), ([], {"RAY_ADDRESS": "ray://127.0.0.1:1"})):
        out = tmp_path / f"preds{len(how)}"
        started = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mmray.cli",
                "score",
                *how,
                "--checkpoint",
                demo["result"]["checkpoint"],
                "--input",
                demo["data"]["test"]["path"],
                "--output",
                str(out),
            ],
            cwd=REPO,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "ray://127.0.0.1:1" in proc.stderr and "ray job submit" in proc.stderr
        assert "started a local Ray instance" not in proc.stderr and "joined the Ray cluster" not in proc.stderr
        assert not out.exists()
        assert time.monotonic() - started < CLI_TIMEOUT / 2
