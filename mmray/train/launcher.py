"""Driver side of training: prepare data once, then ``TorchTrainer(...).fit()``.

Steps: list + schema-check the input, build label maps and the tokenizer, preprocess train/val in a
bounded actor pool, quarantine bad rows (counts reconcile: ``rows_in == rows_used + rows_quarantined``),
keep the usable rows in the object store or stream them (``data.cache``, see ``mmray.train.ingest``;
or their frozen encoders' outputs, see ``mmray.train.features``), and launch ``train_loop_per_worker``
on ``train.num_workers`` workers.

The label maps and tokenizer come from ``mmray.data.prepare``; where runs live, from ``mmray.runs``.
A run lives in ``train.storage_path/train.name``. A fresh run gets a unique name; rerunning with the
same name (e.g. after the driver died) resumes from its latest checkpoint, because Ray Train V2
restores the run's checkpoint manager from that directory. Worker deaths are absorbed by
``train.max_failures`` restarts of the worker group, which also resume from the latest checkpoint.

Example:
    mmray train --config configs/demo.yaml data.train=work/data/train data.val=work/data/val \
        train.name=nightly train.max_failures=2
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from mmray.checkpoint import BUNDLE_FILE, TOKENIZER_DIR, check_train_state, open_checkpoint
from mmray.config import Config, ConfigError, TrainConfig, config_to_dict
from mmray.console import (
    Ticker,
    bar,
    doing,
    epoch_line,
    format_duration,
    progress_interval,
    say,
    train_log_level,
    versions,
)
from mmray.data import pipeline, storage
from mmray.data.labels import Task
from mmray.data.prepare import build_tasks, prepare_tokenizer
from mmray.data.preprocess import PreprocessSpec
from mmray.data.text.encoder import TokenEncoder
from mmray.runs import LATEST_POINTER, fresh_run_name, result_uri, storage_root
from mmray.runtime import READ_TASKS, Demand, check_resources, failing_on_stall, init_ray
from mmray.train import features, ingest
from mmray.train.hooks import load_before_step
from mmray.train.init_from import check_compatible
from mmray.train.loop import LoopInputs, train_loop_per_worker, true_pairs
from mmray.train.tracking import check_trackers_available, read_history

__all__ = [
    "CONFIG_FILE",
    "EpochPrinter",
    "Prepared",
    "TrainResult",
    "build_trainer",
    "loop_inputs",
    "prepare",
    "pretrain_config",
    "run_pretraining",
    "run_training",
    "scaling_config",
    "trainer_demand",
]

TrainResult = dict[str, Any]  # {"run_dir", "checkpoint", "metrics"}
CONFIG_FILE = "config.json"  # in the run dir: the resolved config (redacted) and the versions that ran it


def loop_inputs(cfg: Config, prepared: Prepared, run_dir: str, name: str) -> LoopInputs:
    """What every worker of the run ``run_dir`` receives (``name`` is its ``train.name``)."""
    return LoopInputs(
        config=cfg,
        tasks=prepared.tasks,
        preprocess=prepared.spec.to_dict(),
        tokenizer_files=prepared.tokenizer_files,
        vocab_size=prepared.vocab_size,
        train_rows=prepared.counts["train"]["rows_used"],
        run_dir=run_dir,
        run_name=name,
    )


def trainer_demand(cfg: Config) -> Demand:
    """What the trainer workers hold for the whole run (what ``scaling_config`` asks Ray for)."""
    t = cfg.train
    per_worker = {k: float(v) for k, v in t.resources_per_worker.items()}
    if t.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    return Demand("train.num_workers x train.resources_per_worker", t.num_workers, per_worker)


def scaling_config(train: TrainConfig) -> ray.train.ScalingConfig:
    """``train.num_workers`` x (``train.resources_per_worker`` + 1 GPU each when ``train.use_gpu``)."""
    return ray.train.ScalingConfig(
        num_workers=train.num_workers,
        use_gpu=train.use_gpu,
        resources_per_worker=dict(train.resources_per_worker),
    )


@dataclass(frozen=True)
class Prepared:
    """The data side of a run: built once, then handed to one trainer (``mmray train``) or to every
    trial of a sweep (``mmray tune``) whose sampled keys leave the preprocessing unchanged."""

    tasks: list[Task]
    spec: PreprocessSpec
    tokenizer_files: dict[str, bytes]
    vocab_size: int
    datasets: dict[str, Any]  # split name -> ray.data.Dataset of preprocessed, usable rows
    counts: dict[str, dict[str, int]]  # split name -> rows_in / rows_used / rows_quarantined
    cached: bool


def preflight(cfg: Config) -> None:
    """What a run can get wrong without Ray, checked before Ray starts (seconds, one line each): the
    splits named, the trackers' packages, the ``train.before_step`` hook, and the checkpoints it starts
    from (``train.resume_from``: torn weights or a pickle payload; ``model.init_from``: weights and
    encoder settings), so none of them fails later in a worker."""
    if not cfg.data.train or not cfg.data.val:
        raise ValueError("data.train and data.val must be set")
    check_trackers_available(cfg)
    load_before_step(cfg.train.before_step)  # the workers import it again; a typo fails here, in seconds
    if cfg.train.resume_from and not storage.exists(storage.join(cfg.train.resume_from, BUNDLE_FILE), cfg.storage):
        raise FileNotFoundError(
            f"train.resume_from: {storage.redact(cfg.train.resume_from)} is not an mmray checkpoint (no {BUNDLE_FILE})"
        )
    if cfg.train.resume_from:
        with open_checkpoint(cfg.train.resume_from, cfg.storage) as resumed:
            resumed.check_weights()
            check_train_state(resumed.directory)
    if cfg.model.init_from:
        with open_checkpoint(cfg.model.init_from, cfg.storage) as start:
            start.check_weights()
            check_compatible(cfg, start.info, storage.redact(cfg.model.init_from))


def prepare(cfg: Config, run_dir: str) -> Prepared:
    """Checks the inputs, builds label maps and the tokenizer (kept in ``run_dir``), preprocesses the
    splits and writes their quarantine under ``run_dir``. Ray must already be initialised, and
    ``preflight(cfg)`` must have passed."""
    # Before any data pass: the trainer workers and Ray Data's reads must fit whether the splits end up
    # cached or streamed (deciding that takes a preprocessing pass), and so must the preprocessing pool.
    check_resources("mmray train", _training_demands(cfg, streamed=cfg.data.cache == "never"))
    check_resources("mmray train (preprocessing)", [pipeline.preprocess_demand(cfg.data.preprocess), READ_TASKS])
    unlabeled = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=(), with_labels=False)
    expected = {**unlabeled.input_columns(), **{c: "label" for c in cfg.data.label_columns}}
    train_files = pipeline.input_files(cfg.data.train, expected, cfg.storage)
    val_files = pipeline.input_files(cfg.data.val, expected, cfg.storage)
    tasks = build_tasks(cfg, cfg.data.train, train_files)
    if cfg.model.align.weight > 0:
        true_pairs(cfg.model.align.pairs, tasks)  # an unknown task or label fails here, not in a worker
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=tasks, with_labels=True)
    # Kept in the run dir (a rerun of the run reuses it); train.resume_from's (or model.init_from's)
    # checkpoint indexes its embedding rows by its own vocabulary, so a run continuing it inherits that.
    start_from = cfg.train.resume_from or cfg.model.init_from
    inherited = storage.join(start_from, TOKENIZER_DIR) if start_from else None
    keep_in = storage.join(run_dir, TOKENIZER_DIR)
    tokenizer_files = prepare_tokenizer(cfg, cfg.data.train, train_files, keep_in, inherited)
    vocab_size = TokenEncoder(tokenizer_files, cfg.data.text.max_length).vocab_size
    splits = {"train": (cfg.data.train, train_files), "val": (cfg.data.val, val_files)}
    datasets, counts, cached = ingest.prepare_datasets(cfg, spec, tasks, tokenizer_files, run_dir, splits)
    if cfg.data.cache == "features":  # the pool of data.preprocess again, once the preprocessing is done
        datasets = features.encode_splits(cfg, tasks, vocab_size, datasets)
    return Prepared(tasks, spec, tokenizer_files, vocab_size, datasets, counts, cached)


def build_trainer(cfg: Config, prepared: Prepared, root: str, name: str, callbacks: tuple = ()) -> TorchTrainer:
    """The run ``root/name``'s ``TorchTrainer``, not started; ``callbacks`` are Ray Train callbacks."""
    inputs = loop_inputs(cfg, prepared, storage.join(root, name), name)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=inputs.as_loop_config(),
        scaling_config=scaling_config(cfg.train),
        run_config=_run_config(cfg, root, name, list(callbacks)),
        datasets=prepared.datasets,
        dataset_config=ingest.ShardConfig(equal_splits=("train",)),
    )


