"""Tiny encoders: shapes, padding handling, pooling, init; the Encoded contract."""

from __future__ import annotations

import pytest
import torch

from mmray.data.schema import ATTENTION_MASK, IMAGE, INPUT_IDS, PIXELS, POS_IDS, TEXT
from mmray.models.encoders import TinyImageEncoder, TinyTextEncoder, keep_one_key, masked_mean
from tests.models.conftest import make_batch


def text_encoder(pooling: str = "mean") -> TinyTextEncoder:
    torch.manual_seed(0)
    return TinyTextEncoder(vocab_size=50, dim=16, layers=2, heads=2, max_length=8, pooling=pooling).eval()


def test_masked_mean_ignores_masked_tokens_and_empty_rows_give_zero():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(tokens, mask), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def test_keep_one_key_only_touches_the_first_position():
    mask = torch.tensor([[False, False], [True, False]])
    assert keep_one_key(mask).tolist() == [[True, False], [True, False]]
    assert mask.tolist() == [[False, False], [True, False]]  # not modified in place


def test_text_encoder_shapes_and_widths(batch):
    enc = text_encoder()(batch)
    assert enc.pooled.shape == (6, 16) and enc.tokens.shape == (6, 8, 16)
    assert enc.token_mask.tolist() == batch[ATTENTION_MASK].bool().tolist()


def test_text_padding_does_not_change_the_pooled_vector(batch):
    model = text_encoder()
    other = dict(batch)
    other[INPUT_IDS] = batch[INPUT_IDS].clone()
    other[INPUT_IDS][0, 4:] = 7  # row 0 is padded from position 4: its pad ids must not matter
    with torch.no_grad():
        torch.testing.assert_close(model(other).pooled, model(batch).pooled)


def test_text_row_without_tokens_stays_finite(batch):
    batch[ATTENTION_MASK][1] = 0
    assert torch.isfinite(text_encoder()(batch).pooled).all()


def test_cls_pooling_is_the_first_token(batch):
    enc = text_encoder("cls")(batch)
    torch.testing.assert_close(enc.pooled, enc.tokens[:, 0])


def test_text_embeddings_start_small_and_padding_is_zero():
    model = text_encoder()
    assert model.embed.weight[1:].std() < 0.05 and model.position.weight.std() < 0.05
    assert model.embed.weight[0].abs().sum() == 0


def test_image_encoder_grid_tokens_and_pooled_mean():
    torch.manual_seed(0)
    model = TinyImageEncoder(16).eval()
    pixels = make_batch(size=16)[PIXELS].float() / 255
    enc = model({PIXELS: pixels})
    assert enc.tokens.shape == (6, 4, 16) and enc.token_mask.all()  # 16 px -> 2x2 grid after 3 poolings
    torch.testing.assert_close(enc.pooled, enc.tokens.mean(1))
    assert model.out_dim == model.token_dim == 16 and len(model.block_list()) == 3


@pytest.mark.parametrize("convs", [1, 2])
def test_image_encoder_convs_per_stage_deepen_each_stage_and_keep_the_grid(convs):
    torch.manual_seed(0)
    model = TinyImageEncoder(16, convs).eval()
    enc = model({PIXELS: make_batch(size=16)[PIXELS].float() / 255})
    assert enc.tokens.shape == (6, 4, 16) and len(model.block_list()) == 3  # freeze: N still counts stages
    stages = [[m.out_channels for m in stage if isinstance(m, torch.nn.Conv2d)] for stage in model.block_list()]
    assert stages == ([[4], [8], [16]] if convs == 1 else [[8, 8], [16, 16], [16, 16]])


