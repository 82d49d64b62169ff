"""Pretrained image encoders from ``torchvision.models`` (``model.image_encoder.kind: torchvision``).

Any classification model by name (resnet18/50, efficientnet_b0, convnext_tiny, vit_b_16, ...). Its
classifier (the last ``nn.Linear`` of ``fc`` / ``heads`` / ``head`` / ``classifier``) is replaced by
``Identity``, so the model's own forward returns the pooled vector (with the family's own pooling and
norms), and a forward hook on its last feature stage captures the grid/patch tokens:

    family                       grid from        tokens
    ResNet / ResNeXt / Wide      layer4           C x h x w -> h*w tokens
    RegNet                       trunk_output     idem
    EfficientNet, ConvNeXt, VGG, features         idem (Swin: channels-last)
    MobileNet, DenseNet, Swin
    MNASNet                      layers           idem
    ViT                          encoder          patch tokens (class token dropped)

Other models (GoogLeNet, Inception, ShuffleNet ...) expose their pooled vector as a one-token grid.
Weights come from a local or ``s3://`` file (a state dict, ``torch.save`` or safetensors) or a
torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, ``ResNet50_Weights.IMAGENET2K_V2``), which
torchvision fetches into ``$TORCH_HOME`` when the network allows. Scoring builds the bare architecture
(the checkpoint supplies the weights), so it never downloads.
"""

from __future__ import annotations

import io
import os

import torch
from torch import Tensor, nn

from mmray.config import StorageConfig
from mmray.data.schema import PIXELS
from mmray.models.encoders import Encoded
from mmray.models.freeze import FrozenEvalMixin

__all__ = ["TorchvisionImageEncoder", "build_torchvision_encoder"]

_CLASSIFIER_ATTRS = ("fc", "heads", "head", "classifier")
_GRID_ATTRS = ("layer4", "trunk_output", "features", "layers")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _drop_classifier(model: nn.Module, name: str) -> str:
    """Replaces the final ``nn.Linear`` with ``Identity``; returns its state-dict prefix."""
    for attr in _CLASSIFIER_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return f"{attr}."
        if isinstance(head, nn.Sequential):
            linears = [n for n, m in head.named_children() if isinstance(m, nn.Linear)]
            if linears:
                setattr(head, linears[-1], nn.Identity())
                return f"{attr}.{linears[-1]}."
    raise ValueError(f"model.image_encoder.name: {name!r} has no linear classifier in {list(_CLASSIFIER_ATTRS)}")


def _grid_path(model: nn.Module) -> str | None:
    from torchvision.models import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "encoder"
    return next((a for a in _GRID_ATTRS if isinstance(getattr(model, a, None), nn.Module)), None)


def _block_list(model: nn.Module, grid_path: str | None) -> list[nn.Module]:
    from torchvision.models import VisionTransformer

    if isinstance(model, VisionTransformer):
        return list(model.encoder.layers)
    if grid_path == "layer4":  # ResNet family: the four stages
        return [model.layer1, model.layer2, model.layer3, model.layer4]
    return list(model.get_submodule(grid_path).children()) if grid_path else []


class TorchvisionImageEncoder(FrozenEvalMixin, nn.Module):
    """A torchvision classifier without its last linear layer: pooled vector + grid/patch tokens.

    Args:
        model: the torchvision model, classifier already replaced by ``Identity``.
        image_size: the input side, for a dry run that derives ``out_dim`` and ``token_dim``.
    """

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        from torchvision.models import VisionTransformer

        self.model = model
        self.grid_path = _grid_path(model)
        self.layout = "vit" if isinstance(model, VisionTransformer) else "nhwc" if hasattr(model, "permute") else "nchw"
        was_training = model.training
        model.eval()
        with torch.no_grad():
            enc = self({PIXELS: torch.zeros(2, 3, image_size, image_size)})
        model.train(was_training)
        self.out_dim, self.token_dim = enc.pooled.shape[-1], enc.tokens.shape[-1]

    def block_list(self) -> list[nn.Module]:
        return _block_list(self.model, self.grid_path)

    def _tokens(self, grid: Tensor) -> Tensor:
        if self.layout == "vit":
            return grid[:, 1:]  # drop the class token: it is the pooled vector
        if self.layout == "nhwc":
            return grid.flatten(1, 2)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, batch: dict[str, Tensor]) -> Encoded:
        x = batch[PIXELS]
        if self.grid_path is None:
            pooled = self.model(x)
            tokens = pooled.unsqueeze(1)
        else:
            captured: list[Tensor] = []
            hook = self.model.get_submodule(self.grid_path).register_forward_hook(lambda m, i, o: captured.append(o))
            try:
                pooled = self.model(x)
            finally:
                hook.remove()
            tokens = self._tokens(captured[0])
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(pooled.flatten(1), tokens, mask)


def _is_file(weights: str) -> bool:
    return (
        weights.startswith("s3://") or os.sep in weights or weights.endswith(_FILE_SUFFIXES) or os.path.exists(weights)
    )


def _read_state_dict(uri: str, storage: StorageConfig | None) -> dict[str, Tensor]:
    from mmray.data.storage import read_bytes

    data = read_bytes(uri, storage)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"model.image_encoder.weights: {uri} is not a state dict (name -> tensor)")
    return state


def _named_state_dict(name: str, weights: str) -> dict[str, Tensor]:
    from torchvision.models import get_model_weights, get_weight

    enum = get_model_weights(name)
    try:
        w = get_weight(weights) if "." in weights else enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (KeyError, ValueError):
        known = ["DEFAULT", *(m.name for m in enum)]
        raise ValueError(
            f"model.image_encoder.weights: {weights!r} is neither a file nor a weights name of {name} (known: {known})"
        ) from None
    try:
        return w.get_state_dict(progress=False, check_hash=True)
    except OSError as e:  # no network: say how to provide the file instead
        raise ValueError(
            f"model.image_encoder.weights: cannot fetch {w} ({e}); put its file in $TORCH_HOME/hub/checkpoints "
            "or set model.image_encoder.weights to a local or s3:// file"
        ) from None


def build_torchvision_encoder(
    name: str, image_size: int, weights: str | None = None, storage: StorageConfig | None = None
) -> TorchvisionImageEncoder:
    """Builds ``torchvision.models.<name>`` without its classifier and loads ``weights`` when given.

    Raises:
        ValueError: unknown model name, weights that do not fit the architecture, or unfetchable weights.
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(
            f"model.image_encoder.name: {name!r} is not a torchvision classification model (known: {known})"
        )
    kwargs = {"image_size": image_size} if name.startswith("vit_") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    prefix = _drop_classifier(model, name)
    if weights:
        state = _read_state_dict(weights, storage) if _is_file(weights) else _named_state_dict(name, weights)
        if name.startswith("vit_") and "encoder.pos_embedding" in state:
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = interpolate_embeddings(image_size, model.patch_size, state)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise ValueError(f"model.image_encoder.weights: {weights!r} does not fit {name}: {str(e)[:400]}") from None
        unexpected = [k for k in unexpected if not k.startswith(prefix)]
        if missing or unexpected:
            raise ValueError(
                f"model.image_encoder.weights: {weights!r} does not fit {name}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    return TorchvisionImageEncoder(model, image_size)
