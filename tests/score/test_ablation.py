"""mmray ablate (score.ablation): the full model and each modality masked, metrics summed exactly over batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmray.checkpoint import CheckpointInfo, save_checkpoint
from mmray.config import ImageConfig, ImageEncoderConfig, ModelConfig, TextConfig, TextEncoderConfig
from mmray.data.labels import Task
from mmray.data.preprocess import Preprocessor, PreprocessSpec
from mmray.data.schema import ATTENTION_MASK, ERROR, ID, IMAGE, INPUT_IDS, PIXELS, TEXT, label_key, mask_key
from mmray.data.synthetic import make_rows
from mmray.data.text import train_wordpiece
from mmray.metrics import MetricAccumulator, per_row_loss
from mmray.models.builder import build_model
from mmray.score.ablation import AblationEvaluator, accumulate, variant_masks, variant_names


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A (random) checkpoint, its preprocessor and 24 raw rows, two of them unusable."""
    root = tmp_path_factory.mktemp("ablate")
    rows = make_rows(24, seed=0)
    rows["text"][3], rows["image"][3] = None, None  # both modalities missing: quarantined
    rows["label"][5] = "no_such_label"  # not in the label map: quarantined
    tasks = [Task("label", "multiclass", tuple(sorted({v for i, v in enumerate(rows["label"]) if i != 5})))]
    train_wordpiece(rows["text"][:3] + rows["text"][4:], 200, root / "tok")
    tokenizer = {p.name: p.read_bytes() for p in (root / "tok").iterdir()}
    text, image = TextConfig(max_length=12), ImageConfig(size=16)
    cfg = ModelConfig(
        hidden_dim=16,
        aux_loss_weight=0.5,
        text_encoder=TextEncoderConfig(dim=16, heads=2),
        image_encoder=ImageEncoderConfig(dim=16),
    )
    torch.manual_seed(0)
    model = build_model(cfg, text, image, tasks, vocab_size=200).eval()
    spec = PreprocessSpec(tasks=tuple(tasks), text=text, image=image)
    save_checkpoint(root / "ckpt", model, CheckpointInfo(cfg, spec.to_dict(), tuple(tasks), 200, 0, {}), tokenizer)
    batch = Preprocessor(spec, tokenizer)({k: np.array(v, dtype=object) for k, v in rows.items()})
    return {"ckpt": str(root / "ckpt"), "batch": batch, "model": model, "tasks": tasks, "cfg": cfg}


def summarize(names: list[str], tasks, summaries) -> tuple[dict[str, dict], list[dict]]:
    accumulators, quarantine = accumulate(names, tasks, summaries)
    return {name: acc.compute() for name, acc in accumulators.items()}, quarantine


def run(setup, rows: slice) -> dict:
    out = AblationEvaluator(setup["ckpt"], PreprocessSpec().storage)({k: v[rows] for k, v in setup["batch"].items()})
    return {k: v[0] for k, v in out.items()}


def test_variant_masks_mask_one_modality_on_every_row():
    masks = {IMAGE: torch.tensor([1.0, 0.0]), TEXT: torch.tensor([1.0, 1.0])}
    assert variant_masks(masks, "full") is masks
    assert variant_masks(masks, "text_masked")[TEXT].tolist() == [0.0, 0.0]
    assert variant_masks(masks, "text_masked")[IMAGE].tolist() == [1.0, 0.0]
    assert variant_masks(masks, "image_masked")[IMAGE].tolist() == [0.0, 0.0]


def test_variant_names_follow_the_aux_heads():
    assert variant_names(ModelConfig(aux_loss_weight=0.5)) == [
        "full",
        "text_masked",
        "image_masked",
        "unimodal.image",
        "unimodal.text",
    ]
    assert (
        variant_names(ModelConfig())
        == variant_names(ModelConfig(aux_loss_weight=0.0))
        == ["full", "text_masked", "image_masked"]
    )


def test_each_variant_equals_the_model_run_with_those_masks(setup):
    names = variant_names(setup["cfg"])
    metrics, quarantine = summarize(names, setup["tasks"], [run(setup, slice(None))])
    assert sorted((q["id"], q["column"]) for q in quarantine) == sorted(
        [(setup["batch"][ID][3], "text,image"), (setup["batch"][ID][5], "label")]
    )
    good = setup["batch"][ERROR] == ""
    inputs = {
        k: torch.from_numpy(np.ascontiguousarray(v[good]))
        for k, v in setup["batch"].items()
        if k in (INPUT_IDS, ATTENTION_MASK, PIXELS, mask_key(TEXT), mask_key(IMAGE))
    }
    target = torch.from_numpy(setup["batch"][label_key("label")][good])
    task = setup["tasks"][0]
    for variant, masked in (("full", None), ("text_masked", TEXT), ("image_masked", IMAGE)):
        batch = dict(inputs)
        if masked:
            batch[mask_key(masked)] = torch.zeros(int(good.sum()))
        with torch.no_grad():
            logits = setup["model"](batch)["logits"]["label"]
        acc = MetricAccumulator(setup["tasks"])
        acc.update({"label": logits}, {"label": target}, float(per_row_loss(task, logits, target).sum()))
        expected = acc.compute()
        assert metrics[variant] == pytest.approx(expected), variant
        assert metrics[variant]["rows"] == 22
    # Unimodal heads count only the rows that have that modality.
    assert metrics["unimodal.text"]["rows"] == int(setup["batch"][mask_key(TEXT)][good].sum())


def test_batches_add_up_to_one_pass(setup):
    names = variant_names(setup["cfg"])
    whole, _ = summarize(names, setup["tasks"], [run(setup, slice(None))])
    parts, quarantine = summarize(names, setup["tasks"], [run(setup, slice(0, 10)), run(setup, slice(10, None))])
    assert len(quarantine) == 2
    for name in names:
        assert parts[name] == pytest.approx(whole[name])


def test_a_batch_of_only_bad_rows_adds_nothing(setup):
    names = variant_names(setup["cfg"])
    metrics, quarantine = summarize(names, setup["tasks"], [run(setup, slice(3, 4))])
    assert len(quarantine) == 1 and metrics["full"]["rows"] == 0
