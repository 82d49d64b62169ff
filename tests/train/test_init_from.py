"""model.init_from: the encoders and the alignment move from a checkpoint, the fusion and heads start
fresh, and other encoder settings are named before any work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmray.checkpoint import CheckpointInfo, save_checkpoint
from mmray.config import (
    AlignConfig,
    Config,
    ImageConfig,
    ImageEncoderConfig,
    ModelConfig,
    TextConfig,
    TextEncoderConfig,
)
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.models.builder import build_model
from mmray.train.init_from import check_compatible, load_parts

TEXT, IMAGE = TextConfig(max_length=8), ImageConfig(size=16)
MATCH = Task("label", "binary", ("no", "yes"))


def model_cfg(**kw) -> ModelConfig:
    base = dict(
        hidden_dim=16,
        text_encoder=TextEncoderConfig(dim=16, heads=2),
        image_encoder=ImageEncoderConfig(dim=16),
        align=AlignConfig(weight=1.0, projection_dim=8),
    )
    return ModelConfig(**{**base, **kw})


def pretrained(tmp_path, cfg: ModelConfig) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(1)
    model = build_model(cfg, TEXT, IMAGE, [], vocab_size=50)  # mmray pretrain's: no task heads
    with torch.no_grad():
        model.align.logit_scale.fill_(3.0)  # a learned temperature
    spec = PreprocessSpec(tasks=(), text=TEXT, image=IMAGE)
    save_checkpoint(tmp_path / "ckpt", model, CheckpointInfo(cfg, spec.to_dict(), (), 50, 0, {}), {})
    return str(tmp_path / "ckpt"), model


def test_encoders_and_alignment_move_and_the_fusion_and_heads_start_fresh(tmp_path):
    uri, source = pretrained(tmp_path, model_cfg(fusion="concat"))
    torch.manual_seed(2)
    model = build_model(
        model_cfg(fusion="gated", align=AlignConfig(weight=0.5, projection_dim=8, itm_weight=1.0)),
        TEXT,
        IMAGE,
        [MATCH],
        50,
    )
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_parts(model, uri, uri)
    assert loaded and all(k.startswith(("encoders.", "align.")) for k in loaded)
    theirs, mine = source.state_dict(), model.state_dict()
    for k in mine:
        if k.startswith(("encoders.", "align.")):
            torch.testing.assert_close(mine[k], theirs[k])
        else:  # fusion, heads, matching head: as built
            torch.testing.assert_close(mine[k], fresh[k])
    assert model.align.logit_scale.item() == 3.0


def test_a_run_without_alignment_takes_only_the_encoders(tmp_path):
    uri, source = pretrained(tmp_path, model_cfg())
    model = build_model(model_cfg(align=AlignConfig()), TEXT, IMAGE, [MATCH], 50)
    assert all(k.startswith("encoders.") for k in load_parts(model, uri, uri))


def test_other_encoder_settings_are_named_before_any_work(tmp_path):
    uri, _ = pretrained(tmp_path, model_cfg())
    from mmray.checkpoint import load_info

    info = load_info(uri)
    frozen = dataclasses.replace(model_cfg(), text_encoder=TextEncoderConfig(dim=16, heads=2, freeze=True))
    check_compatible(Config(model=frozen), info, uri)  # freeze decides what trains, not shapes
    wider = model_cfg(text_encoder=TextEncoderConfig(dim=32, heads=2), align=AlignConfig(weight=1.0, projection_dim=4))
    with pytest.raises(ValueError) as e:
        check_compatible(Config(model=wider), info, uri)
    message = str(e.value)
    assert "model.text_encoder.dim: 32 here, 16 in the checkpoint" in message
    assert "model.align.projection_dim: 4 here, 8 in the checkpoint" in message
    with pytest.raises(ValueError, match=r"does not fit this model \(other shapes for align\.proj\.image\.bias"):
        load_parts(build_model(wider, TEXT, IMAGE, [MATCH], 50), uri, uri)
