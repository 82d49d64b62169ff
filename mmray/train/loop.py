"""The per-worker training loop, run by ``TorchTrainer`` on every worker (``train_loop_per_worker``).

It rebuilds config and tasks from plain data, builds the model, wraps it with DDP through
``prepare_model``, streams batches from this worker's dataset shard, validates with metrics
all-reduced across workers, and reports a self-describing checkpoint from rank 0 every epoch.
Resuming (worker restart, rerun of the same ``train.name``, or ``train.resume_from``) restores model,
optimizer, scheduler, scaler, epoch, step, RNG and history from the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmray.checkpoint import TRAIN_STATE_FILE, save_checkpoint, unwrap
from mmray.config import Config, config_from_dict
from mmray.data import schema as S
from mmray.data.image import augment
from mmray.data.labels import Task, task_from_dict
from mmray.metrics import MetricAccumulator, per_row_loss
from mmray.models.builder import build_model

__all__ = ["LoopInputs", "train_loop_per_worker"]

LoopInputs = dict[str, Any]  # built by mmray.train.launcher.loop_inputs; plain data, pickles cheaply


def print0(*args: Any) -> None:
    """Prints on the rank-0 worker only: the one helper for rank-0 side effects in logs."""
    if ray.train.get_context().get_world_rank() == 0:
        print(*args, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup_fraction: float):
    """Linear warm-up then cosine decay to 0, as a multiplier of the base learning rate."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def param_groups(model: nn.Module, lr: float, encoder_lr: float | None, weight_decay: float) -> list[dict]:
    enc, rest = [], []
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            (enc if name.startswith("encoders.") else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if enc:
        groups.append({"params": enc, "lr": encoder_lr or lr, "weight_decay": weight_decay})
    return groups


def compute_loss(
    out: dict, batch: dict[str, Tensor], tasks: list[Task], loss_weights: dict[str, float], aux_weight: float
) -> tuple[Tensor, Tensor]:
    """Returns (mean training loss incl. auxiliary heads, per-row fused loss for metrics)."""
    fused_rows = sum(
        loss_weights.get(t.name, 1.0) * per_row_loss(t, out["logits"][t.name], batch[S.label_key(t.name)])
        for t in tasks
    )
    loss = fused_rows.mean()
    for m, heads in out["aux"].items():
        present = out["masks"][m]
        for t in tasks:
            rows = per_row_loss(t, heads[t.name], batch[S.label_key(t.name)])
            loss = loss + aux_weight * loss_weights.get(t.name, 1.0) * (rows * present).sum() / present.sum().clamp_min(1)
    return loss, fused_rows


def autocast_ctx(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def all_reduce(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        # gloo and nccl both reduce float64 correctly; move to the backend's device.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def evaluate(model: nn.Module, batches, tasks: list[Task], loss_weights: dict[str, float]) -> dict[str, float]:
    """Validation metrics over this worker's shard, all-reduced over every worker."""
    model.eval()
    acc = MetricAccumulator(tasks)
    with torch.no_grad():
        for batch in batches:
            out = model(batch)
            _, rows = compute_loss(out, batch, tasks, loss_weights, 0.0)
            acc.update(out["logits"], {t.name: batch[S.label_key(t.name)] for t in tasks}, rows.sum().item())
    acc.load_state(all_reduce(acc.state()))
    return acc.compute()


def _restore(model, optimizer, scheduler, scaler, checkpoint) -> dict:
    from safetensors.torch import load_file

    with checkpoint.as_directory() as d:
        unwrap(model).load_state_dict(load_file(os.path.join(d, "model.safetensors")))
        state_path = os.path.join(d, TRAIN_STATE_FILE)
        if not os.path.exists(state_path):  # an inference-only bundle: weights only, fresh optimizer
            return {}
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state


def train_loop_per_worker(inputs: LoopInputs) -> None:
    """Ray Train entry point. ``inputs`` comes from ``mmray.train.launcher.loop_inputs``."""
    cfg: Config = config_from_dict(inputs["config"])
    tasks = [task_from_dict(t) for t in inputs["tasks"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = cfg.train
    seed_everything(t.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    device = ray.train.torch.get_device()
    precision = resolve_precision(t.precision, device)

    model = build_model(cfg.model, cfg.data.text, cfg.data.image, tasks, inputs["vocab_size"])
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(param_groups(model, t.lr, t.encoder_lr, t.weight_decay))
    steps_per_epoch = max(1, math.ceil(inputs["train_rows"] / (world * t.batch_size * t.grad_accum_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps_per_epoch * t.epochs, t.warmup_fraction))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    state: dict = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and inputs.get("resume_from"):
        checkpoint = ray.train.Checkpoint(inputs["resume_from"])
    if checkpoint is not None:
        state = _restore(model, optimizer, scheduler, scaler, checkpoint)
        print0(f"resumed from {checkpoint.path} at epoch {state.get('epoch', -1) + 1}")
    start_epoch = state.get("epoch", -1) + 1
    history: list[dict] = state.get("history", [])
    best, bad_epochs = state.get("best"), state.get("bad_epochs", 0)
    stop_cfg = t.early_stopping

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    iter_kwargs = {"batch_size": t.batch_size, "device": device, "drop_last": False}
    for epoch in range(start_epoch, t.epochs):
        model.train()
        started, rows_seen, loss_sum = time.perf_counter(), 0, 0.0
        batches = train_shard.iter_torch_batches(
            **iter_kwargs, local_shuffle_buffer_size=max(256, 4 * t.batch_size), local_shuffle_seed=t.seed + epoch
        )
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            if cfg.data.image.augment:
                batch[S.PIXELS] = augment(batch[S.PIXELS])
            last_micro = (i + 1) % t.grad_accum_steps == 0
            sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync, autocast_ctx(precision, device):
                out = model(batch)
                loss, _ = compute_loss(out, batch, tasks, cfg.model.loss_weights, cfg.model.aux_loss_weight)
            scaled = loss / t.grad_accum_steps
            (scaler.scale(scaled) if scaler else scaled).backward()
            if last_micro:
                _optimizer_step(model, optimizer, scheduler, scaler, t.grad_clip)
            n = batch[S.PIXELS].shape[0]
            rows_seen += n
            loss_sum += loss.item() * n
        if (i + 1) % t.grad_accum_steps:
            _optimizer_step(model, optimizer, scheduler, scaler, t.grad_clip)
        seconds = time.perf_counter() - started
        totals = all_reduce(torch.tensor([loss_sum, rows_seen], dtype=torch.float64))
        val = evaluate(model, val_shard.iter_torch_batches(**iter_kwargs), tasks, cfg.model.loss_weights)
        metrics = {
            "epoch": epoch,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            **{f"val_{k}": v for k, v in val.items()},
            "rows_per_s": float(totals[1]) / max(seconds, 1e-9),
            "epoch_s": seconds,
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(metrics)
        if stop_cfg.metric:
            value = metrics[stop_cfg.metric]
            improved = best is None or (value < best if stop_cfg.mode == "min" else value > best)
            best, bad_epochs = (value, 0) if improved else (best, bad_epochs + 1)
        stop = bool(stop_cfg.metric) and bad_epochs >= stop_cfg.patience
        step = int(scheduler.last_epoch)
        _report(model, optimizer, scheduler, scaler, cfg, tasks, inputs, epoch, step, history, best, bad_epochs, metrics, rank)
        if stop:
            print0(f"early stopping at epoch {epoch}: {stop_cfg.metric} did not improve for {bad_epochs} epochs")
            break


def _optimizer_step(model, optimizer, scheduler, scaler, grad_clip) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def _report(model, optimizer, scheduler, scaler, cfg, tasks, inputs, epoch, step, history, best, bad_epochs, metrics, rank):
    """Every worker reports the metrics; rank 0 alone attaches the checkpoint and writes history."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            train_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "epoch": epoch,
                "step": step,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                "history": history,
                "best": best,
                "bad_epochs": bad_epochs,
            }
            save_checkpoint(
                tmp, model, cfg.model, inputs["preprocess"], tasks, inputs["vocab_size"], inputs["tokenizer_files"],
                epoch, metrics, train_state,
            )  # fmt: skip
            _write_history(inputs["run_dir"], history, cfg)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _write_history(run_dir: str, history: list[dict], cfg: Config) -> None:
    from mmray.data import storage

    text = "".join(json.dumps(h) + "\n" for h in history)
    storage.write_text(storage.join(run_dir, "history.jsonl"), text, cfg.storage)