def _training_demands(cfg: Config, streamed: bool) -> list[Demand]:
    """Streamed splits are preprocessed while the workers train; cached ones were preprocessed before."""
    pool = [pipeline.preprocess_demand(cfg.data.preprocess)] if streamed else []
    return [trainer_demand(cfg), *pool, READ_TASKS]


def pretrain_config(cfg: Config) -> Config:
    """What ``mmray pretrain`` trains: ``cfg`` without label columns (captioned Parquet: id, text, image),
    every row a true pair, the alignment loss the only loss and, unless set, the checkpoint metric.

    Raises:
        ConfigError: alignment off, or ``pairs`` naming a label; naming the key.
    """
    align = cfg.model.align
    if align.weight <= 0:
        raise ConfigError("model.align.weight: mmray pretrain trains the alignment: set it > 0 (e.g. 1.0)")
    if align.pairs != "all":
        raise ConfigError(
            f"model.align.pairs: {align.pairs!r} names a label, and mmray pretrain reads no labels: every "
            "row's caption describes its image ('all')"
        )
    train = cfg.train
    if train.checkpoint_metric == TrainConfig.checkpoint_metric:  # the task loss, which pretraining has not
        train = dataclasses.replace(train, checkpoint_metric="val_align_loss", checkpoint_mode="min")
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, label_column=[]),
        model=dataclasses.replace(cfg.model, tasks={}),
        train=train,
    )


