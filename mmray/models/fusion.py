"""Fusion modules. One contract: ``fusion(features, masks) -> Tensor [B, out_dim]``.

``features`` maps modality -> ``Encoded``; ``masks`` maps modality -> float ``[B]`` (1 present,
0 missing). Modalities are iterated in sorted order. Input sizes come from the encoders (derived by
the builder), never from config. A missing modality never influences a row's output: pooled-vector
fusions swap in a learned "missing" embedding, weighting fusions (gated, late) give it zero weight,
and cross-attention hides its tokens. A fusion that reads ``tokens`` and ``token_mask``, not only
``pooled``, says so with ``reads_tokens = True`` (cached encoder outputs keep the tokens only then).

    concat           concatenate pooled vectors, two-layer MLP
    gated            gated multimodal unit (Arevalo et al. 2017)
    cross_attention  each modality's tokens attend to the others' tokens, a few layers (text <-> image)
    bilinear         low-rank multimodal fusion, LMF (Liu et al. 2018)
    late             one branch per modality, outputs averaged with learned weights; with the linear
                     task heads this is exactly a learned-weighted average of per-modality logits
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmray.models.encoders import Encoded, masked_mean

__all__ = [
    "BilinearFusion",
    "ConcatFusion",
    "CrossAttentionFusion",
    "GatedFusion",
    "LateFusion",
    "presence_weights",
    "zero_missing",
]


def presence_weights(logits: Tensor, masks: Tensor) -> Tensor:
    """Softmax over modalities (dim 1) that gives missing modalities exactly zero weight.

    Args:
        logits: ``[B, M, ...]`` weight logits.
        masks: ``[B, M]`` 1 present / 0 missing. A row with nothing present keeps its plain softmax
            (over inputs that carry no row content) instead of NaN.
    """
    present = (masks > 0).view(*masks.shape, *([1] * (logits.dim() - 2)))
    hide = ~present & present.any(dim=1, keepdim=True)
    return torch.softmax(logits.masked_fill(hide, float("-inf")), dim=1)


def zero_missing(features: dict[str, Encoded], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Pooled vectors with missing rows zeroed, for fusions that weight a missing modality by 0 anyway."""
    return {m: features[m].pooled * masks[m].unsqueeze(-1).to(features[m].pooled.dtype) for m in sorted(features)}


def _or_missing(x: Tensor, mask: Tensor, missing: Tensor) -> Tensor:
    """``x`` [B, D] where the row has the modality (mask 1), the learned ``missing`` [D] where not."""
    keep = mask.unsqueeze(-1).to(x.dtype)
    return x * keep + missing * (1 - keep)


class _MissingAware(nn.Module):
    """Replaces a missing modality's pooled vector with a learned 'missing' embedding."""

    def __init__(self, in_dims: dict[str, int]):
        super().__init__()
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m, d in sorted(in_dims.items())})

    def pooled(self, features: dict[str, Encoded], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: _or_missing(features[m].pooled, masks[m], self.missing[m]) for m in sorted(features)}


class ConcatFusion(_MissingAware):
    """Concatenate pooled embeddings, then a two-layer MLP."""

    def __init__(self, in_dims: dict[str, int], hidden_dim: int, dropout: float):
        super().__init__(in_dims)
        self.out_dim = hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(sum(in_dims.values()), hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
        )

    def forward(self, features: dict[str, Encoded], masks: dict[str, Tensor]) -> Tensor:
        pooled = self.pooled(features, masks)
        return self.mlp(torch.cat([pooled[m] for m in sorted(pooled)], dim=-1))


class GatedFusion(nn.Module):
    """Gated multimodal unit: ``h = sum_m z_m * tanh(W_m x_m)``, gates ``z = softmax_m(W_z [x_1; ...; x_M])``.

    With two modalities the softmax is GMU's sigmoid gate ``z`` / ``1 - z``; per output unit, as in the
    paper. A missing modality gets gate 0, so the row is represented by the modalities it has.
    """

    def __init__(self, in_dims: dict[str, int], hidden_dim: int, dropout: float):
        super().__init__()
        self.out_dim, self.keys = hidden_dim, sorted(in_dims)
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden_dim) for m, d in sorted(in_dims.items())})
        self.gate = nn.Linear(sum(in_dims.values()), hidden_dim * len(in_dims))
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: dict[str, Encoded], masks: dict[str, Tensor]) -> Tensor:
        pooled = zero_missing(features, masks)
        h = torch.stack([torch.tanh(self.proj[m](pooled[m])) for m in self.keys], 1)  # [B, M, H]
        z = self.gate(torch.cat([pooled[m] for m in self.keys], -1)).view(h.shape)
        z = presence_weights(z, torch.stack([masks[m] for m in self.keys], 1))
        return self.dropout((z * h).sum(1))


class _CrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention (queries from one modality, keys/values from the others) + FFN."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, context: Tensor, ignore: Tensor) -> Tensor:
        c = self.norm_kv(context)
        x = x + self.attn(self.norm_q(x), c, c, key_padding_mask=ignore, need_weights=False)[0]
        return x + self.ff(self.norm_ff(x))


