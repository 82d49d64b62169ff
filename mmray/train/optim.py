"""Optimisation pieces of the training loop: parameter groups, AdamW, warm-up + cosine schedule,
mixed precision and the (accumulated, clipped, scaled) optimizer step.

Nothing here touches Ray, so each piece is unit-tested on a toy model in one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from mmray.checkpoint import unwrap
from mmray.config import TrainConfig

__all__ = [
    "autocast",
    "build_optimizer",
    "build_scheduler",
    "lr_lambda",
    "lr_scale",
    "make_scaler",
    "optimizer_step",
    "param_groups",
    "resolve_precision",
    "steps_per_epoch",
]

ENCODER_PREFIX = "encoders."  # FusionClassifier keeps its encoders in `self.encoders`


def lr_lambda(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Linear warm-up to the base rate over ``warmup_fraction`` of the steps, then cosine decay to 0.

    Returns a multiplier of the base learning rate for ``LambdaLR`` (step 0 is the first update).
    """
    warmup = max(1, int(total_steps * warmup_fraction))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def param_groups(model: nn.Module, lr: float, encoder_lr: float | None, weight_decay: float) -> list[dict]:
    """AdamW groups: encoders vs the rest (separate rates), each split into decayed and not decayed.

    Biases and normalisation weights (1-d tensors) get no weight decay: decaying them only pulls
    LayerNorm/BatchNorm scales towards 0. Frozen parameters are left out. Every group carries a
    ``name`` so the loop can report each group's current rate.
    """
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            part = "encoder" if name.startswith(ENCODER_PREFIX) else "head"
            buckets.setdefault((part, p.ndim >= 2), []).append(p)
    rates = {"head": lr, "encoder": lr if encoder_lr is None else encoder_lr}
    return [
        {"name": part, "params": params, "lr": rates[part], "weight_decay": weight_decay if decay else 0.0}
        for (part, decay), params in sorted(buckets.items())
    ]


def lr_scale(t: TrainConfig, world_size: int) -> float:
    """The factor ``train.lr_scaling`` applies to both rates for this run's global batch.

    The rates in a config are for a global batch of ``train.lr_reference_batch`` rows; the same config
    run with more workers, a larger batch or gradient accumulation keeps its behaviour per row seen
    (``sqrt``: the usual rule for Adam-type optimisers, whose update size does not grow with the batch).
    """
    ratio = t.batch_size * world_size * t.grad_accum_steps / t.lr_reference_batch
    return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[t.lr_scaling]


def build_optimizer(model: nn.Module, t: TrainConfig, world_size: int = 1) -> torch.optim.AdamW:
    scale = lr_scale(t, world_size)
    encoder_lr = None if t.encoder_lr is None else t.encoder_lr * scale
    return torch.optim.AdamW(param_groups(model, t.lr * scale, encoder_lr, t.weight_decay))


def steps_per_epoch(train_rows: int, world_size: int, batch_size: int, grad_accum_steps: int) -> int:
    """Optimizer steps one worker takes per epoch.

    Ray Train splits the training set with ``equal=True``, so each worker sees ``rows // world``
    rows; the loop steps after every ``grad_accum_steps`` batches and once more for a partial window.
    """
    batches = math.ceil((train_rows // world_size) / batch_size)
    return max(1, math.ceil(batches / grad_accum_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_fraction))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on GPU and fp32 elsewhere (CPU autocast is slower than fp32 for small models)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 only: bf16 has fp32's exponent range and needs no loss scaling."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
) -> torch.Tensor:
    """Unscales, clips, steps, zeroes and advances the schedule; returns the pre-clip gradient norm
    (a tensor, so callers on a GPU do not pay a device sync every step).

    With fp16 the scaler skips the step when gradients overflowed; the schedule still advances so
    its length stays tied to the number of batches, as in the usual recipes.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return norm
