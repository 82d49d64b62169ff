"""The one builder: config + tasks -> ``FusionClassifier``. Owns hyperparameters, derives dimensions.

``build_model`` is used both for training (pretrained weights are loaded) and for scoring, where the
checkpoint supplies every weight: given ``architecture_dir``, pretrained encoders are built bare from
the files ``save_architecture`` wrote there, so scoring never downloads anything. Where that directory
lives is the checkpoint's business (``mmray.checkpoint``), not this module's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn

from mmray.config import ImageConfig, ModelConfig, StorageConfig, TextConfig
from mmray.data.labels import Task
from mmray.data.schema import IMAGE, POS_TAGS, TEXT
from mmray.models.align import AlignProjection
from mmray.models.classifier import FusionClassifier
from mmray.models.encoders import TinyImageEncoder, TinyTextEncoder
from mmray.models.freeze import apply_freeze
from mmray.models.fusion import BilinearFusion, ConcatFusion, CrossAttentionFusion, GatedFusion, LateFusion

__all__ = ["build_fusion", "build_image_encoder", "build_model", "build_text_encoder", "save_architecture"]


def _architecture(architecture_dir: str | None, modality: str) -> str | None:
    return os.path.join(architecture_dir, modality) if architecture_dir else None


def build_text_encoder(
    cfg: ModelConfig,
    text: TextConfig,
    vocab_size: int,
    architecture_dir: str | None = None,
    storage: StorageConfig | None = None,
) -> nn.Module:
    enc = cfg.text_encoder
    pos_vocab = len(POS_TAGS) if text.pos_tags else 0
    if enc.kind == "tiny":
        module = TinyTextEncoder(vocab_size, enc.dim, enc.layers, enc.heads, text.max_length, enc.pooling, pos_vocab)
    elif enc.kind == "hf":
        from mmray.models.hf import HFTextEncoder, load_hf_model

        model = load_hf_model(enc.name, storage, _architecture(architecture_dir, TEXT))
        module = HFTextEncoder(model, enc.pooling, pos_vocab)
        limit = getattr(module.model.config, "max_position_embeddings", None)
        if limit is not None and text.max_length > limit:
            raise ValueError(f"data.text.max_length: {text.max_length} exceeds the {limit} positions of {enc.name}")
    else:
        raise ValueError(f"model.text_encoder.kind: unsupported {enc.kind!r}")
    apply_freeze(module, module.block_list(), enc.freeze, "model.text_encoder.freeze")
    if module.pos is not None:  # new and random, never pretrained: it learns even in a frozen encoder
        module.pos.requires_grad_(True)
    return module


def build_image_encoder(
    cfg: ModelConfig, image: ImageConfig, architecture_dir: str | None = None, storage: StorageConfig | None = None
) -> nn.Module:
    enc = cfg.image_encoder
    if enc.kind == "tiny":
        module = TinyImageEncoder(enc.dim, enc.convs_per_stage)
    elif enc.kind == "torchvision":
        from mmray.models.vision import build_torchvision_encoder

        # From a checkpoint the architecture is the name alone; its weights come from the checkpoint.
        weights = None if architecture_dir else enc.weights
        module = build_torchvision_encoder(enc.name, image.size, weights, storage)
    else:
        raise ValueError(f"model.image_encoder.kind: unsupported {enc.kind!r}")
    apply_freeze(module, module.block_list(), enc.freeze, "model.image_encoder.freeze")
    return module


def build_fusion(cfg: ModelConfig, encoders: nn.ModuleDict) -> nn.Module:
    """The fusion named by ``cfg.fusion``, its input sizes taken from the encoders."""
    dims = {m: e.out_dim for m, e in encoders.items()}
    if cfg.fusion == "concat":
        return ConcatFusion(dims, cfg.hidden_dim, cfg.dropout)
    if cfg.fusion == "gated":
        return GatedFusion(dims, cfg.hidden_dim, cfg.dropout)
    if cfg.fusion == "bilinear":
        return BilinearFusion(dims, cfg.hidden_dim, cfg.fusion_rank, cfg.dropout)
    if cfg.fusion == "late":
        return LateFusion(dims, cfg.hidden_dim, cfg.dropout)
    if cfg.fusion == "cross_attention":
        token_dims = {m: e.token_dim for m, e in encoders.items()}
        return CrossAttentionFusion(token_dims, cfg.hidden_dim, cfg.fusion_layers, cfg.fusion_heads, cfg.dropout)
    raise ValueError(f"model.fusion: unsupported {cfg.fusion!r}")


def _head(in_dim: int, task: Task) -> nn.Module:
    # Linear on purpose: LateFusion relies on it (a head of a weighted average = average of logits).
    return nn.Linear(in_dim, task.out_dim)


def build_model(
    cfg: ModelConfig,
    text: TextConfig,
    image: ImageConfig,
    tasks: Sequence[Task],
    vocab_size: int,
    architecture_dir: str | None = None,
    storage: StorageConfig | None = None,
) -> FusionClassifier:
    """Assembles encoders, fusion and heads.

    Args:
        cfg: the ``model`` config section.
        text, image: preprocessing settings the model depends on (max length; image size, pixel mean/std).
        tasks: one head per task, output sizes from each task's label map.
        vocab_size: size of the tokenizer's vocabulary (tiny text encoder).
        architecture_dir: when rebuilding from a checkpoint, its ``save_architecture`` directory:
            pretrained encoders are built bare from it (weights come from the checkpoint, nothing is
            downloaded).
        storage: S3 endpoint/region for ``s3://`` model directories and weight files.
    """
    encoders = nn.ModuleDict(
        {
            TEXT: build_text_encoder(cfg, text, vocab_size, architecture_dir, storage),
            IMAGE: build_image_encoder(cfg, image, architecture_dir, storage),
        }
    )
    fusion = build_fusion(cfg, encoders)
    align = None
    if cfg.align.weight > 0:
        dims = {m: e.out_dim for m, e in encoders.items()}
        align = AlignProjection(dims, cfg.align.projection_dim, cfg.align.temperature)
    # With alignment on, the heads also read each row's aligned similarity (one more input), except
    # late fusion's: its heads must stay linear in the per-modality branches it averages.
    heads_read_similarity = align is not None and cfg.fusion != "late"
    heads = nn.ModuleDict({t.name: _head(fusion.out_dim + int(heads_read_similarity), t) for t in tasks})
    aux = nn.ModuleDict()
    if cfg.aux_loss_weight > 0:
        aux = nn.ModuleDict(
            {m: nn.ModuleDict({t.name: _head(e.out_dim, t) for t in tasks}) for m, e in sorted(encoders.items())}
        )
    match_head = None
    if align is not None and cfg.align.itm_weight > 0:
        match_head = nn.Linear(fusion.out_dim + int(heads_read_similarity), 1)
    model = FusionClassifier(
        encoders,
        fusion,
        heads,
        aux,
        image.mean,
        image.std,
        cfg.modality_dropout,
        align,
        heads_read_similarity,
        match_head,
    )
    return model.train()  # applies FrozenEvalMixin: frozen encoder parts stay in eval mode


def save_architecture(model: nn.Module, directory: str | os.PathLike) -> None:
    """Writes what rebuilds each pretrained encoder without its source (e.g. an HF ``config.json``), one
    subdirectory per modality: the ``architecture_dir`` that ``build_model`` reads back."""
    for modality, encoder in model.encoders.items():
        if hasattr(encoder, "save_architecture"):
            encoder.save_architecture(os.path.join(directory, modality))
