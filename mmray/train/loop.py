"""The per-worker training loop, run by ``TorchTrainer`` on every worker (``train_loop_per_worker``).

One epoch is: stream this worker's shard of the training set (``iter_torch_batches`` with
prefetching, onto ``ray.train.torch.get_device()``), step AdamW with gradient accumulation, clipping
and mixed precision, then validate with metric sums all-reduced over every worker, and report the
epoch's record with a checkpoint that rank 0 alone writes. Resuming (a restarted worker group, a
rerun of the same ``train.name``, or ``train.resume_from``) restores model, optimizer, scheduler,
scaler, epoch, step, RNG and history (``mmray.train.state``).

The pieces (``build_parts``, ``train_epoch``, ``evaluate``, ``epoch_record``) take plain objects and
run without Ray, so the unit tests drive them directly; only ``train_loop_per_worker`` talks to Ray.
With ``data.cache=features`` the batches carry the frozen encoders' outputs (``mmray.train.features``):
the loop trains ``FusionClassifier.with_cached_features()`` and checkpoints the whole model.
The collectives they use are in ``mmray.train.dist``; ``train.before_step`` (``mmray.train.hooks``)
is called before every optimizer step.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmray.checkpoint import CheckpointInfo, save_checkpoint, unwrap
from mmray.config import Config
from mmray.data import storage
from mmray.data.labels import Task, pair_class
from mmray.data.schema import INPUT_IDS, PIXELS, label_key
from mmray.data.transforms import augment
from mmray.metrics import MetricAccumulator, weighted_row_loss
from mmray.models.align import info_nce, same_rows
from mmray.models.builder import build_model
from mmray.train import optim
from mmray.train.dist import all_gather_rows, all_reduce, broadcast_buffers, gather_objects, print0
from mmray.train.hooks import load_before_step
from mmray.train.init_from import load_parts
from mmray.train.state import (
    Progress,
    early_stopping_update,
    get_rng_state,
    require_metric,
    restore,
    seed_everything,
    train_state,
)
from mmray.train.tracking import Tracker, make_trackers

__all__ = [
    "EpochTotals",
    "LoopInputs",
    "Parts",
    "TruePairs",
    "build_parts",
    "compute_loss",
    "epoch_record",
    "initial_model",
    "train_epoch",
    "train_loop_per_worker",
    "true_pairs",
    "validation_metrics",
]

T = TypeVar("T")


@dataclass(frozen=True)
class LoopInputs:
    """What every worker receives (built by ``mmray.train.launcher.loop_inputs``), pickled into
    ``TorchTrainer``'s ``train_loop_config``. Ray Train hands the loop a dict: ``as_loop_config`` and
    ``from_loop_config`` wrap and unwrap it."""

    config: Config
    tasks: list[Task]
    preprocess: dict[str, Any]  # PreprocessSpec.to_dict(): the settings the checkpoint records
    # file name -> contents, shipped by value: no shared storage needed. Out of the repr, which Ray Train
    # records as the run's train_loop_config in its state export.
    tokenizer_files: dict[str, bytes] = field(repr=False)
    vocab_size: int
    train_rows: int  # usable training rows over all workers: sets the schedule's length
    run_dir: str
    run_name: str

    def as_loop_config(self) -> dict[str, Any]:
        return {"inputs": self}

    @staticmethod
    def from_loop_config(loop_config: dict[str, Any]) -> LoopInputs:
        return loop_config["inputs"]


@dataclass
class Parts:
    """What one worker trains with. A plain bundle, passed to the loop's functions."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    precision: str  # fp32 | bf16 | fp16 (resolved from "auto")
    device: torch.device
    # data.cache=features: the whole model, encoders included (left on the CPU), which checkpoints hold;
    # ``model`` is its ``with_cached_features()`` (every other part shared) and holds no encoder.
    full: nn.Module | None = None

    @property
    def saved(self) -> nn.Module:
        """The model a checkpoint holds and a resume loads."""
        return self.full if self.full is not None else self.model