class CrossAttentionFusion(nn.Module):
    """Tokens of each modality attend to the other modalities' tokens (text -> image grid and back).

    Each modality's context starts with a learned null token that is always visible, so a row whose
    other modality is missing (its tokens hidden) still attends somewhere and never sees that
    modality's content. After ``layers`` rounds each modality's tokens are mean-pooled (a learned
    embedding stands in for a missing modality) and the concatenation is projected to ``hidden_dim``.

    Args:
        token_dims: modality -> token width of its encoder.
    """

    reads_tokens = True

    def __init__(self, token_dims: dict[str, int], hidden_dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.out_dim, self.keys = hidden_dim, sorted(token_dims)
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden_dim) for m, d in sorted(token_dims.items())})
        self.null = nn.ParameterDict({m: nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02) for m in self.keys})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(hidden_dim)) for m in self.keys})
        self.layers = nn.ModuleList(
            nn.ModuleDict({m: _CrossAttentionLayer(hidden_dim, heads, dropout) for m in self.keys})
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Sequential(nn.Linear(hidden_dim * len(self.keys), hidden_dim), nn.GELU(), nn.Dropout(dropout))

    def _context(self, x: dict[str, Tensor], visible: dict[str, Tensor], m: str) -> tuple[Tensor, Tensor]:
        """Keys/values for modality ``m``: null token + every other modality's tokens; True = ignore."""
        parts, ignore = [], []
        for o in self.keys:
            if o == m:
                continue
            b = x[o].shape[0]
            parts += [self.null[o].expand(b, -1, -1), x[o]]
            ignore += [torch.zeros(b, 1, dtype=torch.bool, device=x[o].device), ~visible[o]]
        return torch.cat(parts, 1), torch.cat(ignore, 1)

    def forward(self, features: dict[str, Encoded], masks: dict[str, Tensor]) -> Tensor:
        x = {m: self.proj[m](features[m].tokens) for m in self.keys}
        visible = {m: features[m].token_mask & (masks[m] > 0).unsqueeze(1) for m in self.keys}
        for layer in self.layers:
            contexts = {m: self._context(x, visible, m) for m in self.keys}  # from the previous round
            x = {m: layer[m](x[m], *contexts[m]) for m in self.keys}
        pooled = [
            _or_missing(masked_mean(self.norm(x[m]), features[m].token_mask), masks[m], self.missing[m])
            for m in self.keys
        ]
        return self.out(torch.cat(pooled, -1))


class BilinearFusion(_MissingAware):
    """Low-rank multimodal fusion (LMF): ``h = sum_r w_r * prod_m ([x_m; 1] W_m^(r)) + b``.

    The appended 1 keeps every lower-order (unimodal) term of the full tensor product; rank-``R``
    factors make it linear in the number of modalities. Inputs are layer-normed first so the
    product of factors starts at a sane scale whatever the encoders output.
    """

    def __init__(self, in_dims: dict[str, int], hidden_dim: int, rank: int, dropout: float):
        super().__init__(in_dims)
        self.out_dim, self.keys = hidden_dim, sorted(in_dims)
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in sorted(in_dims.items())})
        self.factors = nn.ParameterDict(
            {
                m: nn.Parameter(nn.init.xavier_normal_(torch.empty(rank, d + 1, hidden_dim)))
                for m, d in sorted(in_dims.items())
            }
        )
        self.rank_weights = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, rank)).squeeze(0))
        self.bias = nn.Parameter(torch.zeros(hidden_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: dict[str, Encoded], masks: dict[str, Tensor]) -> Tensor:
        pooled = self.pooled(features, masks)
        product = None
        for m in self.keys:
            z = self.norm[m](pooled[m])
            z = torch.cat([z, torch.ones_like(z[:, :1])], -1)
            f = torch.einsum("bd,rdh->brh", z, self.factors[m])
            product = f if product is None else product * f
        return self.dropout(torch.einsum("brh,r->bh", product, self.rank_weights) + self.bias)


class LateFusion(nn.Module):
    """One branch (MLP) per modality, averaged with learned softmax weights over present modalities.

    The task heads are linear, so ``head(sum_m w_m h_m) = sum_m w_m head(h_m)``: this is late fusion
    by a learned-weighted average of per-modality logits, inside the one fusion contract.
    """

    def __init__(self, in_dims: dict[str, int], hidden_dim: int, dropout: float):
        super().__init__()
        self.out_dim, self.keys = hidden_dim, sorted(in_dims)
        self.branches = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.Linear(d, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim)
                )
                for m, d in sorted(in_dims.items())
            }
        )
        self.weight_logits = nn.Parameter(torch.zeros(len(self.keys)))

    def forward(self, features: dict[str, Encoded], masks: dict[str, Tensor]) -> Tensor:
        pooled = zero_missing(features, masks)
        h = torch.stack([self.branches[m](pooled[m]) for m in self.keys], 1)  # [B, M, H]
        present = torch.stack([masks[m] for m in self.keys], 1)
        w = presence_weights(self.weight_logits.expand(h.shape[0], -1), present)  # [B, M]
        return (w.unsqueeze(-1) * h).sum(1)
