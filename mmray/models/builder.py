"""The one builder: config + tasks -> ``FusionClassifier``. Owns hyperparameters, derives dimensions.

``build_model`` is used both for training (pretrained weights may be loaded) and for scoring, where
the checkpoint supplies every weight and ``pretrained=False`` builds the bare architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mmray.config import ImageConfig, ModelConfig, TextConfig
from mmray.data import schema as S
from mmray.data.labels import Task
from mmray.models.classifier import FusionClassifier
from mmray.models.encoders import TinyImageEncoder, TinyTextEncoder
from mmray.models.fusion import FUSIONS

__all__ = ["build_model"]


def build_text_encoder(
    cfg: ModelConfig, text: TextConfig, vocab_size: int, checkpoint_dir: str | None = None
) -> nn.Module:
    enc = cfg.text_encoder
    if enc.kind == "tiny":
        return TinyTextEncoder(vocab_size, enc.dim, enc.layers, enc.heads, text.max_length, enc.pooling)
    raise ValueError(f"model.text_encoder.kind: unsupported {enc.kind!r}")


def build_image_encoder(cfg: ModelConfig, checkpoint_dir: str | None = None) -> nn.Module:
    enc = cfg.image_encoder
    if enc.kind == "tiny":
        return TinyImageEncoder(enc.dim)
    raise ValueError(f"model.image_encoder.kind: unsupported {enc.kind!r}")


def _head(in_dim: int, task: Task) -> nn.Module:
    return nn.Linear(in_dim, task.out_dim)


def build_model(
    cfg: ModelConfig,
    text: TextConfig,
    image: ImageConfig,
    tasks: Sequence[Task],
    vocab_size: int,
    checkpoint_dir: str | None = None,
) -> FusionClassifier:
    """Assembles encoders, fusion and heads.

    Args:
        cfg: the ``model`` config section.
        text, image: preprocessing settings the model depends on (max length; pixel mean/std).
        tasks: one head per task, output sizes from each task's label map.
        vocab_size: size of the tokenizer's vocabulary.
        checkpoint_dir: when rebuilding from a checkpoint, pretrained encoders are built bare from the
            architecture files stored there (weights come from the checkpoint, nothing is downloaded).
    """
    encoders = nn.ModuleDict(
        {
            S.TEXT: build_text_encoder(cfg, text, vocab_size, checkpoint_dir),
            S.IMAGE: build_image_encoder(cfg, checkpoint_dir),
        }
    )
    in_dims = {m: e.out_dim for m, e in encoders.items()}
    fusion = FUSIONS[cfg.fusion](in_dims, cfg.hidden_dim, cfg.dropout)
    heads = nn.ModuleDict({t.name: _head(fusion.out_dim, t) for t in tasks})
    aux = nn.ModuleDict()
    if cfg.aux_loss_weight > 0:
        aux = nn.ModuleDict(
            {m: nn.ModuleDict({t.name: _head(d, t) for t in tasks}) for m, d in sorted(in_dims.items())}
        )
    return FusionClassifier(encoders, fusion, heads, aux, image.mean, image.std, cfg.modality_dropout)
