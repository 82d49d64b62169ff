"""Blockwise Recall@K (mmray.retrieval) against hand-worked cases and a brute-force N x N ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmray.retrieval import best_correct_rank, recall_at_k, retrieval_recalls


def brute_force(queries: torch.Tensor, candidates: torch.Tensor, keys, ks) -> dict[str, float]:
    """The full score matrix; each query's candidates sorted by (score desc, index asc), then the
    position of the first correct one."""
    scores = (queries @ candidates.T).numpy()
    keys = np.arange(len(queries)) if keys is None else np.asarray(keys)
    ranks = []
    for i, row in enumerate(scores):
        order = np.lexsort((np.arange(len(row)), -row))  # last key sorts first: score desc, then index
        ranks.append(int(np.flatnonzero(keys[order] == keys[i])[0]))
    ranks = np.array(ranks)
    return {f"R@{k}": float((ranks < k).mean()) for k in ks}


def test_a_hand_worked_three_by_three():
    # scores text i . image j: row 0 [1, 0, 0] (own first), row 1 [0, 1, 2] (own second),
    # row 2 [3, 2, 1] (own third)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    image = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0]])
    assert recall_at_k(text, image, ks=(1, 2, 3)) == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}
    # image j . text i is row j of image: [1, 0, 3], [0, 1, 2], [0, 2, 1]: each own pair second
    assert recall_at_k(image, text, ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}


def test_a_tie_goes_to_the_lower_index():
    text = torch.ones(3, 1)
    image = torch.ones(3, 1)  # every score 1: candidate order 0, 1, 2 for every query
    assert best_correct_rank(text @ image.T, torch.eye(3, dtype=torch.bool)).tolist() == [0, 1, 2]
    assert recall_at_k(text, image, ks=(1, 2, 3)) == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}


def test_a_shared_key_makes_every_candidate_of_it_correct():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[0.0, 0.5], [1.0, 0.0], [0.2, 0.9]])
    # query 0's own image (0) ranks third, but image 1, of the same caption, ranks first
    assert recall_at_k(text, image, ks=(1,)) == {"R@1": 2 / 3}
    assert recall_at_k(text, image, keys=torch.tensor([7, 7, 9]), ks=(1,)) == {"R@1": 1.0}


@pytest.mark.parametrize("block_rows", [1, 3, 16, 64, None])
@pytest.mark.parametrize("shared", [False, True])
def test_blockwise_equals_the_full_matrix(block_rows, shared):
    rng = np.random.default_rng(block_rows or 0)
    n, ks = 64, (1, 5, 10)
    text, image = (torch.nn.functional.normalize(torch.randn(n, 8, dtype=torch.float64), dim=1) for _ in range(2))
    image = torch.nn.functional.normalize(image + 1.5 * text, dim=1)  # correlated: recalls between 0 and 1
    keys = torch.from_numpy(rng.integers(0, 12, n)) if shared else None
    got = recall_at_k(text, image, keys, ks, block_rows)
    assert got == pytest.approx(brute_force(text, image, keys, ks), abs=0)
    assert 0 < got["R@1"] < got["R@10"] <= 1


@pytest.mark.parametrize("block_rows", [1, 5, 32])
def test_many_ties_are_ranked_alike_in_every_block_size(block_rows):
    # small integer vectors: scores are exact in float32 and tie often
    gen = torch.Generator().manual_seed(3)
    text, image = (torch.randint(-1, 2, (40, 3), generator=gen).float() for _ in range(2))
    keys = torch.randint(0, 6, (40,), generator=gen)
    for k in (None, keys):
        assert recall_at_k(text, image, k, (1, 3, 10), block_rows) == brute_force(text, image, k, (1, 3, 10))


def test_both_directions_and_bad_shapes():
    text = torch.eye(4)
    image = torch.eye(4)[[1, 0, 2, 3]]  # rows 0 and 1 swapped
    both = retrieval_recalls(text, image, ks=(1, 2))
    assert both == {"text_to_image": {"R@1": 0.5, "R@2": 1.0}, "image_to_text": {"R@1": 0.5, "R@2": 1.0}}
    with pytest.raises(ValueError):
        recall_at_k(torch.zeros(0, 2), torch.zeros(0, 2))
    with pytest.raises(ValueError):
        recall_at_k(torch.zeros(3, 2), torch.zeros(2, 2))
