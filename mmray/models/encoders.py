"""Modality encoders. Each maps the batch to an ``Encoded`` (pooled vector + token/patch grid).

Contract: ``encoder(batch) -> Encoded`` and an ``out_dim`` attribute, so builders derive the fusion's
input sizes from the encoders instead of asking the user.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from mmray.data import schema as S

__all__ = ["Encoded", "TinyImageEncoder", "TinyTextEncoder", "masked_mean"]


class Encoded(NamedTuple):
    pooled: Tensor  # [B, D]
    tokens: Tensor  # [B, T, D]: text tokens or image grid/patches, for cross-attention
    token_mask: Tensor  # [B, T] bool, True where a token is real


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


class TinyTextEncoder(nn.Module):
    """Embedding + small Transformer encoder, mean or CLS pooled. For tests, demos and small data."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_length: int, pooling: str):
        super().__init__()
        self.out_dim, self.pooling = dim, pooling
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, batch: dict[str, Tensor]) -> Encoded:
        ids, mask = batch[S.INPUT_IDS], batch[S.ATTENTION_MASK].bool()
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position(pos)
        # Rows without any text have an all-False mask; keep one key so attention stays finite.
        safe = mask.clone()
        safe[:, 0] = True
        x = self.norm(self.blocks(x, src_key_padding_mask=~safe))
        pooled = x[:, 0] if self.pooling == "cls" else masked_mean(x, mask)
        return Encoded(pooled, x, mask)


class TinyImageEncoder(nn.Module):
    """Three conv blocks; the last feature map is the grid, its average the pooled vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim
        chans = [3, dim // 4, dim // 2, dim]

        def block(i: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU(),
                nn.MaxPool2d(2),
            )  # fmt: skip

        self.features = nn.Sequential(*(block(i) for i in range(3)))

    def forward(self, batch: dict[str, Tensor]) -> Encoded:
        grid = self.features(batch[S.PIXELS])  # [B, D, h, w]
        tokens = grid.flatten(2).transpose(1, 2)  # [B, h*w, D]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(tokens.mean(1), tokens, mask)
