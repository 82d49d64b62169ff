"""torchvision image encoders: any classifier by name, classifier dropped, pooled + grid/patch tokens,
weights from a local/S3 file or a torchvision weights name (the fetch is faked: no test downloads)."""

from __future__ import annotations

import io
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from mmray.config import StorageConfig
from mmray.data import storage
from mmray.models.freeze import apply_freeze
from mmray.models.vision import build_torchvision_encoder

SIZE = 32
# name -> (pooled width, token width, tokens at 32 px, freezable blocks)
REQUIRED = {
    "resnet18": (512, 512, 1, 4),
    "resnet50": (2048, 2048, 1, 4),
    "efficientnet_b0": (1280, 1280, 1, 9),
    "convnext_tiny": (768, 768, 1, 8),
    "vit_b_16": (768, 768, 4, 12),  # 32 px / 16 px patches = 2x2 patch tokens
}
_CACHE: dict[str, nn.Module] = {}


def encoder(name: str):
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = build_torchvision_encoder(name, SIZE)
    return _CACHE[name]


def reference(name: str, **kwargs) -> nn.Module:
    """A plain torchvision model with seeded weights, as a user would have trained and saved it."""
    torch.manual_seed(1)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference model's penultimate output (its classifier bypassed)."""
    fc, model.fc = model.fc, nn.Identity()
    try:
        return model(x)
    finally:
        model.fc = fc


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_required_models_give_pooled_and_grid_features_without_classifier(name):
    pooled_dim, token_dim, tokens, blocks = REQUIRED[name]
    enc = encoder(name).train()
    out = enc({"pixels": torch.randn(2, 3, SIZE, SIZE)})
    assert (enc.out_dim, enc.token_dim, len(enc.block_list())) == (pooled_dim, token_dim, blocks)
    assert out.pooled.shape == (2, pooled_dim) and out.tokens.shape == (2, tokens, token_dim) and out.token_mask.all()
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in enc.modules())
    (out.pooled.sum() + out.tokens.sum()).backward()
    stale = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    enc.zero_grad(set_to_none=True)
    assert not stale


def test_token_width_may_differ_from_pooled_width():
    enc = build_torchvision_encoder("mobilenet_v3_small", SIZE)  # features: 576 channels; classifier: 1024
    assert (enc.out_dim, enc.token_dim) == (1024, 576)


def test_freeze_n_trains_the_last_resnet_stages_only():
    torch.manual_seed(0)
    enc = build_torchvision_encoder("resnet18", SIZE)
    apply_freeze(enc, enc.block_list(), 1, "model.image_encoder.freeze")
    enc.train()
    assert {n.split(".")[1] for n, p in enc.named_parameters() if p.requires_grad} == {"layer4"}
    assert not enc.model.layer3.training and not enc.model.bn1.training and enc.model.layer4.training
    enc({"pixels": torch.randn(2, 3, SIZE, SIZE)}).pooled.sum().backward()
    assert all(p.grad is None for n, p in enc.named_parameters() if not n.startswith("model.layer4"))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_weights_from_a_local_file_with_any_classifier(fmt, tmp_path):
    ref = reference("resnet18", num_classes=10)  # a fine-tuned model: its 10-class head is dropped
    path = tmp_path / f"resnet18.{fmt}"
    if fmt == "pt":
        torch.save(ref.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    enc = build_torchvision_encoder("resnet18", SIZE, weights=str(path)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(enc({"pixels": x}).pooled, features(ref, x))


def test_weights_from_s3(s3_server, s3_bucket):
    ref = reference("resnet18")
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    store = StorageConfig(s3_endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/weights/resnet18.pth"
    storage.write_bytes(uri, buf.getvalue(), store)
    enc = build_torchvision_encoder("resnet18", SIZE, weights=uri, storage=store).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(enc({"pixels": x}).pooled, features(ref, x))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "effnet.pt"
    torch.save(reference("efficientnet_b0").state_dict(), path)
    with pytest.raises(ValueError, match=r"model\.image_encoder\.weights: .* does not fit resnet18"):
        build_torchvision_encoder("resnet18", SIZE, weights=str(path))


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match=r"model\.image_encoder\.name: 'resnet19'"):
        build_torchvision_encoder("resnet19", SIZE)


def test_unknown_weights_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"IMAGENET1K_V1"):
        build_torchvision_encoder("resnet18", SIZE, weights="IMAGENET_V9")


def fake_fetch(monkeypatch, state: dict | Exception) -> list:
    """Replaces torchvision's download with a function returning ``state``; records what was asked."""
    from torchvision.models._api import WeightsEnum

    asked = []

    def get_state_dict(self, *args, **kwargs):
        asked.append(str(self))
        if isinstance(state, Exception):
            raise state
        return state

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)
    return asked


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_names_resolve(weights, monkeypatch):
    ref = reference("resnet18")
    asked = fake_fetch(monkeypatch, ref.state_dict())
    enc = build_torchvision_encoder("resnet18", SIZE, weights=weights).eval()
    assert asked == ["ResNet18_Weights.IMAGENET1K_V1"]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(enc({"pixels": x}).pooled, features(ref, x))


def test_vit_position_embeddings_are_interpolated_to_the_image_size(monkeypatch):
    torch.manual_seed(0)
    small = torchvision.models.get_model("vit_b_16", weights=None, image_size=SIZE)  # 2x2 patches
    fake_fetch(monkeypatch, small.state_dict())
    enc = build_torchvision_encoder("vit_b_16", 2 * SIZE, weights="IMAGENET1K_V1")  # 4x4 patches
    assert enc.model.encoder.pos_embedding.shape == (1, 17, 768)
    torch.testing.assert_close(enc.model.class_token, small.class_token)


def test_no_network_for_named_weights_says_how_to_provide_a_file(monkeypatch):
    fake_fetch(monkeypatch, urllib.error.URLError("no route to host"))
    with pytest.raises(ValueError, match=r"TORCH_HOME.*local or s3:// file"):
        build_torchvision_encoder("resnet18", SIZE, weights="DEFAULT")