def run_pretraining(cfg: Config, address: str | None = None) -> TrainResult:
    """``mmray pretrain``: ``run_training`` of ``pretrain_config(cfg)``. Its checkpoint holds encoders and
    the alignment projection, no task heads; ``model.init_from`` starts a supervised run from it. It
    never becomes ``latest.json`` (what scoring picks by default)."""
    return run_training(pretrain_config(cfg), latest=False, address=address)


def run_training(cfg: Config, latest: bool = True, address: str | None = None) -> TrainResult:
    """Runs one training job end to end: ``preflight``, then Ray (``runtime.init_ray``: joined, or
    started, only once the run passed it; a no-op when the caller's is up), then the data and the
    trainer.

    Args:
        latest: point ``<storage root>/latest.json`` at the run's best checkpoint (scoring's default).
        address: the Ray to join (None: ``init_ray``'s choice, ``RAY_ADDRESS`` or an embedded one).
    """
    preflight(cfg)
    init_ray(address)
    name = cfg.train.name or fresh_run_name()
    root = storage_root(cfg)
    run_dir = storage.join(root, name)
    stall_s = cfg.data.stall_timeout_s
    started = time.monotonic()
    with doing("preparing the data and run directory", run_dir), failing_on_stall("mmray train", stall_s):
        prepared = prepare(cfg, run_dir)
    check_resources("mmray train", _training_demands(cfg, streamed=not prepared.cached))
    t, counts = cfg.train, prepared.counts
    say(
        f"run {storage.redact(run_dir)}: {t.num_workers} {'GPU' if t.use_gpu else 'CPU'} worker(s), "
        f"{counts['train']['rows_used']:,} train + {counts['val']['rows_used']:,} val rows "
        f"({'cached in the object store' if prepared.cached else 'streamed'}), {t.epochs} epochs",
        "train",
    )
    resolved = {"config": config_to_dict(cfg), "versions": versions()}  # what mmray report shows as lineage
    storage.write_text(
        storage.join(run_dir, CONFIG_FILE), storage.redact(json.dumps(resolved, indent=2, default=str)), cfg.storage
    )
    printer = EpochPrinter(run_dir, cfg)
    with Ticker(printer.poll, interval_s=progress_interval()), failing_on_stall("mmray train", stall_s):
        result = build_trainer(cfg, prepared, root, name).fit()  # a worker's stalled shard fails the run
    printer.clear()
    best = result.get_best_checkpoint(cfg.train.checkpoint_metric, cfg.train.checkpoint_mode) or result.checkpoint
    checkpoint_uri = result_uri(best.path, root)
    metrics = {k[len("val_") :]: v for k, v in result.metrics.items() if k.startswith("val_")}
    metrics.update(epoch=result.metrics["epoch"], train_loss=result.metrics["train_loss"])
    say(
        f"finished in {format_duration(time.monotonic() - started)}: {printer.summary(result.metrics)}; "
        f"best checkpoint {storage.redact(checkpoint_uri)}",
        "train",
    )
    metrics["data"] = prepared.counts
    metrics["data_cached"] = prepared.cached
    storage.write_text(storage.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2), cfg.storage)
    pointer = {
        "run_dir": run_dir,
        "checkpoint": checkpoint_uri,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    if latest:
        storage.write_text(storage.join(root, LATEST_POINTER), json.dumps(pointer, indent=2), cfg.storage)
    return {"run_dir": run_dir, "checkpoint": checkpoint_uri, "metrics": metrics}


class EpochPrinter:
    """Prints one line per finished epoch on the driver, from rank 0's record in ``history.jsonl``
    (the driver owns the terminal; the workers' own output reaches it only when verbose). Epochs that
    were in the file before this run started (a resumed run) are announced once, not reprinted. On a
    terminal a live status line (epoch running, for how long) sits under them."""

    def __init__(self, run_dir: str, cfg: Config):
        self.run_dir, self.cfg, self.epochs = run_dir, cfg, cfg.train.epochs
        self.done = {r["epoch"] for r in self._read()}
        self.seconds: list[float] = []  # wall time of each epoch printed (training + validation)
        self.last: dict[str, Any] | None = None
        self.since = time.monotonic()  # when the epoch now running started (as the driver saw it)
        if self.done:
            say(f"resuming: {len(self.done)} epoch(s) already done", "train")

    def _read(self) -> list[dict[str, Any]]:
        try:
            return read_history(self.run_dir, self.cfg)
        except FileNotFoundError:
            return []

    def poll(self) -> None:
        live = sys.stderr.isatty()
        for record in self._read():
            if record["epoch"] in self.done:
                continue
            self.done.add(record["epoch"])
            self.seconds.append(record.get("epoch_s", 0.0) + record.get("eval_s", 0.0))
            remaining = self.epochs - 1 - record["epoch"]
            eta = sum(self.seconds) / len(self.seconds) * remaining if remaining > 0 else None
            print(("\r\033[K" if live else "") + epoch_line(record, self.epochs, eta), file=sys.stderr, flush=True)
            self.last, self.since = record, time.monotonic()
        if live and len(self.done) < self.epochs:  # a live status line under the epoch lines
            running = len(self.done) + 1
            took = f" (one takes ~{format_duration(sum(self.seconds) / len(self.seconds))})" if self.seconds else ""
            print(
                f"\r\033[K{bar(len(self.done) / self.epochs)} epoch {running}/{self.epochs} running "
                f"{format_duration(time.monotonic() - self.since)}{took}",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def clear(self) -> None:
        """Removes the live status line (terminal only)."""
        if sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    def summary(self, final: dict[str, Any]) -> str:
        """The last epoch's losses and headline metrics, and early stopping when it happened."""
        text = epoch_line({k: v for k, v in final.items() if k != "rows_per_s"}, self.epochs, None)
        stop = self.cfg.train.early_stopping
        if final.get("epoch", self.epochs - 1) < self.epochs - 1 and stop.metric:
            text += f" (early stopping: {stop.metric} did not improve for {stop.patience} epochs)"
        return text


def _run_config(cfg: Config, root: str, name: str, callbacks: list | None = None) -> ray.train.RunConfig:
    fs = None
    storage_path = root
    if storage.is_s3(root):
        fs, storage_path = storage.resolve(root, cfg.storage)  # scheme-less bucket/prefix + filesystem
    return ray.train.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.train.num_to_keep,
            checkpoint_score_attribute=cfg.train.checkpoint_metric,
            checkpoint_score_order=cfg.train.checkpoint_mode,
        ),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=callbacks,
        logging_config=ray.train.LoggingConfig(log_level=train_log_level()),
    )
