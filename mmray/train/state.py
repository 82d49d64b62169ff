"""What a training checkpoint carries beyond the inference bundle, and how a run picks it up again.

``train_state.pt`` holds optimizer, scheduler, GradScaler, the last finished epoch, the global step,
every rank's RNG state, the history so far and the early-stopping counters. It is written with plain
containers and tensors only, so it loads with ``torch.load(weights_only=True)`` (no pickled code).

Restoring weights into a model whose wrapper may or may not have ``.module`` goes through
``mmray.checkpoint.unwrap``.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mmray.checkpoint import TRAIN_STATE_FILE, WEIGHTS_FILE, unwrap
from mmray.config import EarlyStoppingConfig

__all__ = [
    "Progress",
    "early_stopping_update",
    "get_rng_state",
    "load_train_state",
    "require_metric",
    "restore",
    "seed_everything",
    "set_rng_state",
    "train_state",
]


@dataclass
class Progress:
    """Where a run stands after ``epoch`` (``-1``: nothing trained yet)."""

    epoch: int = -1
    step: int = 0  # optimizer steps taken so far (= the scheduler's position)
    history: list[dict] = field(default_factory=list)
    best: float | None = None  # best early-stopping metric so far
    bad_epochs: int = 0  # epochs since it last improved
    resumed_from_epoch: int | None = None  # the checkpoint's epoch when this process resumed
    rng_restored: bool = False  # this rank's generators continue the checkpointed streams (not saved)

    @property
    def next_epoch(self) -> int:
        return self.epoch + 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as plain lists/tensors (``weights_only``-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_state(optimizer, scheduler, scaler, progress: Progress, rng_states: list[dict]) -> dict[str, Any]:
    """The resumable state; ``rng_states`` has one entry per rank (index = world rank)."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": progress.epoch,
        "step": progress.step,
        "rng": rng_states,
        "history": progress.history,
        "best": progress.best,
        "bad_epochs": progress.bad_epochs,
    }


def load_train_state(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, TRAIN_STATE_FILE)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def restore(directory: str, model: nn.Module, optimizer, scheduler, scaler, rank: int, world_size: int) -> Progress:
    """Loads a checkpoint directory into the training objects; returns where the run stands.

    A bundle without ``train_state.pt`` (e.g. a model exported for scoring) only provides weights:
    training then starts at epoch 0 with a fresh optimizer (fine-tuning from those weights).
    The RNG of each rank is restored when the world size is unchanged; otherwise the caller's
    seeding stands (the data order does not depend on it: shuffles are seeded by epoch).
    """
    unwrap(model).load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE)))
    state = load_train_state(directory)
    if state is None:
        return Progress()
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # parameter groups changed: a different model or freeze setting
        raise ValueError(
            f"{directory}: optimizer state does not match this model ({e}); "
            "resume with the same model config, or start from its weights only"
        ) from None
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    if len(rngs) == world_size:
        set_rng_state(rngs[rank])
    return Progress(
        epoch=state["epoch"],
        step=state["step"],
        history=list(state["history"]),
        best=state["best"],
        bad_epochs=state["bad_epochs"],
        resumed_from_epoch=state["epoch"],
        rng_restored=len(rngs) == world_size,
    )


def require_metric(metrics: dict[str, Any], name: str, key: str) -> float:
    """``metrics[name]``, or an error naming the config ``key`` and the metrics that do exist."""
    if name not in metrics:
        known = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise ValueError(f"{key}: no metric {name!r} in this run's epoch metrics (known: {known})")
    return float(metrics[name])


def early_stopping_update(
    cfg: EarlyStoppingConfig, metrics: dict[str, Any], best: float | None, bad_epochs: int
) -> tuple[float | None, int, bool]:
    """Returns ``(best, bad_epochs, stop)`` after one epoch; a no-op when ``cfg.metric`` is unset.

    A NaN value never counts as an improvement (a diverged run stops instead of resetting patience).
    """
    if not cfg.metric:
        return best, bad_epochs, False
    value = require_metric(metrics, cfg.metric, "train.early_stopping.metric")
    improved = not math.isnan(value) and (best is None or (value < best if cfg.mode == "min" else value > best))
    best, bad_epochs = (value, 0) if improved else (best, bad_epochs + 1)
    return best, bad_epochs, bad_epochs >= cfg.patience
