"""End to end through the real CLI: make-data -> train (2 workers) -> score, on the session's Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.helpers import run_cli, tiny_overrides

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(ray_address, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    made = run_cli(["make-data", str(root / "data"), "--rows", "800", "--seed", "1"]).json["splits"]
    result = run_cli(
        ["train", "--config", "configs/demo.yaml", *tiny_overrides(made, root / "runs", **{"train.num_workers": 2})],
        ray_address,
    ).json
    return {"root": root, "data": made, "result": result}


def test_train_reports_run_dir_checkpoint_and_metrics(trained):
    res = trained["result"]
    run_dir = Path(res["run_dir"])
    assert run_dir.parent == trained["root"] / "runs"
    assert {"accuracy", "macro_f1", "loss"} <= set(res["metrics"])
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] == res["metrics"]["accuracy"]
    ckpt = Path(res["checkpoint"])
    assert {"mmray.json", "model.safetensors", "tokenizer", "train_state.pt"} <= {p.name for p in ckpt.iterdir()}
    bundle = json.loads((ckpt / "mmray.json").read_text())
    assert bundle["tasks"][0]["classes"] == ["cat_blue", "cat_red", "dog_blue", "dog_red"]
    assert bundle["preprocess"]["image"]["size"] == 32


def test_training_learns(trained):
    history = [json.loads(line) for line in (Path(trained["result"]["run_dir"]) / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert trained["result"]["metrics"]["accuracy"] >= 0.6  # chance is 0.25, one modality alone 0.5


def test_score_writes_every_id_exactly_once(trained, ray_address):
    out = trained["root"] / "preds"
    test_split = trained["data"]["test"]
    res = run_cli(["score", "--checkpoint", trained["result"]["checkpoint"], "--input", test_split["path"],
                   "--output", str(out)], ray_address).json  # fmt: skip
    assert res["rows_in"] == res["rows_scored"] == test_split["rows"]
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
