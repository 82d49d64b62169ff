"""Self-describing checkpoints: everything scoring needs, in one directory, no config file required.

Layout of a checkpoint directory::

    mmray.json          format version, model config, preprocessing spec (columns, text/image
                        settings, tasks with label maps), vocab size, epoch, metrics
    model.safetensors   weights (unwrapped from DDP)
    tokenizer/          AutoTokenizer.from_pretrained-loadable files
    architecture/       per modality, what rebuilds a pretrained encoder bare (HF config.json)
    train_state.pt      optimizer, scheduler, scaler, epoch, step, RNG, history (resume only)

``open_checkpoint`` is the one way in for every reader (the scoring driver and its predictor actors,
``mmray ablate``, reports): it fetches an ``s3://`` checkpoint to a local directory when needed,
rebuilds preprocessing settings, tokenizer and model from that directory alone, and cleans up.

``check_weights`` and ``check_train_state`` let a driver refuse a corrupt or hostile checkpoint with one
line before any Ray work: a worker that finds it later fails after minutes, in a wall of stack traces.

This module sits above ``models/`` and ``data/``: it imports both, neither imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mmray.config import ModelConfig, StorageConfig, config_from_dict, config_to_dict
from mmray.data import storage
from mmray.data.labels import Task, task_from_dict
from mmray.data.preprocess import PreprocessSpec
from mmray.data.text.encoder import read_tokenizer_dir
from mmray.models.builder import build_model, save_architecture

__all__ = [
    "ARCHITECTURE_DIR",
    "BUNDLE_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "FORMAT_VERSION",
    "OpenCheckpoint",
    "TOKENIZER_DIR",
    "TRAIN_STATE_FILE",
    "WEIGHTS_FILE",
    "check_train_state",
    "check_weights",
    "load_info",
    "load_model",
    "model_id",
    "open_checkpoint",
    "save_checkpoint",
]

FORMAT_VERSION = 1
BUNDLE_FILE = "mmray.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TRAIN_STATE_FILE = "train_state.pt"
ARCHITECTURE_DIR = "architecture"  # <modality>/ config files of pretrained encoders (models.builder)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, or does not fit its own config (one line, naming the file)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``mmray.json`` records: what training writes and every reader gets back, field for field."""

    model: ModelConfig
    preprocess: dict  # PreprocessSpec.to_dict(): preprocessing settings (the tasks are the field below)
    tasks: tuple[Task, ...]  # with their label maps
    vocab_size: int
    epoch: int
    metrics: dict[str, Any]  # the epoch's record (train.checkpoint_metric picks the best by it)

    def preprocess_spec(self, **deployment: Any) -> PreprocessSpec:
        """Training's preprocessing for this checkpoint's tasks; ``deployment`` are the reader's own
        ``PreprocessSpec`` fields (``with_labels``, ``storage``, ``image_uri_roots``)."""
        return PreprocessSpec.from_dict(self.preprocess, tasks=self.tasks, **deployment)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP/FSDP-style wrappers (no assumption that ``.module`` exists)."""
    return getattr(model, "module", model)


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    info: CheckpointInfo,
    tokenizer_files: dict[str, bytes],
    train_state: dict | None = None,
) -> None:
    """Writes a self-describing checkpoint into ``directory`` (created if needed).

    Args:
        info: what ``load_info`` returns for this checkpoint.
        tokenizer_files: the tokenizer's files, name -> bytes (``TOKENIZER_DIR``).
        train_state: optimizer, scheduler, RNG ... for resuming (``TRAIN_STATE_FILE``); not for scoring.
    """
    d = Path(directory)
    (d / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(d / WEIGHTS_FILE))
    for name, data in tokenizer_files.items():
        (d / TOKENIZER_DIR / name).write_bytes(data)
    save_architecture(unwrap(model), d / ARCHITECTURE_DIR)  # pretrained encoders' configs: rebuilt offline
    bundle = {
        "format_version": FORMAT_VERSION,
        "model": config_to_dict(info.model),
        "preprocess": info.preprocess,
        "tasks": [t.to_dict() for t in info.tasks],
        "vocab_size": info.vocab_size,
        "epoch": info.epoch,
        "metrics": info.metrics,
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
    info = info or load_info(directory)
    spec = info.preprocess_spec()
    architecture = str(Path(directory, ARCHITECTURE_DIR))
    model = build_model(info.model, spec.text, spec.image, info.tasks, info.vocab_size, architecture_dir=architecture)
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
    return model.eval()


def _build_bare(directory: str | os.PathLike, info: CheckpointInfo) -> nn.Module:
    """The model ``mmray.json`` describes, without weights: on the meta device (no memory) where the
    builder allows it, else on CPU."""
    spec = info.preprocess_spec()
    architecture = str(Path(directory, ARCHITECTURE_DIR))

    def build() -> nn.Module:
        return build_model(
            info.model, spec.text, spec.image, info.tasks, info.vocab_size, architecture_dir=architecture
        )

    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):  # a builder that computes on its tensors
        return build()


def _listed(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_weights(directory: str | os.PathLike, info: CheckpointInfo | None = None) -> None:
    """Checks that ``model.safetensors`` parses and holds exactly the tensors, with the shapes, of the
    model its ``mmray.json`` builds; reads the header only.

    Raises:
        CheckpointError: naming the file and the first thing wrong.
    """
    info = info or load_info(directory)
    path = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint has no weights") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    expected = {k: list(v.shape) for k, v in _build_bare(directory, info).state_dict().items()}
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or extra:
        parts = [f"missing {len(missing)} tensors ({_listed(missing)})"] if missing else []
        parts += [f"{len(extra)} unexpected tensors ({_listed(extra)})"] if extra else []
        raise CheckpointError(f"{path}: does not match the model its {BUNDLE_FILE} builds: {'; '.join(parts)}")
    for name in sorted(expected):
        if found[name] != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {found[name]}, the model its {BUNDLE_FILE} builds expects "
                f"{expected[name]}"
            )


def check_train_state(directory: str | os.PathLike) -> None:
    """Checks that ``train_state.pt`` (when present) loads as plain tensors and containers: a pickle that
    would run code, or a torn file, is refused here rather than in a training worker.

    Raises:
        CheckpointError: naming the file and what is wrong.
    """
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.exists():
        return
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            # mmap: tensors stay on disk (optimizer state is twice the model); torch maps only its zip format
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 -- torch raises many types here (UnpicklingError, RuntimeError, ...)
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        unsafe = "weights_only" in str(e) or "Unsupported global" in str(e)
        what = "holds objects other than tensors (refused: loading them could run code)" if unsafe else "is not"
        detail = "" if unsafe else f" a readable training state ({first.strip()[:200]})"
        raise CheckpointError(f"{path}: {what}{detail}") from None


def model_id(directory: str | os.PathLike) -> str:
    """Content hash of the inference bundle (weights, bundle, tokenizer): stable across copies."""
    d = Path(directory)
    h = hashlib.sha256()
    files = [
        d / BUNDLE_FILE,
        d / WEIGHTS_FILE,
        *sorted((d / TOKENIZER_DIR).rglob("*")),
        *sorted((d / ARCHITECTURE_DIR).rglob("*")),
    ]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(d)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class OpenCheckpoint:
    """A checkpoint readable in a local directory, for as long as its ``open_checkpoint`` block lasts."""

    directory: Path
    info: CheckpointInfo

    def model_id(self) -> str:
        return model_id(self.directory)

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer's files as name -> bytes, the form preprocessing actors receive."""
        return read_tokenizer_dir(self.directory / TOKENIZER_DIR)

    def check_weights(self) -> None:
        """``check_weights`` on this checkpoint (``CheckpointError`` when its weights do not fit)."""
        check_weights(self.directory, self.info)

    def load_model(self, device: str = "cpu") -> nn.Module:
        """The model with its weights, in eval mode, on ``device``.

        Raises:
            RuntimeError: ``device`` is CUDA and this process sees none (an actor given no GPU).
        """
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"asked for device {device!r} but this process sees no CUDA device")
        return load_model(self.directory, self.info).to(torch.device(device))


@contextlib.contextmanager
def open_checkpoint(uri: str | os.PathLike, store: StorageConfig | None = None) -> Iterator[OpenCheckpoint]:
    """A local or ``s3://`` checkpoint, opened: an S3 one is downloaded (each caller its own copy, so
    actors on any node need no shared storage) and removed on exit; a local one is read in place.

    Raises:
        FileNotFoundError: nothing at ``uri``, or no ``mmray.json`` there.
    """
    with storage.local_dir(str(uri), store) as local:
        yield OpenCheckpoint(Path(local), load_info(local))
