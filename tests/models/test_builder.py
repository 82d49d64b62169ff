"""The builder derives dimensions; the assembled model maps a batch to per-task logits."""

from __future__ import annotations

import pytest
import torch

from mmray.config import ImageConfig, ImageEncoderConfig, ModelConfig, TextConfig, TextEncoderConfig
from mmray.data.labels import Task
from mmray.data.schema import IMAGE, TEXT
from mmray.models.builder import build_model
from tests.models.conftest import make_batch

TASKS = [Task("label", "multiclass", ("a", "b", "c")), Task("tags", "multilabel", ("x", "y"))]


def tiny_model_cfg(**kw) -> ModelConfig:
    return ModelConfig(
        hidden_dim=24, text_encoder=TextEncoderConfig(dim=16, heads=2), image_encoder=ImageEncoderConfig(dim=16), **kw
    )


def tiny_model(**kw):
    return build_model(tiny_model_cfg(**kw), TextConfig(max_length=8), ImageConfig(size=16), TASKS, vocab_size=50)


def test_output_shapes_per_task(seed):
    out = tiny_model(aux_loss_weight=0.5)(make_batch(b=4))
    assert out["logits"]["label"].shape == (4, 3)
    assert out["logits"]["tags"].shape == (4, 2)
    assert set(out["aux"]) == {IMAGE, TEXT}
    assert out["aux"][TEXT]["label"].shape == (4, 3)


def test_fusion_input_size_is_derived_from_encoders(seed):
    model = tiny_model()
    first = model.fusion.mlp[0]
    assert first.in_features == model.encoders[TEXT].out_dim + model.encoders[IMAGE].out_dim == 32


def test_no_aux_heads_when_weight_is_zero(seed):
    assert len(tiny_model(aux_loss_weight=0.0).aux_heads) == 0


def pretrained_cfg(tiny_bert_dir: str, weights: str | None = None, fusion: str = "concat") -> ModelConfig:
    text = TextEncoderConfig(kind="hf", name=tiny_bert_dir, freeze=1)
    image = ImageEncoderConfig(kind="torchvision", name="mobilenet_v3_small", weights=weights)
    return ModelConfig(
        fusion=fusion, hidden_dim=16, fusion_heads=2, aux_loss_weight=0.5, text_encoder=text, image_encoder=image
    )


def test_pretrained_encoders_give_the_fusion_its_sizes(tiny_bert_dir, seed):
    model = build_model(
        pretrained_cfg(tiny_bert_dir), TextConfig(max_length=8), ImageConfig(size=32), TASKS, vocab_size=60
    )
    assert model.fusion.mlp[0].in_features == 16 + 1024  # BERT hidden + MobileNetV3's pooled width
    xattn = build_model(
        pretrained_cfg(tiny_bert_dir, fusion="cross_attention"),
        TextConfig(max_length=8),
        ImageConfig(size=32),
        TASKS,
        vocab_size=60,
    )
    assert {m: p.in_features for m, p in xattn.fusion.proj.items()} == {TEXT: 16, IMAGE: 576}  # token widths
    assert xattn.aux_heads[IMAGE]["label"].in_features == 1024


def test_checkpoint_rebuilds_pretrained_encoders_without_their_sources(tiny_bert_dir, tmp_path, seed):
    """Scoring needs neither the HF model directory nor the image weights file: the checkpoint has both."""
    import json
    import shutil

    import torchvision

    from mmray.checkpoint import CheckpointInfo, load_model, save_checkpoint
    from mmray.data.preprocess import PreprocessSpec

    bert = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, bert)
    weights = tmp_path / "mnv3.pt"
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict(), weights)
    cfg = pretrained_cfg(str(bert), weights=str(weights))
    text, image = TextConfig(max_length=8), ImageConfig(size=32)
    model = build_model(cfg, text, image, TASKS, 60).eval()
    spec = PreprocessSpec(tasks=tuple(TASKS), text=text, image=image)
    save_checkpoint(tmp_path / "ckpt", model, CheckpointInfo(cfg, spec.to_dict(), tuple(TASKS), 60, 0, {}), {})
    shutil.rmtree(bert)
    weights.unlink()
    assert json.loads((tmp_path / "ckpt" / "architecture" / "text" / "config.json").read_text())["hidden_size"] == 16
    rebuilt = load_model(tmp_path / "ckpt")
    batch = make_batch(b=4, size=32)
    with torch.no_grad():
        for task, logits in model(batch)["logits"].items():
            torch.testing.assert_close(rebuilt(batch)["logits"][task], logits)


