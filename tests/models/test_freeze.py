"""freeze: true | false | N, frozen parts in eval mode, frozen encoders get no gradient."""

from __future__ import annotations

import pytest
import torch

from mmray.config import (
    ConfigError,
    ImageConfig,
    ImageEncoderConfig,
    ModelConfig,
    TextConfig,
    TextEncoderConfig,
    load_config,
)
from mmray.data.labels import Task
from mmray.models.builder import build_model
from mmray.models.encoders import TinyImageEncoder, TinyTextEncoder
from mmray.models.freeze import apply_freeze

TASKS = [Task("label", "multiclass", ("a", "b", "c"))]


def trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_false_trains_everything_true_and_zero_nothing():
    for freeze, trains in ((False, True), (True, False), (0, False)):
        enc = TinyImageEncoder(16)
        apply_freeze(enc, enc.block_list(), freeze, "k")
        assert [p.requires_grad for p in enc.parameters()] == [trains] * len(list(enc.parameters())), freeze


def test_n_trains_the_last_n_blocks_and_what_follows_them():
    enc = TinyTextEncoder(50, 16, layers=3, heads=2, max_length=8, pooling="mean")
    apply_freeze(enc, enc.block_list(), 1, "model.text_encoder.freeze")
    names = trainable(enc)
    assert names and all(n.startswith(("blocks.layers.2.", "norm.")) for n in names)
    assert {"norm.weight", "norm.bias"} <= names  # the final norm follows the last block
    assert not any(n.startswith(("embed", "position", "blocks.layers.0.", "blocks.layers.1.")) for n in names)


def test_n_beyond_the_block_count_names_the_key():
    enc = TinyImageEncoder(16)
    with pytest.raises(ValueError, match=r"model\.image_encoder\.freeze: 4 .* 3 blocks"):
        apply_freeze(enc, enc.block_list(), 4, "model.image_encoder.freeze")


def test_negative_freeze_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.freeze"):
        load_config(None, ["model.text_encoder.freeze=-1"])
    assert load_config(None, ["model.image_encoder.freeze=2"]).model.image_encoder.freeze == 2


def test_frozen_parts_stay_in_eval_mode_and_keep_batchnorm_statistics():
    enc = TinyImageEncoder(16)
    apply_freeze(enc, enc.block_list(), 1, "k")
    enc.train()
    frozen_bn, live_bn = enc.features[0][1], enc.features[2][1]
    assert not frozen_bn.training and live_bn.training
    before = frozen_bn.running_mean.clone()
    enc({"pixels": torch.randn(4, 3, 16, 16)})
    torch.testing.assert_close(frozen_bn.running_mean, before)
    assert not torch.equal(live_bn.running_mean, torch.zeros_like(live_bn.running_mean))


def test_frozen_encoders_get_no_gradient_and_the_rest_does(seed):
    from tests.models.conftest import make_batch

    cfg = ModelConfig(
        hidden_dim=16,
        text_encoder=TextEncoderConfig(dim=16, heads=2, freeze=True),
        image_encoder=ImageEncoderConfig(dim=16, freeze=1),
    )
    model = build_model(cfg, TextConfig(max_length=8), ImageConfig(size=16), TASKS, vocab_size=50)
    out = model(make_batch())
    (out["logits"]["label"].sum() + sum(h["label"].sum() for h in out["aux"].values())).backward()
    for name, p in model.named_parameters():
        if name.startswith(("encoders.text.", "encoders.image.features.0.", "encoders.image.features.1.")):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
