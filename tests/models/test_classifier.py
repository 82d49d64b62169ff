"""FusionClassifier: forward = encode + masks + predict; modality dropout; aux heads; gradients."""

from __future__ import annotations

import pytest
import torch

from mmray.config import ImageConfig, ImageEncoderConfig, ModelConfig, TextConfig, TextEncoderConfig
from mmray.data.labels import Task
from mmray.data.schema import IMAGE, INPUT_IDS, PIXELS, TEXT, mask_key
from mmray.models.builder import build_model
from tests.models.conftest import FUSION_NAMES, make_batch

TASKS = [
    Task("label", "multiclass", ("a", "b", "c")),
    Task("tags", "multilabel", ("x", "y")),
    Task("flag", "binary", ("false", "true")),
    Task("score", "regression"),
]


def model(fusion: str = "concat", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        fusion=fusion,
        hidden_dim=16,
        fusion_heads=2,
        aux_loss_weight=0.5,
        text_encoder=TextEncoderConfig(dim=16, heads=2),
        image_encoder=ImageEncoderConfig(dim=16),
        **kw,
    )
    return build_model(cfg, TextConfig(max_length=8), ImageConfig(size=16), TASKS, vocab_size=50)


def test_one_head_per_task_with_the_task_width():
    out = model().eval()(make_batch())
    shapes = {t: tuple(v.shape) for t, v in out["logits"].items()}
    assert shapes == {"label": (6, 3), "tags": (6, 2), "flag": (6, 1), "score": (6, 1)}
    assert {m: set(h) for m, h in out["aux"].items()} == {IMAGE: set(out["logits"]), TEXT: set(out["logits"])}


def test_forward_equals_encode_then_predict():
    m, batch = model().eval(), make_batch()
    with torch.no_grad():
        out = m(batch)
        features = m.encode(batch)
        logits = m.predict(features, m.masks(batch))
    for task in logits:
        torch.testing.assert_close(out["logits"][task], logits[task])


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_the_representation_is_what_the_fusion_and_the_heads_see(fusion):
    """``pooled`` is exactly the encoders' output the fusion is given, ``fused`` exactly its output,
    which the heads read: the vectors ``mmray embed`` writes come from the pass that predicts."""
    m, batch = model(fusion).eval(), make_batch()  # hidden_dim 16, text and image encoders 16 wide
    seen = {}
    m.fusion.register_forward_hook(lambda _, args, out: seen.update(features=args[0], masks=args[1], fused=out))
    with torch.no_grad():
        out = m(batch)
    assert tuple(out["fused"].shape) == (6, 16) and m.fusion.out_dim == 16
    assert {k: tuple(v.shape) for k, v in out["pooled"].items()} == {IMAGE: (6, 16), TEXT: (6, 16)}
    assert torch.equal(out["fused"], seen["fused"])
    for modality, features in seen["features"].items():
        assert torch.equal(out["pooled"][modality], features.pooled)
        assert torch.equal(out["masks"][modality], seen["masks"][modality])
    with torch.no_grad():
        for task, head in m.heads.items():
            assert torch.equal(out["logits"][task], head(out["fused"]))
    assert out["masks"][TEXT].tolist() == [1, 0, 1, 1, 1, 1]  # which rows' text vector means nothing


def test_masks_come_from_the_batch_in_eval_mode():
    m, batch = model(modality_dropout=0.9).eval(), make_batch()
    masks = m.masks(batch)
    assert masks[TEXT].tolist() == batch[mask_key(TEXT)].tolist()
    assert masks[IMAGE].tolist() == batch[mask_key(IMAGE)].tolist()


def test_modality_dropout_drops_whole_modalities_but_never_all_of_a_row():
    m = model(modality_dropout=0.5).train()
    b = 4000
    batch = {
        INPUT_IDS: torch.ones(b, 4, dtype=torch.long),
        mask_key(TEXT): torch.ones(b),
        mask_key(IMAGE): torch.ones(b),
    }
    batch[mask_key(IMAGE)][:100] = 0.0  # text-only rows must keep their text
    torch.manual_seed(0)
    masks = m.masks(batch)
    kept = masks[TEXT] + masks[IMAGE]
    assert (kept >= 1).all()
    assert (masks[TEXT][:100] == 1).all() and (masks[IMAGE][:100] == 0).all()
    dropped_text = 1 - masks[TEXT][100:].mean().item()
    assert 0.2 < dropped_text < 0.35  # P(drop) = 0.5, minus the rows where both would go


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_gradients_reach_every_trainable_parameter(fusion):
    m = model(fusion).train()
    out = m(make_batch())
    loss = sum(v.pow(2).sum() for v in out["logits"].values())
    loss = loss + sum(v.pow(2).sum() for heads in out["aux"].values() for v in heads.values())
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_a_masked_modality_never_reaches_the_fused_logits(fusion):
    m, batch = model(fusion).eval(), make_batch()
    other = {**batch, INPUT_IDS: batch[INPUT_IDS].clone(), PIXELS: batch[PIXELS].clone()}
    other[INPUT_IDS][1] = (other[INPUT_IDS][1] + 5) % 50  # row 1 has no text
    other[PIXELS][2] = 255 - other[PIXELS][2]  # row 2 has no image
    with torch.no_grad():
        a, b = m(batch)["logits"], m(other)["logits"]
    for task in a:
        torch.testing.assert_close(a[task], b[task])


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_whole_model_is_deterministic_under_a_seed(fusion):
    a = model(fusion).eval()(make_batch())["logits"]["label"]
    b = model(fusion).eval()(make_batch())["logits"]["label"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
