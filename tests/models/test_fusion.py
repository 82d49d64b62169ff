"""Every fusion follows one contract: (features, masks) -> [B, out_dim], with missing modalities honoured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmray.config import ConfigError, ModelConfig, load_config
from mmray.data.schema import IMAGE, TEXT
from mmray.models.builder import build_fusion
from mmray.models.encoders import Encoded
from mmray.models.fusion import presence_weights
from tests.models.conftest import FUSION_NAMES

B, HIDDEN = 5, 16
POOLED = {IMAGE: 12, TEXT: 8}
TOKENS = {IMAGE: (4, 10), TEXT: (6, 8)}  # (count, width): token width may differ from pooled width


class _Dims(nn.Module):
    """Stands in for an encoder: the builder only reads its dimensions."""

    def __init__(self, out_dim: int, token_dim: int):
        super().__init__()
        self.out_dim, self.token_dim = out_dim, token_dim


def make_fusion(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    encoders = nn.ModuleDict({m: _Dims(POOLED[m], TOKENS[m][1]) for m in POOLED})
    cfg = ModelConfig(fusion=name, hidden_dim=HIDDEN, fusion_heads=2, fusion_layers=2, fusion_rank=3)
    return build_fusion(cfg, encoders).eval()


def make_features(seed: int = 1, requires_grad: bool = False) -> dict[str, Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in POOLED:
        n, w = TOKENS[m]
        mask = torch.ones(B, n, dtype=torch.bool)
        mask[0, n // 2 :] = False  # a padded row
        pooled = torch.randn(B, POOLED[m], generator=g).requires_grad_(requires_grad)
        tokens = torch.randn(B, n, w, generator=g).requires_grad_(requires_grad)
        out[m] = Encoded(pooled, tokens, mask)
    return out


def all_present() -> dict[str, torch.Tensor]:
    return {m: torch.ones(B) for m in POOLED}


def perturb(features: dict[str, Encoded], modality: str, row: int) -> dict[str, Encoded]:
    """The same features with ``modality``'s pooled vector and tokens of ``row`` replaced by noise."""
    f = features[modality]
    pooled, tokens = f.pooled.clone(), f.tokens.clone()
    pooled[row] += 3 * torch.randn_like(pooled[row])
    tokens[row] += 3 * torch.randn_like(tokens[row])
    return {**features, modality: Encoded(pooled, tokens, f.token_mask)}


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_output_shape_and_width(name):
    fusion = make_fusion(name)
    out = fusion(make_features(), all_present())
    assert out.shape == (B, HIDDEN) and fusion.out_dim == HIDDEN
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_gradients_reach_every_parameter_and_both_modalities(name):
    fusion = make_fusion(name).train()
    features = make_features(requires_grad=True)
    masks = all_present()
    masks[TEXT][1] = 0.0  # rows missing a modality train the "missing" embeddings
    masks[IMAGE][2] = 0.0
    fusion(features, masks).pow(2).sum().backward()
    for pname, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    for m, f in features.items():  # the encoders below learn through the fusion
        grads = [t.grad for t in (f.pooled, f.tokens) if t.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, m


@pytest.mark.parametrize("name", FUSION_NAMES)
@pytest.mark.parametrize("modality", sorted(POOLED))
def test_a_masked_modality_has_no_influence_on_its_row(name, modality):
    fusion, features, row = make_fusion(name), make_features(), 3
    masks = all_present()
    masks[modality][row] = 0.0
    with torch.no_grad():
        before = fusion(features, masks)
        after = fusion(perturb(features, modality, row), masks)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("name", FUSION_NAMES)
@pytest.mark.parametrize("modality", sorted(POOLED))
def test_masking_changes_only_the_masked_row(name, modality):
    fusion, features, row = make_fusion(name), make_features(), 3
    masks = all_present()
    with torch.no_grad():
        full = fusion(features, masks)
        masks[modality][row] = 0.0
        masked = fusion(features, masks)
        changed = fusion(perturb(features, modality, row), all_present())
    others = [i for i in range(B) if i != row]
    torch.testing.assert_close(masked[others], full[others])
    assert not torch.allclose(masked[row], full[row])
    assert not torch.allclose(changed[row], full[row])  # a present modality does matter


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_a_row_with_every_modality_missing_stays_finite(name):
    masks = {m: torch.zeros(B) for m in POOLED}
    assert torch.isfinite(make_fusion(name)(make_features(), masks)).all()


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_deterministic_under_a_seed(name):
    a = make_fusion(name, seed=7)(make_features(), all_present())
    b = make_fusion(name, seed=7)(make_features(), all_present())
    c = make_fusion(name, seed=8)(make_features(), all_present())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_presence_weights_exclude_missing_modalities_exactly():
    logits = torch.tensor([[0.3, -1.0], [0.3, -1.0], [0.3, -1.0]])
    masks = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    w = presence_weights(logits, masks)
    torch.testing.assert_close(w[0], torch.softmax(logits[0], 0))
    torch.testing.assert_close(w[1], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(w[2], torch.softmax(logits[2], 0))  # nothing present: still a distribution


def test_late_fusion_with_a_linear_head_averages_per_modality_logits():
    fusion, features = make_fusion("late"), make_features()
    head = nn.Linear(HIDDEN, 3)
    w = torch.softmax(fusion.weight_logits, 0)
    pooled = {m: f.pooled for m, f in features.items()}
    per_modality = [head(fusion.branches[m](pooled[m])) for m in sorted(POOLED)]
    expected = sum(wi * logits for wi, logits in zip(w, per_modality))
    torch.testing.assert_close(head(fusion(features, all_present())), expected)


def test_gated_fusion_is_a_gmu_convex_combination():
    fusion, features = make_fusion("gated"), make_features()
    masks = all_present()
    pooled = {m: f.pooled for m, f in features.items()}
    h = {m: torch.tanh(fusion.proj[m](pooled[m])) for m in sorted(POOLED)}
    out = fusion(features, masks)
    lo, hi = torch.minimum(h[IMAGE], h[TEXT]), torch.maximum(h[IMAGE], h[TEXT])
    assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()  # z * h_image + (1 - z) * h_text, z in (0, 1)


def test_cross_attention_heads_must_divide_hidden_dim():
    with pytest.raises(ConfigError, match="model.fusion_heads: 4 must divide model.hidden_dim=30"):
        load_config(None, ["model.fusion=cross_attention", "model.hidden_dim=30", "model.fusion_heads=4"])


def test_cross_attention_projects_token_widths_from_the_encoders():
    fusion = make_fusion("cross_attention")
    assert {m: fusion.proj[m].in_features for m in POOLED} == {m: TOKENS[m][1] for m in POOLED}
