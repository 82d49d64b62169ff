"""Image-text alignment through the real CLI on the session's Ray (issue 31): ``mmray train`` with
``model.align`` (contrast and matching) on generated caption-matching data, its checkpoint scored by ``mmray score``, and a
``pairs`` setting that names no label refused before any work."""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from mmray.checkpoint import load_info, load_model
from mmray.data.benchmarks import make_task_dataset
from tests.helpers import run_cli, run_cli_here, tiny_overrides

pytestmark = pytest.mark.integration

ALIGN = [
    "model.align.weight=1.0",
    "model.align.pairs=label=yes",
    "model.align.projection_dim=16",
    "model.align.itm_weight=1.0",
]


@pytest.fixture(scope="module")
def match_data(tmp_path_factory) -> dict:
    return make_task_dataset("match", tmp_path_factory.mktemp("align") / "data", rows=240, seed=3)


def test_a_pairs_label_the_data_lacks_is_refused_naming_the_key(match_data, ray_address, tmp_path):
    args = tiny_overrides(
        match_data, tmp_path / "runs", **{"model.align.weight": 1, "model.align.pairs": "label=maybe"}
    )
    proc = run_cli_here(["train", "--config", "configs/demo.yaml", *args], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.align.pairs: 'maybe' is not a label of 'label' (labels: ['no', 'yes'])" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_aligned_training_checkpoints_the_projection_and_scores(match_data, ray_address, tmp_path):
    args = tiny_overrides(match_data, tmp_path / "runs", **{"train.epochs": 2, "train.num_workers": 1})
    result = run_cli_here(["train", "--config", "configs/demo.yaml", *args, *ALIGN]).json
    ckpt = result["checkpoint"]
    info = load_info(ckpt)
    align = info.model.align
    assert (align.weight, align.pairs, align.projection_dim, align.itm_weight) == (1.0, "label=yes", 16, 1.0)
    model = load_model(ckpt)
    assert model.align is not None and model.heads_read_similarity and model.match_head is not None
    assert model.align.scale().item() != pytest.approx(1 / 0.07)  # the temperature was learned, and saved

    out = tmp_path / "preds"
    test = match_data["test"]["path"]
    scored = run_cli_here(["score", "--checkpoint", ckpt, "--input", test, "--output", str(out)]).json
    rows = pads.dataset(test, format="parquet").count_rows()
    assert scored["rows_scored"] == rows and scored["rows_quarantined"] == 0
    predictions = pads.dataset(str(out), format="parquet").to_table(columns=["prediction"])["prediction"]
    assert set(predictions.to_pylist()) <= {"no", "yes"}


@pytest.fixture(scope="module")
def captions(match_data, tmp_path_factory) -> dict:
    """Captioned Parquet as pretraining reads it: id, text, image; no label column (match's "yes" rows)."""
    root = tmp_path_factory.mktemp("captions")
    out = {}
    for split in ("train", "val"):
        table = pads.dataset(match_data[split]["path"], format="parquet").to_table()
        table = table.filter(pc.equal(table["label"], "yes")).drop_columns(["label"])
        (root / split).mkdir()
        pq.write_table(table, root / split / "part-00000.parquet")
        out[split] = {"path": str(root / split), "rows": table.num_rows}
    return out


def test_pretrain_aligns_unlabelled_captions_and_a_supervised_run_starts_from_its_encoders(
    captions, match_data, ray_address, tmp_path
):
    """``mmray pretrain`` -> a checkpoint of encoders and alignment without heads (never latest.json);
    ``mmray train model.init_from=`` it with frozen encoders keeps exactly those encoders."""
    runs = tmp_path / "runs"
    args = tiny_overrides(captions, runs, **{"train.epochs": 2, "train.num_workers": 1})
    every_row = [a for a in ALIGN if not a.startswith("model.align.pairs=")]  # captions only: all pairs
    pre = run_cli_here(["pretrain", "--config", "configs/demo.yaml", *args, *every_row]).json
    info = load_info(pre["checkpoint"])
    assert info.tasks == () and pre["metrics"]["align_loss"] > 0
    assert not (runs / "latest.json").exists()  # scoring's default never picks a model without heads
    pretrained = load_model(pre["checkpoint"])
    assert len(pretrained.heads) == 0 and pretrained.align is not None

    # Nothing to score without heads: one line naming why, before any work; embedding works.
    val = captions["val"]["path"]
    refused = run_cli_here(
        ["score", "--checkpoint", pre["checkpoint"], "--input", val, "--output", str(tmp_path / "preds")],
        check=False,
    )
    assert refused.returncode == 2 and "the checkpoint has no task heads (mmray pretrain made it)" in refused.stderr
    vectors = tmp_path / "vectors"
    run_cli_here(["embed", "--checkpoint", pre["checkpoint"], "--input", val, "--output", str(vectors)])
    table = pads.dataset(str(vectors), format="parquet").to_table()
    assert table.num_rows == captions["val"]["rows"]
    aligned = torch.tensor(table["text_aligned"].to_pylist())
    assert aligned.shape[1] == 16 and torch.allclose(aligned.norm(dim=-1), torch.ones(len(aligned)), atol=1e-5)
    retrieval = ["ablate", "--checkpoint", pre["checkpoint"], "--input", val, "--retrieval"]
    own = run_cli_here(retrieval).json["retrieval"]
    recall = run_cli_here([*retrieval, "--key-column", "attributes"]).json["retrieval"]
    assert recall["rows"] == own["rows"] == captions["val"]["rows"] and recall["key_column"] == "attributes"
    for direction in ("text_to_image", "image_to_text"):
        assert 0 < recall[direction]["R@1"] <= recall[direction]["R@5"] <= recall[direction]["R@10"] <= 1
        assert recall[direction]["R@1"] >= own[direction]["R@1"]  # any image of the attributes counts

    frozen = {
        "train.epochs": 1,
        "train.num_workers": 1,
        "model.init_from": pre["checkpoint"],
        "model.text_encoder.freeze": "true",
        "model.image_encoder.freeze": "true",
    }
    sup = run_cli_here(
        ["train", "--config", "configs/demo.yaml", *tiny_overrides(match_data, runs, **frozen), *ALIGN]
    ).json
    tuned = load_model(sup["checkpoint"])
    assert [t.name for t in load_info(sup["checkpoint"]).tasks] == ["label"]
    before, after = pretrained.state_dict(), tuned.state_dict()
    encoders = [k for k in after if k.startswith("encoders.")]
    assert encoders and all(torch.equal(after[k], before[k]) for k in encoders)  # loaded, then frozen
    assert not torch.equal(after["align.proj.text.weight"], before["align.proj.text.weight"])  # not frozen
    assert (runs / "latest.json").exists()


def test_pretraining_refuses_settings_it_cannot_use_before_ray_starts(captions, tmp_path):
    base = tiny_overrides(captions, tmp_path / "runs")
    proc = run_cli(["pretrain", "--config", "configs/demo.yaml", *base], check=False)
    assert proc.returncode == 2 and "model.align.weight: mmray pretrain trains the alignment" in proc.stderr
    proc = run_cli(
        ["pretrain", "--config", "configs/demo.yaml", *base, "model.align.weight=1", "model.align.pairs=label=yes"],
        check=False,
    )
    assert proc.returncode == 2 and "model.align.pairs: 'label=yes' names a label" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
