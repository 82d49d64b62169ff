"""Modality encoders. Each maps the batch to an ``Encoded`` (pooled vector + token/patch grid).

Contract: ``encoder(batch) -> Encoded``, an ``out_dim`` (pooled width) and a ``token_dim`` (token
width) attribute, so builders derive fusion input sizes from the encoders instead of asking the user,
and ``block_list()`` (repeated units in forward order) for ``freeze: N``. Pretrained encoders live in
``hf.py`` (text) and ``vision.py`` (image).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from mmray.data.schema import ATTENTION_MASK, INPUT_IDS, PIXELS, POS_IDS
from mmray.models.freeze import FrozenEvalMixin

__all__ = [
    "CachedFeatures",
    "Encoded",
    "TinyImageEncoder",
    "TinyTextEncoder",
    "feature_columns",
    "feature_key",
    "masked_mean",
    "pos_embedding",
]


class Encoded(NamedTuple):
    pooled: Tensor  # [B, out_dim]
    tokens: Tensor  # [B, T, token_dim]: text tokens or image grid/patches, for cross-attention
    token_mask: Tensor  # [B, T] bool, True where a token is real


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def pos_embedding(pos_vocab: int, dim: int) -> nn.Embedding | None:
    """The learned part-of-speech embedding added to token embeddings (``data.text.pos_tags``); None
    without tags. Id 0 (special tokens, padding, untagged) adds nothing; the rest start small (BERT's
    0.02, as its token-type embedding), so tags nudge rather than drown the token embeddings."""
    if not pos_vocab:
        return None
    emb = nn.Embedding(pos_vocab, dim, padding_idx=0)
    nn.init.normal_(emb.weight, std=0.02)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


def keep_one_key(mask: Tensor) -> Tensor:
    """Rows without any token have an all-False mask; attending to nothing gives NaN, so keep the
    first position visible. Outputs of such rows are discarded downstream (modality mask 0)."""
    safe = mask.clone()
    safe[:, 0] = True
    return safe


class TinyTextEncoder(FrozenEvalMixin, nn.Module):
    """Embedding (+ POS embedding, given ``pos_vocab``) + small Transformer encoder, mean or CLS pooled.
    For tests, demos and small data."""

    def __init__(
        self, vocab_size: int, dim: int, layers: int, heads: int, max_length: int, pooling: str, pos_vocab: int = 0
    ):
        super().__init__()
        self.out_dim = self.token_dim = dim
        self.pooling = pooling
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Embedding(max_length, dim)
        self.pos = pos_embedding(pos_vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        # BERT's init: nn.Embedding's default N(0, 1) drowns a sentence's few informative tokens in
        # positional and filler noise that AdamW (steps ~lr) takes thousands of updates to shrink.
        for emb in (self.embed, self.position):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[0].zero_()  # padding

    def block_list(self) -> list[nn.Module]:
        return list(self.blocks.layers)

    def forward(self, batch: dict[str, Tensor]) -> Encoded:
        ids, mask = batch[INPUT_IDS], batch[ATTENTION_MASK].bool()
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position(pos)
        if self.pos is not None:
            x = x + self.pos(batch[POS_IDS])
        x = self.norm(self.blocks(x, src_key_padding_mask=~keep_one_key(mask)))
        pooled = x[:, 0] if self.pooling == "cls" else masked_mean(x, mask)
        return Encoded(pooled, x, mask)


class TinyImageEncoder(FrozenEvalMixin, nn.Module):
    """Three stages of ``convs`` 3x3 conv + BatchNorm + ReLU, each halving the grid (VGG-style); the
    last feature map is the grid, its average the pooled vector. Widths ``dim/4, dim/2, dim`` (one conv
    a stage) or ``dim/2, dim, dim`` (deeper: two see the whole object at 32 px and learn shapes)."""

    def __init__(self, dim: int, convs: int = 1):
        super().__init__()
        self.out_dim = self.token_dim = dim
        chans = [3, dim // 4, dim // 2, dim] if convs == 1 else [3, dim // 2, dim, dim]

        def block(i: int) -> nn.Sequential:
            layers: list[nn.Module] = []
            for j in range(convs):
                c_in = chans[i] if j == 0 else chans[i + 1]
                layers += [nn.Conv2d(c_in, chans[i + 1], 3, padding=1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
            return nn.Sequential(*layers, nn.MaxPool2d(2))

        self.features = nn.Sequential(*(block(i) for i in range(3)))

    def block_list(self) -> list[nn.Module]:
        return list(self.features)

    def forward(self, batch: dict[str, Tensor]) -> Encoded:
        grid = self.features(batch[PIXELS])  # [B, D, h, w]
        tokens = grid.flatten(2).transpose(1, 2)  # [B, h*w, D]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(tokens.mean(1), tokens, mask)


def feature_key(modality: str, part: str) -> str:
    """Column holding one field (``pooled``, ``tokens``, ``token_mask``) of a modality's ``Encoded``,
    computed once by its frozen encoder (``data.cache=features``)."""
    return f"feature__{modality}__{part}"


def feature_columns(features: dict[str, Encoded], tokens: bool) -> dict[str, Tensor]:
    """The ``feature_key`` columns of encoder outputs, as ``CachedFeatures`` reads them back: float32
    (exactly what the encoders computed, so training on them matches training on raw rows), and the
    tokens only when ``tokens`` (the fusion reads them: they are most of the bytes)."""
    parts = ("pooled", "tokens", "token_mask") if tokens else ("pooled",)
    return {
        feature_key(m, part): getattr(features[m], part).float() if part != "token_mask" else features[m].token_mask
        for m in sorted(features)
        for part in parts
    }


class CachedFeatures(nn.Module):
    """Stands in for a frozen encoder whose outputs were computed once and travel in the batch
    (``feature_key`` columns): the encoder contract with no weights and no computation.

    Args:
        modality: the modality key whose columns it reads.
        out_dim, token_dim: the encoder's widths (the fusion was sized from them).

    Without token columns (the fusion reads only ``pooled``), ``tokens`` and ``token_mask`` are empty
    (zero tokens a row): hard negatives of image-text matching can still index them.
    """

    def __init__(self, modality: str, out_dim: int, token_dim: int):
        super().__init__()
        self.modality, self.out_dim, self.token_dim = modality, out_dim, token_dim

    def forward(self, batch: dict[str, Tensor]) -> Encoded:
        pooled = batch[feature_key(self.modality, "pooled")]
        tokens = batch.get(feature_key(self.modality, "tokens"))
        if tokens is None:
            return Encoded(
                pooled,
                pooled.new_zeros(pooled.shape[0], 0, self.token_dim),
                torch.zeros(pooled.shape[0], 0, dtype=torch.bool, device=pooled.device),
            )
        return Encoded(pooled, tokens, batch[feature_key(self.modality, "token_mask")].bool())
