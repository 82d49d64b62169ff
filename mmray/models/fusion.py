"""Fusion modules. One contract: ``fusion(features, masks) -> Tensor [B, out_dim]``.

``features`` maps modality -> ``Encoded``; ``masks`` maps modality -> float ``[B]`` (1 present,
0 missing). Modalities are iterated in sorted order. Input sizes come from ``in_dims`` (derived from the
encoders by the builder), never from config.
"""

from __future__ import annotations

from torch import Tensor, nn
import torch

from mmray.models.encoders import Encoded

__all__ = ["FUSIONS", "ConcatFusion"]


class _MissingAware(nn.Module):
    """Replaces a missing modality's pooled vector with a learned 'missing' embedding."""

    def __init__(self, in_dims: dict[str, int]):
        super().__init__()
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m, d in sorted(in_dims.items())})

    def pooled(self, features: dict[str, Encoded], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for m in sorted(features):
            keep = masks[m].unsqueeze(-1).to(features[m].pooled.dtype)
            out[m] = features[m].pooled * keep + self.missing[m] * (1 - keep)
        return out


class ConcatFusion(_MissingAware):
    """Concatenate pooled embeddings, then a two-layer MLP."""

    def __init__(self, in_dims: dict[str, int], hidden_dim: int, dropout: float):
        super().__init__(in_dims)
        self.out_dim = hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(sum(in_dims.values()), hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
        )  # fmt: skip

    def forward(self, features: dict[str, Encoded], masks: dict[str, Tensor]) -> Tensor:
        pooled = self.pooled(features, masks)
        return self.mlp(torch.cat([pooled[m] for m in sorted(pooled)], dim=-1))


FUSIONS: dict[str, type[nn.Module]] = {"concat": ConcatFusion}
