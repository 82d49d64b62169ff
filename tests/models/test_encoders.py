"""Tiny encoders: shapes, padding handling, pooling, init; the Encoded contract."""

from __future__ import annotations

import torch

from mmray.data import schema as S
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
    assert enc.token_mask.tolist() == batch[S.ATTENTION_MASK].bool().tolist()


def test_text_padding_does_not_change_the_pooled_vector(batch):
    model = text_encoder()
    other = dict(batch)
    other[S.INPUT_IDS] = batch[S.INPUT_IDS].clone()
    other[S.INPUT_IDS][0, 4:] = 7  # row 0 is padded from position 4: its pad ids must not matter
    with torch.no_grad():
        torch.testing.assert_close(model(other).pooled, model(batch).pooled)


def test_text_row_without_tokens_stays_finite(batch):
    batch[S.ATTENTION_MASK][1] = 0
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
    pixels = make_batch(size=16)[S.PIXELS].float() / 255
    enc = model({S.PIXELS: pixels})
    assert enc.tokens.shape == (6, 4, 16) and enc.token_mask.all()  # 16 px -> 2x2 grid after 3 poolings
    torch.testing.assert_close(enc.pooled, enc.tokens.mean(1))
    assert model.out_dim == model.token_dim == 16 and len(model.block_list()) == 3
