"""FusionClassifier: forward = encode + masks + predict; modality dropout; aux heads; gradients."""

from __future__ import annotations

import pytest
import torch

from mmray.config import AlignConfig, ImageConfig, ImageEncoderConfig, ModelConfig, TextConfig, TextEncoderConfig
from mmray.data.labels import Task
from mmray.data.schema import IMAGE, INPUT_IDS, PIXELS, TEXT, mask_key
from mmray.models.builder import build_model
from mmray.models.encoders import CachedFeatures, feature_columns
from tests.models.conftest import FUSION_NAMES, make_batch

TASKS = [
    Task("label", "multiclass", ("a", "b", "c")),
    Task("tags", "multilabel", ("x", "y")),
    Task("flag", "binary", ("false", "true")),
    Task("score", "regression"),
]


def model(fusion: str = "concat", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        fusion=fusion,
        hidden_dim=16,
        fusion_heads=2,
        aux_loss_weight=0.5,
        text_encoder=TextEncoderConfig(dim=16, heads=2),
        image_encoder=ImageEncoderConfig(dim=16),
        **kw,
    )
    return build_model(cfg, TextConfig(max_length=8), ImageConfig(size=16), TASKS, vocab_size=50)


def test_one_head_per_task_with_the_task_width():
    out = model().eval()(make_batch())
    shapes = {t: tuple(v.shape) for t, v in out["logits"].items()}
    assert shapes == {"label": (6, 3), "tags": (6, 2), "flag": (6, 1), "score": (6, 1)}
    assert {m: set(h) for m, h in out["aux"].items()} == {IMAGE: set(out["logits"]), TEXT: set(out["logits"])}


ALIGN = AlignConfig(weight=1.0, projection_dim=8)
READS_SIMILARITY = [f for f in FUSION_NAMES if f != "late"]


@pytest.mark.parametrize("fusion, align", [("concat", AlignConfig()), *((f, ALIGN) for f in READS_SIMILARITY)])
def test_forward_equals_encode_then_predict(fusion, align):
    """The ablation's path (``mmray.score.ablation``: encode, then predict per variant) reads the
    similarity as the forward does."""
    m, batch = model(fusion, align=align).eval(), make_batch()
    with torch.no_grad():
        out = m(batch)
        features = m.encode(batch)
        logits = m.predict(features, m.masks(batch))
    for task in logits:
        torch.testing.assert_close(out["logits"][task], logits[task])


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_the_representation_is_what_the_fusion_and_the_heads_see(fusion):
    """``pooled`` is exactly the encoders' output the fusion is given, ``fused`` exactly its output,
    which the heads read: the vectors ``mmray embed`` writes come from the pass that predicts."""
    m, batch = model(fusion).eval(), make_batch()  # hidden_dim 16, text and image encoders 16 wide
    seen = {}
    m.fusion.register_forward_hook(lambda _, args, out: seen.update(features=args[0], masks=args[1], fused=out))
    with torch.no_grad():
        out = m(batch)
    assert tuple(out["fused"].shape) == (6, 16) and m.fusion.out_dim == 16
    assert {k: tuple(v.shape) for k, v in out["pooled"].items()} == {IMAGE: (6, 16), TEXT: (6, 16)}
    assert torch.equal(out["fused"], seen["fused"])
    for modality, features in seen["features"].items():
        assert torch.equal(out["pooled"][modality], features.pooled)
        assert torch.equal(out["masks"][modality], seen["masks"][modality])
    with torch.no_grad():
        for task, head in m.heads.items():
            assert torch.equal(out["logits"][task], head(out["fused"]))
    assert out["masks"][TEXT].tolist() == [1, 0, 1, 1, 1, 1]  # which rows' text vector means nothing


def test_masks_come_from_the_batch_in_eval_mode():
    m, batch = model(modality_dropout=0.9).eval(), make_batch()
    masks = m.masks(batch)
    assert masks[TEXT].tolist() == batch[mask_key(TEXT)].tolist()
    assert masks[IMAGE].tolist() == batch[mask_key(IMAGE)].tolist()


