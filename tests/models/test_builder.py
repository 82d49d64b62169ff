"""The builder derives dimensions; the assembled model maps a batch to per-task logits."""

from __future__ import annotations

import torch

from mmray.config import ImageConfig, ModelConfig, TextConfig, TextEncoderConfig, ImageEncoderConfig
from mmray.data import schema as S
from mmray.data.labels import Task
from mmray.models.builder import build_model

TASKS = [Task("label", "multiclass", ("a", "b", "c")), Task("tags", "multilabel", ("x", "y"))]


def tiny_batch(b: int = 4, length: int = 8, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        S.INPUT_IDS: torch.randint(1, 50, (b, length), generator=g),
        S.ATTENTION_MASK: torch.ones(b, length, dtype=torch.long),
        S.PIXELS: torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8),
        S.mask_key(S.TEXT): torch.ones(b),
        S.mask_key(S.IMAGE): torch.ones(b),
    }


def tiny_model(**kw):
    cfg = ModelConfig(hidden_dim=24, text_encoder=TextEncoderConfig(dim=16, heads=2),
                      image_encoder=ImageEncoderConfig(dim=16), **kw)  # fmt: skip
    return build_model(cfg, TextConfig(max_length=8), ImageConfig(size=16), TASKS, vocab_size=50)


def test_output_shapes_per_task(seed):
    out = tiny_model()(tiny_batch())
    assert out["logits"]["label"].shape == (4, 3)
    assert out["logits"]["tags"].shape == (4, 2)
    assert set(out["aux"]) == {S.IMAGE, S.TEXT}
    assert out["aux"][S.TEXT]["label"].shape == (4, 3)


def test_fusion_input_size_is_derived_from_encoders(seed):
    model = tiny_model()
    first = model.fusion.mlp[0]
    assert first.in_features == model.encoders[S.TEXT].out_dim + model.encoders[S.IMAGE].out_dim == 32


def test_no_aux_heads_when_weight_is_zero(seed):
    assert len(tiny_model(aux_loss_weight=0.0).aux_heads) == 0


def test_deterministic_under_a_seed():
    torch.manual_seed(0)
    a = tiny_model().eval()(tiny_batch())["logits"]["label"]
    torch.manual_seed(0)
    b = tiny_model().eval()(tiny_batch())["logits"]["label"]
    assert torch.equal(a, b)