def test_convs_per_stage_is_a_config_key_the_builder_and_checkpoint_keep(tmp_path):
    from mmray.checkpoint import CheckpointInfo, load_info, load_model, save_checkpoint
    from mmray.config import ImageConfig, ImageEncoderConfig, ModelConfig, TextConfig, TextEncoderConfig
    from mmray.data.labels import Task
    from mmray.data.preprocess import PreprocessSpec
    from mmray.models.builder import build_model

    cfg = ModelConfig(
        hidden_dim=16,
        text_encoder=TextEncoderConfig(dim=16, heads=2),
        image_encoder=ImageEncoderConfig(dim=16, convs_per_stage=2),
    )
    tasks = [Task("label", "multiclass", ("a", "b"))]
    model = build_model(cfg, TextConfig(max_length=8), ImageConfig(size=16), tasks, vocab_size=50)
    assert len([m for m in model.encoders[IMAGE].modules() if isinstance(m, torch.nn.Conv2d)]) == 6
    spec = PreprocessSpec(tasks=tuple(tasks), text=TextConfig(max_length=8), image=ImageConfig(size=16))
    save_checkpoint(tmp_path, model, CheckpointInfo(cfg, spec.to_dict(), tuple(tasks), 50, 0, {}), {})
    assert load_info(tmp_path).model.image_encoder.convs_per_stage == 2
    load_model(tmp_path)  # the weights fit the rebuilt architecture


def test_the_pos_embedding_changes_the_output_and_id_0_adds_nothing(batch):
    torch.manual_seed(0)
    plain = TinyTextEncoder(vocab_size=50, dim=16, layers=2, heads=2, max_length=8, pooling="mean").eval()
    tagged = TinyTextEncoder(
        vocab_size=50, dim=16, layers=2, heads=2, max_length=8, pooling="mean", pos_vocab=18
    ).eval()
    tagged.load_state_dict({**tagged.state_dict(), **plain.state_dict()})  # same weights but the POS table
    untagged = {**batch, POS_IDS: torch.zeros_like(batch[INPUT_IDS])}
    nouns = {**batch, POS_IDS: torch.full_like(batch[INPUT_IDS], 8)}
    with torch.no_grad():
        torch.testing.assert_close(tagged(untagged).pooled, plain(batch).pooled)  # padding_idx 0 is all zeros
        assert not torch.allclose(tagged(nouns).pooled, plain(batch).pooled, atol=1e-4)
    assert tagged.pos.weight.shape == (18, 16) and tagged.pos.weight[1:].std() < 0.05


def test_pos_tags_are_a_text_setting_the_builder_and_checkpoint_keep(tmp_path, batch):
    from mmray.checkpoint import CheckpointInfo, load_info, load_model, save_checkpoint
    from mmray.config import ImageConfig, ModelConfig, TextConfig, TextEncoderConfig
    from mmray.data.labels import Task
    from mmray.data.preprocess import PreprocessSpec
    from mmray.data.text import POS_TAGS
    from mmray.models.builder import build_model

    cfg = ModelConfig(hidden_dim=16, text_encoder=TextEncoderConfig(dim=16, heads=2, freeze=True))
    text, tasks = TextConfig(max_length=8, segmenter="jieba", pos_tags=True), [Task("label", "multiclass", ("a", "b"))]
    model = build_model(cfg, text, ImageConfig(size=16), tasks, vocab_size=50)
    encoder = model.encoders[TEXT]
    assert encoder.pos.num_embeddings == len(POS_TAGS)
    assert encoder.pos.weight.requires_grad and not encoder.embed.weight.requires_grad  # new: trains when frozen
    spec = PreprocessSpec(tasks=tuple(tasks), text=text, image=ImageConfig(size=16))
    save_checkpoint(tmp_path, model, CheckpointInfo(cfg, spec.to_dict(), tuple(tasks), 50, 0, {}), {})
    assert load_info(tmp_path).preprocess["text"]["pos_tags"] is True
    rebuilt = load_model(tmp_path)  # scoring rebuilds the POS embedding from the checkpoint alone
    inputs = {**batch, POS_IDS: torch.randint(0, len(POS_TAGS), batch[INPUT_IDS].shape)}
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(inputs)["logits"]["label"], model.eval()(inputs)["logits"]["label"])