def initial_model(cfg: Config, tasks: list[Task], vocab_size: int) -> nn.Module:
    """The model every worker starts from, the same on every rank (and on the driver, which encodes
    ``data.cache=features`` with its encoders): built from the seed, then ``model.init_from``'s parts."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.text, cfg.data.image, tasks, vocab_size, storage=cfg.storage)
    if cfg.model.init_from:
        with storage.local_dir(cfg.model.init_from, cfg.storage) as local:
            load_parts(model, local, storage.redact(cfg.model.init_from))
    return model


def build_parts(
    cfg: Config,
    tasks: list[Task],
    vocab_size: int,
    train_rows: int,
    world_size: int,
    device: torch.device,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
) -> Parts:
    """Model (wrapped for DDP by ``wrap``), optimizer, schedule and scaler for one worker.

    Every rank builds the model from the same seed (``initial_model``: before the wrap, so DDP broadcasts
    ``model.init_from``'s weights with the rest); DDP also broadcasts rank 0's weights.
    """
    t = cfg.train
    model, full = initial_model(cfg, tasks, vocab_size), None
    if cfg.data.cache == "features":  # the batches carry the encoders' outputs: never run them here
        full, model = model, model.with_cached_features()
    model = wrap(model.to(device))
    optimizer = optim.build_optimizer(model, t, world_size)
    total = optim.steps_per_epoch(train_rows, world_size, t.batch_size, t.grad_accum_steps) * t.epochs
    precision = optim.resolve_precision(t.precision, device)
    return Parts(
        model,
        optimizer,
        optim.build_scheduler(optimizer, total, t.warmup_fraction),
        optim.make_scaler(precision, device),
        precision,
        device,
        full,
    )


@dataclass(frozen=True)
class TruePairs:
    """Which rows of a batch are true caption-image pairs for the alignment loss: every row (``task``
    None) or those whose ``task`` target is class ``index`` (``model.align.pairs``, resolved by
    ``true_pairs``). A row also needs both modalities."""

    task: str | None = None
    index: int = 0
    kind: str = "multiclass"

    def labelled(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B]`` bool: rows whose label makes them true pairs (every row for "all")."""
        if self.task is None:
            ref = next(iter(batch.values()))
            return torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)
        target = batch[label_key(self.task)]
        return target[:, self.index] > 0.5 if self.kind == "multilabel" else target.long() == self.index

    def rows(self, batch: dict[str, Tensor], masks: dict[str, Tensor]) -> Tensor:
        """``labelled`` rows that have both modalities (``masks``)."""
        return self.labelled(batch) & (torch.stack(list(masks.values()), 1).min(1).values > 0)


def true_pairs(spec: str, tasks: list[Task]) -> TruePairs:
    """``model.align.pairs`` ("all" or "TASK=VALUE") against the tasks' label maps.

    Raises:
        ValueError: an unknown task or label, or a regression task (it has no labels), naming the key.
    """
    found = pair_class(spec, tasks)
    if found is None:
        return TruePairs()
    task, index = found
    return TruePairs(task.name, index, task.kind)


def _task_rows(
    out: dict, batch: dict[str, Tensor], tasks: list[Task], loss_weights: dict[str, float], smoothing: float = 0.0
) -> Tensor:
    """The fused heads' loss per row ``[B]``; zeros without tasks (``mmray pretrain``: alignment only)."""
    if not tasks:
        return torch.zeros(batch_rows(batch), device=next(iter(batch.values())).device)
    targets = {t.name: batch[label_key(t.name)] for t in tasks}
    return weighted_row_loss(tasks, out["logits"], targets, loss_weights, smoothing)


def align_loss(
    out: dict, batch: dict[str, Tensor], pairs: TruePairs, gather: Callable[[Tensor], Tensor] = all_gather_rows
) -> tuple[Tensor, int]:
    """The alignment loss over the true pairs of ``batch`` and, with ``gather``, every other worker's
    (training: the negatives come from all of them; validation passes ``lambda t: t``, as its shards may
    hold different numbers of batches), and the number of pairs it counted."""
    aligned = out["aligned"]
    keep = pairs.rows(batch, out["masks"])
    # One gather for both modalities keeps each pair's rows together, in the same (rank) order.
    a, b = gather(torch.cat([aligned[m][keep] for m in sorted(aligned)], -1)).chunk(2, -1)
    # Pairs with one caption (the same token ids) are positives of each other, not negatives.
    positives = same_rows(gather(batch[INPUT_IDS][keep])) if INPUT_IDS in batch else None
    return info_nce(a, b, out["aligned_scale"], positives), a.shape[0]


