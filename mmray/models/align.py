"""Image-text alignment (ITC): projections into one shared space, the InfoNCE loss, and the aligned similarity.

CLIP's objective, used by ALBEF ("align before fuse") ahead of its fusion: each true caption-image pair
of a batch is pulled together, every other pairing in the batch pushed apart. A label that only the
interaction decides (does the caption describe the image?) gives each encoder no signal of its own:
the text encoder must group synonyms that only the image tells apart and the image encoder must see
the attributes only the text names, so neither starts (bench/RESULTS.md, issue 11 item 9). Alignment
supplies that signal directly, and each row's aligned cosine similarity is then one number that a task
head can read (issue 31). Which rows are true pairs is the caller's business (``model.align.pairs``);
this module only projects and scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AlignProjection", "aligned_similarity", "hard_negatives", "info_nce", "same_rows"]

MIN_TEMPERATURE = 0.01  # CLIP clamps its logit scale at 100 for stability


class AlignProjection(nn.Module):
    """One linear projection per modality into a ``dim``-wide space, L2-normalised, and a learned
    temperature (stored as its log inverse, CLIP's ``logit_scale``).

    Args:
        in_dims: modality -> pooled width of its encoder.
        dim: width of the shared space.
        temperature: initial softmax temperature.
    """

    def __init__(self, in_dims: dict[str, int], dim: int, temperature: float):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in sorted(in_dims.items())})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(self, pooled: dict[str, Tensor]) -> dict[str, Tensor]:
        """modality -> [B, dim] unit vectors."""
        return {m: F.normalize(p(pooled[m]), dim=-1) for m, p in self.proj.items()}

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(1.0 / MIN_TEMPERATURE)).exp()


def aligned_similarity(aligned: dict[str, Tensor], masks: dict[str, Tensor]) -> Tensor:
    """Each row's cosine similarity of its two aligned (unit) vectors, ``[B, 1]``; 0 where the row lacks
    either modality, so a missing modality's vector (the encoder's output on nothing) never reaches a head.
    """
    a, b = (aligned[m] for m in sorted(aligned))
    both = torch.stack([masks[m] for m in sorted(aligned)], 1).min(1).values > 0
    return torch.where(both, (a * b).sum(-1), 0.0).unsqueeze(-1)


def info_nce(a: Tensor, b: Tensor, scale: Tensor, positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over ``n`` aligned rows: row i of ``a`` belongs with row i of ``b``.

    The mean of the a->b and b->a cross-entropies of ``scale * a @ b.T``. The target is the diagonal,
    or with ``positives`` (``[n, n]`` bool, symmetric, diagonal set) every marked pairing equally: rows
    that share one caption show images of what it says, so contrasting them as negatives would push
    true pairs apart (captions repeat often in labelled data). 0 for fewer than two rows (nothing to
    contrast), still attached to the graph so every caller can add it.
    """
    if a.shape[0] < 2:
        return (a.sum() + b.sum()) * 0.0 + scale * 0.0
    logits = scale * a.float() @ b.float().T
    if positives is None:
        target = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    soft = positives.float() / positives.float().sum(1, keepdim=True)
    return (F.cross_entropy(logits, soft) + F.cross_entropy(logits.T, soft.T)) / 2


def same_rows(keys: Tensor) -> Tensor:
    """``[n, n]`` bool: row i equals row j of ``keys`` (``[n, ...]``, e.g. token ids: one caption)."""
    _, group = torch.unique(keys.reshape(keys.shape[0], -1), dim=0, return_inverse=True)
    return group[:, None] == group[None, :]


def hard_negatives(similarity: Tensor, positives: Tensor) -> Tensor:
    """For each row of ``similarity`` (``[n, n]``: row i's caption against every image, or the reverse),
    a column drawn in proportion to ``softmax(similarity[i])`` among the columns not in ``positives[i]``
    (its own pair, and pairs of the same caption): ALBEF's hard negative for matching. -1 where every
    column is a positive (nothing to contrast).
    """
    weights = similarity.float().softmax(1).masked_fill(positives, 0.0)
    usable = weights.sum(1) > 0
    picked = torch.full((similarity.shape[0],), -1, dtype=torch.long, device=similarity.device)
    if usable.any():
        picked[usable] = torch.multinomial(weights[usable], 1).squeeze(1)
    return picked
