"""Exact Recall@K of image-text retrieval, computed blockwise so memory stays bounded at any row count.

Row i of the queries (e.g. captions) belongs with row i of the candidates (their images). A query is a
hit at K when a correct candidate is among the K it scores highest (dot products of unit vectors:
cosine similarity). Candidates of equal score are ordered by their index, so a tie is decided the same
way on every run and every block size. "Correct" is the query's own pair, or, with ``keys``, every
candidate of the query's key: rows of one caption show images of what it says (generated data repeats
captions), so an image counts for every caption equal to its own.

Queries go in blocks against all candidates and only each query's rank is kept, so memory is one block
of scores, never an N x N matrix: 100k rows take ``100k / block`` passes of a ``block x 100k`` product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["KS", "best_correct_rank", "recall_at_k", "retrieval_recalls"]

KS = (1, 5, 10)
_BLOCK_SCORES = 1 << 22  # scores held at once (16 MiB of float32), so a block's rows shrink as candidates grow


def best_correct_rank(scores: Tensor, correct: Tensor) -> Tensor:
    """Per query (row of ``scores``, ``[b, n]``): the 0-based rank of its best correct candidate when
    the candidates are ordered by score, ties by index. ``correct`` (``[b, n]`` bool) holds at least one
    candidate per row."""
    best = scores.masked_fill(~correct, float("-inf"))
    top = best.max(1, keepdim=True).values
    first = best.argmax(1, keepdim=True)  # the first of equal maxima, so the lowest index wins the tie
    index = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > top) | ((scores == top) & (index < first))
    return ahead.sum(1)


def recall_at_k(
    queries: Tensor,
    candidates: Tensor,
    keys: Tensor | None = None,
    ks: Sequence[int] = KS,
    block_rows: int | None = None,
) -> dict[str, float]:
    """Recall@K of ``queries`` (``[n, d]``) against ``candidates`` (``[n, d]``, row i the pair of query i).

    Args:
        keys: ``[n]`` integers; candidates of the query's key are correct (default: its own row only).
        ks: the cut-offs reported.
        block_rows: queries scored at once (default: as many as keep a block at ``_BLOCK_SCORES`` scores).

    Returns:
        ``{"R@1": ..., "R@5": ..., ...}``: the share of queries that are hits at each K.

    Raises:
        ValueError: no rows, or queries, candidates and keys of different lengths.
    """
    n = queries.shape[0]
    if n == 0 or candidates.shape[0] != n or (keys is not None and len(keys) != n):
        raise ValueError(f"recall_at_k: {n} queries, {candidates.shape[0]} candidates, keys {keys is not None}")
    keys = torch.arange(n) if keys is None else torch.as_tensor(keys)
    block = block_rows or max(1, _BLOCK_SCORES // n)
    cut = torch.tensor(list(ks))
    hits = torch.zeros(len(ks), dtype=torch.long)
    for start in range(0, n, block):
        rows = slice(start, start + block)
        rank = best_correct_rank(queries[rows] @ candidates.T, keys[rows, None] == keys[None, :])
        hits += (rank[None, :] < cut[:, None]).sum(1)
    return {f"R@{k}": hits[i].item() / n for i, k in enumerate(ks)}


def retrieval_recalls(
    text: Tensor, image: Tensor, keys: Tensor | None = None, ks: Sequence[int] = KS, block_rows: int | None = None
) -> dict[str, dict[str, float]]:
    """Both directions over ``n`` caption-image pairs: ``{"text_to_image": recall_at_k(text, image),
    "image_to_text": recall_at_k(image, text)}``, with the same ``keys`` (one key per pair)."""
    return {
        "text_to_image": recall_at_k(text, image, keys, ks, block_rows),
        "image_to_text": recall_at_k(image, text, keys, ks, block_rows),
    }
