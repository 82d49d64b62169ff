"""Image-text alignment: the InfoNCE loss scores aligned pairs, the projection is unit-norm with a bounded
temperature, and alignment alone teaches two encoders to retrieve each other's pair."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmray.models.align import MIN_TEMPERATURE, AlignProjection, hard_negatives, info_nce


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_aligned_pairs_score_far_below_chance_and_shuffled_pairs_near_it(seed):
    a = unit(torch.randn(16, 8))
    scale = torch.tensor(20.0)
    aligned = info_nce(a, a, scale).item()
    shuffled = info_nce(a, a[torch.randperm(16)], scale).item()
    assert aligned < 0.1 * math.log(16) < shuffled


def test_loss_is_the_mean_of_both_directions_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = unit(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    s = torch.tensor(2.0)
    logits = s * a @ b.T  # rows: a -> b, columns: b -> a
    a_to_b = -(logits.log_softmax(1).diagonal()).mean()
    b_to_a = -(logits.T.log_softmax(1).diagonal()).mean()
    torch.testing.assert_close(info_nce(a, b, s), (a_to_b + b_to_a) / 2)
    torch.testing.assert_close(info_nce(a, b, s), info_nce(b, a, s))


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_pairs_is_zero_and_still_backpropagates(n):
    a = torch.randn(n, 4, requires_grad=True)
    scale = torch.tensor(5.0, requires_grad=True)
    loss = info_nce(a, a * 2, scale)
    assert loss.item() == 0.0
    loss.backward()  # a caller adds it to the task loss unconditionally
    assert scale.grad is not None and scale.grad.item() == 0.0


def test_projection_is_unit_norm_per_modality_and_its_temperature_is_clamped(seed):
    proj = AlignProjection({"text": 6, "image": 10}, dim=4, temperature=0.07)
    out = proj({"text": torch.randn(3, 6), "image": torch.randn(3, 10)})
    assert set(out) == {"image", "text"} and out["text"].shape == out["image"].shape == (3, 4)
    torch.testing.assert_close(out["text"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(proj.scale(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        proj.logit_scale.fill_(10.0)  # e^10: far past CLIP's bound
    assert proj.scale().item() == pytest.approx(1 / MIN_TEMPERATURE)


def test_alignment_alone_teaches_two_encoders_to_retrieve_the_pair(seed):
    """Two modalities that share a hidden attribute through different random maps: only InfoNCE links
    them. Before training, caption -> image retrieval is at chance; after, far above it."""
    g = torch.Generator().manual_seed(0)
    attr = lambda n: torch.randint(0, 8, (n,), generator=g)  # noqa: E731
    to_text, to_image = torch.randn(8, 12, generator=g), torch.randn(8, 20, generator=g)
    text_enc, image_enc = nn.Linear(12, 16), nn.Linear(20, 16)
    proj = AlignProjection({"text": 16, "image": 16}, dim=8, temperature=0.1)
    params = [*text_enc.parameters(), *image_enc.parameters(), *proj.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def embed(k):
        text = to_text[k] + 0.1 * torch.randn(len(k), 12, generator=g)
        image = to_image[k] + 0.1 * torch.randn(len(k), 20, generator=g)
        return proj({"text": text_enc(text), "image": image_enc(image)})

    def retrieval(k) -> float:
        with torch.no_grad():
            z = embed(k)
            best = (z["text"] @ z["image"].T).argmax(1)
        return (k[best] == k).float().mean().item()  # the retrieved image shows the caption's attribute

    held_out = attr(256)
    before = retrieval(held_out)
    for _ in range(150):
        z = embed(attr(64))
        loss = info_nce(z["text"], z["image"], proj.scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = retrieval(held_out)
    assert before < 0.4  # chance is 1/8
    assert after > 0.9


def test_hard_negatives_are_never_a_positive_and_follow_the_similarity(seed):
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # rows 0 and 1 share a caption
    similarity = torch.tensor([[9.0, 9.0, 0.0, 5.0], [9.0, 9.0, 0.0, 5.0], [0.0, 0.0, 9.0, 0.0], [1.0, 1.0, 1.0, 9.0]])
    draws = torch.stack([hard_negatives(similarity, positives) for _ in range(400)])  # [draws, row]
    for row in range(4):
        assert not positives[row, draws[:, row]].any()  # never its own pair, never its caption's
    assert (draws[:, 0] == 3).float().mean() > 0.9  # the most similar negative, e^5 against e^0
    assert (draws[:, 3] >= 0).all() and set(draws[:, 2].tolist()) <= {0, 1, 3}
    assert hard_negatives(similarity[:2, :2], positives[:2, :2]).tolist() == [-1, -1]  # all one caption
