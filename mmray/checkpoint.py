"""Self-describing checkpoints: everything scoring needs, in one directory, no config file required.

Layout of a checkpoint directory::

    mmray.json          format version, model config, preprocessing spec (columns, text/image
                        settings, tasks with label maps), vocab size, epoch, metrics
    model.safetensors   weights (unwrapped from DDP)
    tokenizer/          AutoTokenizer.from_pretrained-loadable files
    architecture/       per modality, what rebuilds a pretrained encoder bare (HF config.json)
    train_state.pt      optimizer, scheduler, scaler, epoch, step, RNG, history (resume only)

``load_for_inference`` rebuilds tokenizer spec and model from the directory alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmray.config import ModelConfig, config_from_dict, config_to_dict
from mmray.data.labels import Task, task_from_dict

__all__ = [
    "BUNDLE_FILE", "CheckpointInfo", "FORMAT_VERSION", "TOKENIZER_DIR", "TRAIN_STATE_FILE", "WEIGHTS_FILE",
    "load_info", "load_model", "model_id", "save_checkpoint",
]  # fmt: skip

FORMAT_VERSION = 1
BUNDLE_FILE = "mmray.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TRAIN_STATE_FILE = "train_state.pt"
ARCHITECTURE_DIR = "architecture"  # <modality>/ config files of pretrained encoders (models.builder)


@dataclass(frozen=True)
class CheckpointInfo:
    model: ModelConfig
    preprocess: dict  # PreprocessSpec.to_dict() without the tokenizer location
    tasks: tuple[Task, ...]
    vocab_size: int
    epoch: int
    metrics: dict[str, Any]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP/FSDP-style wrappers (no assumption that ``.module`` exists)."""
    return getattr(model, "module", model)


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    model_cfg: ModelConfig,
    preprocess: dict,
    tasks: list[Task],
    vocab_size: int,
    tokenizer_files: dict[str, bytes],
    epoch: int,
    metrics: dict[str, Any],
    train_state: dict | None = None,
) -> None:
    """Writes a self-describing checkpoint into ``directory`` (created if needed)."""
    d = Path(directory)
    (d / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(d / WEIGHTS_FILE))
    for name, data in tokenizer_files.items():
        (d / TOKENIZER_DIR / name).write_bytes(data)
    from mmray.models.builder import save_architecture

    save_architecture(unwrap(model), d)  # pretrained encoders' configs: scoring rebuilds them offline
    preprocess = {k: v for k, v in preprocess.items() if k not in ("tasks", "with_labels")}
    bundle = {
        "format_version": FORMAT_VERSION,
        "model": config_to_dict(model_cfg),
        "preprocess": preprocess,
        "tasks": [t.to_dict() for t in tasks],
        "vocab_size": vocab_size,
        "epoch": epoch,
        "metrics": metrics,
    }
    (d / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2, ensure_ascii=False), encoding="utf-8")
    if train_state is not None:
        torch.save(train_state, d / TRAIN_STATE_FILE)


def load_info(directory: str | os.PathLike) -> CheckpointInfo:
    path = Path(directory) / BUNDLE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not an mmray checkpoint (no {BUNDLE_FILE})")
    b = json.loads(path.read_text(encoding="utf-8"))
    if b.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format_version {b.get('format_version')!r}")
    model_cfg = config_from_dict({"model": b["model"]}).model
    tasks = tuple(task_from_dict(t) for t in b["tasks"])
    return CheckpointInfo(model_cfg, b["preprocess"], tasks, b["vocab_size"], b["epoch"], b["metrics"])


def load_model(directory: str | os.PathLike, info: CheckpointInfo | None = None) -> nn.Module:
    """Rebuilds the model from the checkpoint's config and loads its weights (eval mode, CPU)."""
    from mmray.data.preprocess import PreprocessSpec
    from mmray.models.builder import build_model

    info = info or load_info(directory)
    spec = PreprocessSpec.from_dict(info.preprocess, tasks=info.tasks)
    model = build_model(info.model, spec.text, spec.image, info.tasks, info.vocab_size, checkpoint_dir=str(directory))
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
    return model.eval()


def model_id(directory: str | os.PathLike) -> str:
    """Content hash of the inference bundle (weights, bundle, tokenizer): stable across copies."""
    d = Path(directory)
    h = hashlib.sha256()
    files = [d / BUNDLE_FILE, d / WEIGHTS_FILE, *sorted((d / TOKENIZER_DIR).rglob("*")),
             *sorted((d / ARCHITECTURE_DIR).rglob("*"))]  # fmt: skip
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(d)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]