def test_modality_dropout_drops_whole_modalities_but_never_all_of_a_row():
    m = model(modality_dropout=0.5).train()
    b = 4000
    batch = {
        INPUT_IDS: torch.ones(b, 4, dtype=torch.long),
        mask_key(TEXT): torch.ones(b),
        mask_key(IMAGE): torch.ones(b),
    }
    batch[mask_key(IMAGE)][:100] = 0.0  # text-only rows must keep their text
    torch.manual_seed(0)
    masks = m.masks(batch)
    kept = masks[TEXT] + masks[IMAGE]
    assert (kept >= 1).all()
    assert (masks[TEXT][:100] == 1).all() and (masks[IMAGE][:100] == 0).all()
    dropped_text = 1 - masks[TEXT][100:].mean().item()
    assert 0.2 < dropped_text < 0.35  # P(drop) = 0.5, minus the rows where both would go


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_gradients_reach_every_trainable_parameter(fusion):
    m = model(fusion).train()
    out = m(make_batch())
    loss = sum(v.pow(2).sum() for v in out["logits"].values())
    loss = loss + sum(v.pow(2).sum() for heads in out["aux"].values() for v in heads.values())
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing


@pytest.mark.parametrize("align", [AlignConfig(), ALIGN], ids=["plain", "aligned"])
@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_a_masked_modality_never_reaches_the_fused_logits(fusion, align):
    m, batch = model(fusion, align=align).eval(), make_batch()
    other = {**batch, INPUT_IDS: batch[INPUT_IDS].clone(), PIXELS: batch[PIXELS].clone()}
    other[INPUT_IDS][1] = (other[INPUT_IDS][1] + 5) % 50  # row 1 has no text
    other[PIXELS][2] = 255 - other[PIXELS][2]  # row 2 has no image
    with torch.no_grad():
        a, b = m(batch)["logits"], m(other)["logits"]
    for task in a:
        torch.testing.assert_close(a[task], b[task])


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_whole_model_is_deterministic_under_a_seed(fusion):
    a = model(fusion).eval()(make_batch())["logits"]["label"]
    b = model(fusion).eval()(make_batch())["logits"]["label"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("fusion", READS_SIMILARITY)
def test_heads_read_the_aligned_similarity_beside_the_fused_vector(fusion):
    """Each row's cosine similarity of its aligned text and image vectors is the heads' last input; a
    row without text (1) or without an image (2) reads 0, whatever its encoder made of nothing."""
    m, batch = model(fusion, align=ALIGN).eval(), make_batch()
    with torch.no_grad():
        out = m(batch)
        cosine = (out["aligned"][TEXT] * out["aligned"][IMAGE]).sum(-1)
        similarity = (cosine * torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))[:, None]
        for task, head in m.heads.items():
            assert head.in_features == m.fusion.out_dim + 1 == out["fused"].shape[1] + 1
            torch.testing.assert_close(out["logits"][task], head(torch.cat([out["fused"], similarity], -1)))
    assert (cosine != 0).all()  # so rows 1 and 2 read 0 because of their masks


def test_the_aligned_similarity_learns_from_the_task_loss_alone():
    """The heads' similarity input is no detached feature: the task loss trains the projection too."""
    m = model("concat", align=ALIGN).train()
    out = m(make_batch())
    sum(v.pow(2).sum() for v in out["logits"].values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.align.proj.parameters())
    assert m.align.logit_scale.grad is None  # the temperature only scales the alignment loss