def compute_loss(
    out: dict,
    batch: dict[str, Tensor],
    tasks: list[Task],
    loss_weights: dict[str, float],
    aux_weight: float,
    label_smoothing: float = 0.0,
    align_weight: float = 0.0,
    pairs: TruePairs | None = None,
    match_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Returns (mean training loss incl. auxiliary heads and alignment, per-row fused loss for metrics).

    Auxiliary (unimodal) head losses count only rows that have that modality. The alignment loss
    (``model.align``: the model's ``aligned`` vectors, InfoNCE over the true pairs of this batch on every
    worker, the other pairs' images and captions as negatives, pairs of one caption as positives of each
    other) is added with ``align_weight``; the matching loss (the model's ``match``: binary cross-entropy of
    its true pairs and hard negatives) with ``match_weight``.
    """
    fused_rows = _task_rows(out, batch, tasks, loss_weights, label_smoothing)
    loss = fused_rows.mean()
    targets = {t.name: batch[label_key(t.name)] for t in tasks}
    for m, heads in out["aux"].items():
        present = out["masks"][m]
        rows = weighted_row_loss(tasks, heads, targets, loss_weights, label_smoothing)
        loss = loss + aux_weight * (rows * present).sum() / present.sum().clamp_min(1)
    if align_weight > 0 and out.get("aligned"):
        loss = loss + align_weight * align_loss(out, batch, pairs or TruePairs())[0]
    if match_weight > 0 and "match" in out:
        logits, targets = out["match"]
        if logits.numel():
            loss = loss + match_weight * F.binary_cross_entropy_with_logits(logits.float(), targets)
        else:
            loss = loss + logits.sum()  # no pairs here: zero, with the head still in the graph
    return loss, fused_rows


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Yields ``(item, is_last)``: the loop must know the last batch before running it (see below)."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for upcoming in it:
        yield current, False
        current = upcoming
    yield current, True


def batch_rows(batch: dict[str, Tensor]) -> int:
    return next(iter(batch.values())).shape[0]


@dataclass(frozen=True)
class EpochTotals:
    loss_sum: float  # sum over rows of the training loss (mean-per-batch loss x batch rows)
    rows: int
    steps: int  # optimizer steps taken
    grad_norm_sum: float = 0.0  # sum over steps of the pre-clip gradient norm (this worker's view)


def train_epoch(
    parts: Parts,
    batches: Iterable[dict[str, Tensor]],
    cfg: Config,
    tasks: list[Task],
    before_step: Callable[[int], None] | None = None,
) -> EpochTotals:
    """One pass over this worker's batches.

    Gradients accumulate over ``train.grad_accum_steps`` batches; DDP all-reduces only on the batch
    that ends a window (``no_sync`` on the others). The last batch always ends a window, so a partial
    window is stepped with synchronised gradients: every rank has the same number of batches
    (``equal=True`` split), hence the same windows and collectives.

    Args:
        before_step: called with the epoch's step index before each optimizer step.
    """
    model, t = parts.model, cfg.train
    align = cfg.model.align
    pairs = true_pairs(align.pairs, tasks) if align.weight > 0 else None
    model.train()
    parts.optimizer.zero_grad(set_to_none=True)
    loss_sum, rows, steps, window = torch.zeros((), device=parts.device), 0, 0, 0
    norm_sum = torch.zeros((), device=parts.device)
    for batch, last in with_last(batches):
        if cfg.data.image.augment and PIXELS in batch:
            batch[PIXELS] = augment(batch[PIXELS])  # per epoch, on the cached uint8 pixels
        window += 1
        boundary = window == t.grad_accum_steps or last
        sync = nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with optim.autocast(parts.precision, parts.device):
                out = model(batch, pairs=pairs.labelled(batch)) if align.itm_weight > 0 else model(batch)
                loss, _ = compute_loss(
                    out,
                    batch,
                    tasks,
                    cfg.model.loss_weights,
                    cfg.model.aux_loss_weight,
                    t.label_smoothing,
                    align.weight,
                    pairs,
                    align.itm_weight,
                )
            scaled = loss / t.grad_accum_steps
            (parts.scaler.scale(scaled) if parts.scaler else scaled).backward()
        if boundary:
            if before_step is not None:
                before_step(steps)
            norm = optim.optimizer_step(model, parts.optimizer, parts.scheduler, parts.scaler, t.grad_clip)
            norm_sum += norm.detach().float().nan_to_num(posinf=0.0)  # fp16 overflow steps are skipped anyway
            steps, window = steps + 1, 0
        n = batch_rows(batch)
        rows += n
        loss_sum += loss.detach().float() * n  # stays on the device: no sync per batch
    return EpochTotals(float(loss_sum), rows, steps, float(norm_sum))


def validation_metrics(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    tasks: list[Task],
    loss_weights: dict[str, float],
    precision: str = "fp32",
    device: torch.device | None = None,
    reduce: Callable[[Tensor], Tensor] = all_reduce,
    pairs: TruePairs | None = None,
) -> dict[str, float]:
    """Validation metrics over every worker's shard.

    Pass the bare model (``unwrap``), not the DDP wrapper: shards may hold different numbers of
    batches, and DDP's forward takes part in collectives. Each worker accumulates sums (loss, row count, confusion matrices, score histograms); ``reduce``
    adds them up across workers before any ratio is taken, so the result is the single-process
    result on the union of the shards, not an average of per-worker averages.
    """
    model.eval()
    acc = MetricAccumulator(tasks)
    aligned = torch.zeros(2, dtype=torch.float64, device=device)  # alignment loss x pairs, pairs
    with torch.no_grad():
        for batch in batches:
            with optim.autocast(precision, device or torch.device("cpu")):
                out = model(batch)
            targets = {t.name: batch[label_key(t.name)] for t in tasks}
            rows = _task_rows(out, batch, tasks, loss_weights)  # the fused heads only
            acc.update(out["logits"], targets, rows.sum().item(), batch_rows(batch))
            if pairs is not None and out["aligned"]:
                loss, n = align_loss(out, batch, pairs, gather=lambda t: t)
                aligned[0] += loss.double() * n  # stays on the device: no sync per batch
                aligned[1] += n
    acc.load_state(reduce(acc.state()))
    metrics = acc.compute()
    if pairs is not None:
        total, n = reduce(aligned).tolist()
        metrics["align_loss"] = total / max(n, 1.0)  # in-batch InfoNCE per pair, over every worker's pairs
    return metrics


def epoch_record(
    epoch: int, train: Tensor, val: dict[str, float], train_s: float, val_s: float, parts: Parts, progress: Progress
) -> dict[str, Any]:
    """One line of ``history.jsonl`` (also the metrics reported to Ray Train).

    Args:
        train: ``[loss_sum, rows, grad_norm_sum, steps]`` summed over workers (``grad_norm`` is the mean
            pre-clip gradient norm per optimizer step; DDP ranks see the same all-reduced gradients).
    """
    rates = {g.get("name", str(i)): g["lr"] for i, g in enumerate(parts.optimizer.param_groups)}
    record: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": float(train[0] / max(float(train[1]), 1.0)),
        **{f"val_{k}": v for k, v in val.items()},
        "train_rows": int(train[1]),
        "rows_per_s": float(train[1]) / max(train_s, 1e-9),
        "epoch_s": train_s,
        "eval_s": val_s,
        "grad_norm": float(train[2] / max(float(train[3]), 1.0)),
        "lr": rates.get("head", next(iter(rates.values()), 0.0)),
        "step": int(parts.scheduler.last_epoch),
        "resumed_from_epoch": progress.resumed_from_epoch,
    }
    if "encoder" in rates:
        record["encoder_lr"] = rates["encoder"]
    if parts.device.type == "cuda":
        record["max_gpu_mem_gib"] = torch.cuda.max_memory_allocated(parts.device) / 2**30
    return record


def _rank_seed(seed: int, rank: int, epoch: int) -> int:
    """Distinct augmentation/dropout streams per rank; per epoch when a resume cannot restore them."""
    return seed + 7919 * rank + 104_729 * epoch


def _resume(parts: Parts, cfg: Config, rank: int, world: int) -> Progress:
    """From Ray Train's latest checkpoint (restart / rerun), else ``train.resume_from``, else fresh."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            progress = restore(d, parts.saved, parts.optimizer, parts.scheduler, parts.scaler, rank, world)
        source = checkpoint.path
    elif cfg.train.resume_from:
        source = cfg.train.resume_from
        with storage.local_dir(source, cfg.storage) as local:
            progress = restore(local, parts.saved, parts.optimizer, parts.scheduler, parts.scaler, rank, world)
    else:
        seed_everything(_rank_seed(cfg.train.seed, rank, 0))
        return Progress()
    if not progress.rng_restored:
        seed_everything(_rank_seed(cfg.train.seed, rank, progress.next_epoch))  # weights only
    print0(f"mmray: resumed from {source} at epoch {progress.next_epoch}")
    return progress


def _report(
    parts: Parts, inputs: LoopInputs, progress: Progress, record: dict[str, Any], rank: int, trackers: list[Tracker]
) -> None:
    """Every worker reports the record; rank 0 alone writes and attaches the checkpoint."""
    rng_states = gather_objects(get_rng_state())  # each rank's own stream, restored per rank
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            info = CheckpointInfo(
                inputs.config.model, inputs.preprocess, tuple(inputs.tasks), inputs.vocab_size, progress.epoch, record
            )
            state = train_state(parts.optimizer, parts.scheduler, parts.scaler, progress, rng_states)
            save_checkpoint(tmp, parts.saved, info, inputs.tokenizer_files, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        # Returns once the checkpoint is persisted, so history never runs ahead of the checkpoints.
        ray.train.report(record, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch{progress.epoch:04d}")
    for tracker in trackers:
        tracker.log_epoch(record, progress.history)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config`` is ``LoopInputs.as_loop_config()``."""
    inputs = LoopInputs.from_loop_config(loop_config)
    cfg, tasks = inputs.config, inputs.tasks
    before_step = load_before_step(cfg.train.before_step)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = cfg.train
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
    parts = build_parts(
        cfg,
        tasks,
        inputs.vocab_size,
        inputs.train_rows,
        world,
        device,
        wrap=lambda m: ray.train.torch.prepare_model(
            # mmray pretrain has no task heads: without matching the fusion takes no part in the loss
            m,
            move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": True} if not tasks else None,
        ),
    )
    align = cfg.model.align
    val_pairs = true_pairs(align.pairs, tasks) if align.weight > 0 else None
    progress = _resume(parts, cfg, rank, world)
    if progress.next_epoch >= t.epochs or (
        t.early_stopping.metric and progress.bad_epochs >= t.early_stopping.patience
    ):
        # Already finished (e.g. the driver died after the last epoch): report where it ended.
        print0(f"mmray: run already finished at epoch {progress.epoch}")
        ray.train.report(progress.history[-1] if progress.history else {"epoch": progress.epoch})
        return
    trackers = make_trackers(cfg, inputs.run_dir, inputs.run_name) if rank == 0 else []
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    iter_kwargs = {"batch_size": t.batch_size, "device": device, "prefetch_batches": t.prefetch_batches}
    try:
        for epoch in range(progress.next_epoch, t.epochs):
            started = time.perf_counter()
            batches = train_shard.iter_torch_batches(
                **iter_kwargs, local_shuffle_buffer_size=max(256, 4 * t.batch_size), local_shuffle_seed=t.seed + epoch
            )
            hook = functools.partial(before_step, rank, epoch) if before_step else None
            totals = train_epoch(parts, batches, cfg, tasks, hook)
            train_s = time.perf_counter() - started
            summed = all_reduce(
                torch.tensor([totals.loss_sum, totals.rows, totals.grad_norm_sum, totals.steps], dtype=torch.float64)
            )
            broadcast_buffers(parts.model)
            # The bare module: DDP's forward runs collectives (buffer broadcasts), and validation shards
            # may differ in length, so a wrapped forward could wait forever for a rank with no rows left.
            val = validation_metrics(
                unwrap(parts.model),
                val_shard.iter_torch_batches(**iter_kwargs),
                tasks,
                cfg.model.loss_weights,
                parts.precision,
                device,
                pairs=val_pairs,
            )
            progress.epoch, progress.step = epoch, int(parts.scheduler.last_epoch)
            record = epoch_record(epoch, summed, val, train_s, time.perf_counter() - started - train_s, parts, progress)
            require_metric(record, t.checkpoint_metric, "train.checkpoint_metric")
            progress.best, progress.bad_epochs, stop = early_stopping_update(
                t.early_stopping, record, progress.best, progress.bad_epochs
            )
            progress.history.append(record)
            _report(parts, inputs, progress, record, rank, trackers)
            if stop:
                print0(
                    f"mmray: early stopping at epoch {epoch}: {t.early_stopping.metric} did not improve "
                    f"for {progress.bad_epochs} epochs"
                )
                break
    finally:
        for tracker in trackers:
            tracker.close()