def test_text_longer_than_the_pretrained_positions_names_the_key(tiny_bert_dir):
    with pytest.raises(ValueError, match=r"data\.text\.max_length: 64 exceeds the 32 positions"):
        build_model(pretrained_cfg(tiny_bert_dir), TextConfig(max_length=64), ImageConfig(size=32), TASKS, 60)


def test_align_projection_is_built_only_when_weighted_and_survives_a_checkpoint(tmp_path, seed):
    """What scoring does (``Predictor``: ``load_model`` then ``forward``) gives the logits, aligned vectors
    and temperature the training model had, similarity column included."""
    from mmray.checkpoint import CheckpointInfo, load_model, save_checkpoint
    from mmray.config import AlignConfig
    from mmray.data.preprocess import PreprocessSpec

    assert tiny_model().align is None
    assert tiny_model()(make_batch(b=4))["aligned"] == {}
    cfg = tiny_model_cfg(align=AlignConfig(weight=1.0, projection_dim=8, temperature=0.2))
    model = build_model(cfg, TextConfig(max_length=8), ImageConfig(size=16), TASKS, vocab_size=50).eval()
    out = model(make_batch(b=4))
    assert out["aligned"][TEXT].shape == out["aligned"][IMAGE].shape == (4, 8)
    assert out["aligned_scale"].item() == pytest.approx(5.0)
    with torch.no_grad():
        model.align.logit_scale.add_(0.5)  # a learned temperature must be saved, not re-initialised
        for head in model.heads.values():
            head.weight[:, -1] = 3.0  # the similarity column weighs in the logits
    text, image = TextConfig(max_length=8), ImageConfig(size=16)
    spec = PreprocessSpec(tasks=tuple(TASKS), text=text, image=image)
    save_checkpoint(tmp_path / "ckpt", model, CheckpointInfo(cfg, spec.to_dict(), tuple(TASKS), 50, 0, {}), {})
    rebuilt = load_model(tmp_path / "ckpt")
    assert rebuilt.heads_read_similarity
    batch = make_batch(b=6)
    with torch.no_grad():
        a, b = model(batch), rebuilt(batch)
    for m in (TEXT, IMAGE):
        torch.testing.assert_close(b["aligned"][m], a["aligned"][m])
    torch.testing.assert_close(b["aligned_scale"], a["aligned_scale"])
    for task in a["logits"]:
        torch.testing.assert_close(b["logits"][task], a["logits"][task], rtol=0, atol=0)
    torch.testing.assert_close(b["fused"], a["fused"], rtol=0, atol=0)


@pytest.mark.parametrize("fusion", ["concat", "gated", "cross_attention", "bilinear", "late"])
def test_heads_read_one_more_input_with_alignment_except_under_late_fusion(fusion, seed):
    from mmray.config import AlignConfig

    plain = tiny_model(fusion=fusion, fusion_heads=2)
    aligned = tiny_model(fusion=fusion, fusion_heads=2, align=AlignConfig(weight=0.5, projection_dim=8))
    assert not plain.heads_read_similarity and plain.fusion.out_dim == aligned.fusion.out_dim == 24
    assert {h.in_features for h in plain.heads.values()} == {24}
    reads = fusion != "late"  # late's heads must stay linear in the per-modality branches it averages
    assert aligned.heads_read_similarity == reads
    assert {h.in_features for h in aligned.heads.values()} == {24 + reads}
    out = aligned(make_batch(b=4))
    assert out["fused"].shape == (4, 24)  # what `mmray embed` writes stays the fusion's own vector
    assert out["logits"]["label"].shape == (4, 3)