@pytest.mark.parametrize("fusion", [f for f in FUSION_NAMES if f != "late"])
def test_matching_pairs_each_caption_with_its_image_and_two_hard_negatives_from_other_captions(fusion):
    """ITM: the true pairs (target 1), then for each a negative image and a negative caption (target 0),
    never the pair's own, never one of the same caption; the matching head learns from every one."""
    m = model(fusion, align=AlignConfig(weight=1.0, projection_dim=8, itm_weight=1.0)).train()
    batch = make_batch(b=8)
    batch[INPUT_IDS][5] = batch[INPUT_IDS][4]  # rows 4 and 5: one caption
    batch[mask_key(TEXT)][:], batch[mask_key(IMAGE)][:] = 1.0, 1.0
    batch[mask_key(IMAGE)][7] = 0.0  # labelled a pair, but without an image: no pair
    pairs = torch.tensor([True, True, False, True, True, True, True, True])
    combos = []
    original = m.fusion.forward
    m.fusion.forward = lambda features, masks: combos.append(features) or original(features, masks)
    logits, targets = m(batch, pairs=pairs)["match"]
    text_rows, image_rows = (combos[-1][k].pooled for k in (TEXT, IMAGE))
    features = m.encode(batch)
    pooled = {k: features[k].pooled for k in (TEXT, IMAGE)}

    def row_of(k, vectors):
        return [int((pooled[k] - v).abs().sum(-1).argmin()) for v in vectors]

    captions, images = row_of(TEXT, text_rows), row_of(IMAGE, image_rows)  # a caption: its first row
    n = 6  # rows 0, 1, 3, 4, 5, 6
    assert images[:n] == [0, 1, 3, 4, 5, 6] and captions[:n] == [0, 1, 3, 4, 4, 6]
    assert targets.tolist() == [1.0] * n + [0.0] * (len(targets) - n) and len(targets) == 3 * n
    caption_of = {0: 0, 1: 1, 3: 3, 4: 4, 5: 4, 6: 6}
    for c, i in zip(captions[n:], images[n:]):
        assert i in caption_of and c in caption_of and caption_of[i] != c, (c, i)
    assert logits.shape == targets.shape
    torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.match_head.parameters())


def test_matching_with_fewer_than_two_pairs_is_empty_but_keeps_the_head_in_the_graph():
    m = model("concat", align=AlignConfig(weight=1.0, projection_dim=8, itm_weight=1.0)).train()
    logits, targets = m(make_batch(), pairs=torch.tensor([True, False, False, False, False, False]))["match"]
    assert logits.shape == targets.shape == (0,)
    logits.sum().backward()
    assert all(p.grad is not None for p in m.match_head.parameters())
    assert "match" not in m(make_batch())  # no pairs given: scoring and validation


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_on_cached_features_the_model_is_the_same_and_holds_no_encoder(fusion):
    """``data.cache=features``: the encoders' outputs, computed once, stand in for the encoders. The
    batch holds no pixels and no attention mask, so no encoder could run; every other part is shared."""
    itm = fusion != "late"  # matching recombines the cached outputs into hard negatives
    align = AlignConfig(weight=1.0, projection_dim=8, itm_weight=1.0 if itm else 0.0)
    m, batch = model(fusion, align=align).eval(), make_batch()
    cached = m.with_cached_features().eval()
    assert all(isinstance(e, CachedFeatures) for e in cached.encoders.values())
    assert not list(cached.encoders.parameters())
    assert cached.fusion is m.fusion and cached.heads is m.heads and cached.align is m.align
    pairs = torch.ones(6, dtype=torch.bool)
    with torch.no_grad():
        columns = feature_columns(m.encode(batch), tokens=fusion == "cross_attention")
        rows = {
            INPUT_IDS: batch[INPUT_IDS],
            mask_key(TEXT): batch[mask_key(TEXT)],
            mask_key(IMAGE): batch[mask_key(IMAGE)],
        }
        torch.manual_seed(1)  # the hard negatives are drawn at random
        expected = m(batch, pairs=pairs)
        torch.manual_seed(1)
        out = cached({**rows, **columns}, pairs=pairs)
    for task in expected["logits"]:
        torch.testing.assert_close(out["logits"][task], expected["logits"][task])
    torch.testing.assert_close(out["fused"], expected["fused"])
    if itm:
        torch.testing.assert_close(out["match"], expected["match"])
