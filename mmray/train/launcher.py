"""Driver side of training: prepare data once, then ``TorchTrainer(...).fit()``.

Steps: list + schema-check the input, build label maps and the tokenizer, preprocess train/val in a
bounded actor pool, quarantine bad rows (counts reconcile: ``rows_in == rows_used + rows_quarantined``),
keep the usable rows in the object store or stream them (``data.cache``, see ``mmray.train.ingest``),
and launch ``train_loop_per_worker`` on ``train.num_workers`` workers.

A run lives in ``train.storage_path/train.name``. A fresh run gets a unique name; rerunning with the
same name (e.g. after the driver died) resumes from its latest checkpoint, because Ray Train V2
restores the run's checkpoint manager from that directory. Worker deaths are absorbed by
``train.max_failures`` restarts of the worker group, which also resume from the latest checkpoint.

Example:
    mmray train --config configs/demo.yaml data.train=work/data/train data.val=work/data/val \
        train.name=nightly train.max_failures=2
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray.train
from ray.train.torch import TorchTrainer

from mmray.checkpoint import BUNDLE_FILE, TOKENIZER_DIR
from mmray.config import Config, config_to_dict
from mmray.console import (
    Ticker, bar, doing, epoch_line, format_duration, progress_interval, say, train_log_level, versions,
)
from mmray.data import pipeline, storage
from mmray.data.labels import LabelCollector, Task
from mmray.data.preprocess import PreprocessSpec
from mmray.data.text import TextNormalizer, TokenEncoder, load_tokenizer, read_tokenizer_dir, train_wordpiece
from mmray.runtime import READ_TASKS, Demand, check_resources
from mmray.train import faults, ingest
from mmray.train.loop import train_loop_per_worker
from mmray.train.tracking import check_trackers_available, read_history

__all__ = [
    "CONFIG_FILE", "EpochPrinter", "Prepared", "TrainResult", "build_trainer", "fresh_run_name", "loop_inputs",
    "prepare", "result_uri",
    "run_training", "scaling_config", "storage_root", "trainer_demand",
]  # fmt: skip

TrainResult = dict[str, Any]  # {"run_dir", "checkpoint", "metrics"}
CONFIG_FILE = "config.json"  # in the run dir: the resolved config (redacted) and the versions that ran it
_TOKENIZER_SAMPLE_ROWS = 200_000  # texts used to train a WordPiece vocabulary


def fresh_run_name() -> str:
    return f"mmray-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def storage_root(cfg: Config) -> str:
    path = cfg.train.storage_path
    return path.rstrip("/") if storage.is_s3(path) else os.path.abspath(os.path.expanduser(path))


def build_tasks(cfg: Config, uri: str, files: list[str]) -> list[Task]:
    """One task per label column; label maps from the training data (sorted, deterministic).

    Streams the label columns file by file, keeping only their distinct values.
    """
    collectors = {name: LabelCollector(name) for name in cfg.data.label_columns}
    for batch in _batches(cfg, uri, files, list(collectors)):
        for name, collector in collectors.items():
            collector.add(batch.column(name))
    return [c.task(cfg.model.tasks.get(name)) for name, c in collectors.items()]


def _batches(cfg: Config, uri: str, files: list[str], columns: list[str]):
    """Record batches of ``columns``, file by file (each file keeps its own schema: an all-null
    column is typed null in one file and string in the next)."""
    fs, _ = storage.resolve(uri, cfg.storage)
    for path in files:
        with fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(columns=columns)


def prepare_tokenizer(cfg: Config, uri: str, files: list[str], run_dir: str) -> dict[str, bytes]:
    """The tokenizer's files: reused from the run dir (resume), else ``train.resume_from``'s (the
    checkpoint's embedding rows are indexed by that vocabulary), else loaded (pretrained) or trained.
    """
    saved = storage.join(run_dir, TOKENIZER_DIR)
    if storage.exists(storage.join(saved, "tokenizer_config.json"), cfg.storage):
        return _read_tokenizer(saved, cfg)
    enc = cfg.model.text_encoder
    with tempfile.TemporaryDirectory() as tmp:
        source = enc.tokenizer or (enc.name if enc.kind == "hf" else None)
        if cfg.train.resume_from:
            for name, data in _read_tokenizer(storage.join(cfg.train.resume_from, TOKENIZER_DIR), cfg).items():
                Path(tmp, name).write_bytes(data)
        elif source:
            key = "model.text_encoder.tokenizer" if enc.tokenizer else "model.text_encoder.name"
            try:
                tokenizer = load_tokenizer(source, cfg.storage)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{key}: {e}") from None
            if tokenizer.pad_token is None:  # GPT-style vocabularies: any token works under the attention mask
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
            if tokenizer.pad_token is None:
                raise ValueError(f"{key}: tokenizer {source!r} has no pad, eos, unk or sep token to pad with")
            tokenizer.save_pretrained(tmp)
        else:
            normalize = TextNormalizer(cfg.data.text, cfg.storage)
            train_wordpiece(_texts(cfg, uri, files, normalize), cfg.data.text.vocab_size, tmp,
                            split_cjk=cfg.data.text.segmenter == "none")  # fmt: skip
        storage.copy_dir_to(tmp, saved, cfg.storage)
        return read_tokenizer_dir(tmp)


def _read_tokenizer(uri: str, cfg: Config) -> dict[str, bytes]:
    with storage.local_dir(uri, cfg.storage) as local:
        return read_tokenizer_dir(local)


def _texts(cfg: Config, uri: str, files: list[str], normalize: TextNormalizer):
    seen = 0
    for batch in _batches(cfg, uri, files, [cfg.data.text_column]):
        for text in batch.column(0).to_pylist():
            text = normalize(text) if isinstance(text, str) else ""
            if text:
                yield text
                seen += 1
        if seen >= _TOKENIZER_SAMPLE_ROWS:
            return


def loop_inputs(cfg: Config, tasks: list[Task], spec: PreprocessSpec, tokenizer_files: dict[str, bytes],
                vocab_size: int, train_rows: int, run_dir: str, name: str) -> dict[str, Any]:  # fmt: skip
    """What every worker receives: plain data only (the config as a dict, tokenizer files as bytes)."""
    return {
        "config": config_to_dict(cfg),
        "tasks": [t.to_dict() for t in tasks],
        "preprocess": spec.to_dict(),
        "tokenizer_files": tokenizer_files,
        "vocab_size": vocab_size,
        "train_rows": train_rows,
        "run_dir": run_dir,
        "run_name": name,
        # Test-only fault injection (mmray.train.faults); read on the driver, where tests set it.
        "fault_file": os.environ.get(faults.ENV_VAR),
    }


def trainer_demand(cfg: Config) -> Demand:
    """What the trainer workers hold for the whole run (what ``scaling_config`` asks Ray for)."""
    t = cfg.train
    per_worker = {k: float(v) for k, v in t.resources_per_worker.items()}
    if t.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    return Demand("train.num_workers x train.resources_per_worker", t.num_workers, per_worker)


def scaling_config(cfg: Config) -> ray.train.ScalingConfig:
    """``train.num_workers`` x (``train.resources_per_worker`` + 1 GPU each when ``train.use_gpu``)."""
    return ray.train.ScalingConfig(
        num_workers=cfg.train.num_workers,
        use_gpu=cfg.train.use_gpu,
        resources_per_worker=dict(cfg.train.resources_per_worker),
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


def prepare(cfg: Config, run_dir: str) -> Prepared:
    """Checks the inputs, builds label maps and the tokenizer (kept in ``run_dir``), preprocesses the
    splits and writes their quarantine under ``run_dir``. Ray must already be initialised."""
    if not cfg.data.train or not cfg.data.val:
        raise ValueError("data.train and data.val must be set")
    check_trackers_available(cfg)
    if cfg.train.resume_from and not storage.exists(storage.join(cfg.train.resume_from, BUNDLE_FILE), cfg.storage):
        raise FileNotFoundError(f"train.resume_from: {storage.redact(cfg.train.resume_from)} is not an mmray "
                                f"checkpoint (no {BUNDLE_FILE})")  # fmt: skip
    unlabeled = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=(), with_labels=False)
    expected = {**unlabeled.input_columns(), **{c: "label" for c in cfg.data.label_columns}}
    train_files = pipeline.input_files(cfg.data.train, expected, cfg.storage)
    val_files = pipeline.input_files(cfg.data.val, expected, cfg.storage)
    tasks = build_tasks(cfg, cfg.data.train, train_files)
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=tasks, with_labels=True)
    tokenizer_files = prepare_tokenizer(cfg, cfg.data.train, train_files, run_dir)
    vocab_size = TokenEncoder(tokenizer_files, cfg.data.text.max_length).vocab_size
    splits = {"train": (cfg.data.train, train_files), "val": (cfg.data.val, val_files)}
    check_resources("mmray train (preprocessing)", [pipeline.preprocess_demand(cfg.data.preprocess), READ_TASKS])
    datasets, counts, cached = ingest.prepare_datasets(cfg, spec, tasks, tokenizer_files, run_dir, splits)
    return Prepared(tasks, spec, tokenizer_files, vocab_size, datasets, counts, cached)


def build_trainer(cfg: Config, prepared: Prepared, root: str, name: str, callbacks: tuple = ()) -> TorchTrainer:
    """The run ``root/name``'s ``TorchTrainer``, not started; ``callbacks`` are Ray Train callbacks."""
    run_dir = storage.join(root, name)
    inputs = loop_inputs(cfg, prepared.tasks, prepared.spec, prepared.tokenizer_files, prepared.vocab_size,
                         prepared.counts["train"]["rows_used"], run_dir, name)  # fmt: skip
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=inputs,
        scaling_config=scaling_config(cfg),
        run_config=_run_config(cfg, root, name, list(callbacks)),
        datasets=prepared.datasets,
        dataset_config=ingest.ShardConfig(equal_splits=("train",)),
    )


def _training_demands(cfg: Config, streamed: bool) -> list[Demand]:
    """Streamed splits are preprocessed while the workers train; cached ones were preprocessed before."""
    pool = [pipeline.preprocess_demand(cfg.data.preprocess)] if streamed else []
    return [trainer_demand(cfg), *pool, READ_TASKS]


def run_training(cfg: Config) -> TrainResult:
    """Runs one training job end to end; Ray must already be initialised."""
    name = cfg.train.name or fresh_run_name()
    root = storage_root(cfg)
    run_dir = storage.join(root, name)
    if cfg.data.cache == "never":  # streamed for sure: fail before the splits' first preprocessing pass
        check_resources("mmray train", _training_demands(cfg, streamed=True))
    started = time.monotonic()
    with doing("preparing the data and run directory", run_dir):
        prepared = prepare(cfg, run_dir)
    check_resources("mmray train", _training_demands(cfg, streamed=not prepared.cached))
    t, counts = cfg.train, prepared.counts
    say(f"run {storage.redact(run_dir)}: {t.num_workers} {'GPU' if t.use_gpu else 'CPU'} worker(s), "
        f"{counts['train']['rows_used']:,} train + {counts['val']['rows_used']:,} val rows "
        f"({'cached in the object store' if prepared.cached else 'streamed'}), {t.epochs} epochs", "train")  # fmt: skip
    resolved = {"config": config_to_dict(cfg), "versions": versions()}  # what mmray report shows as lineage
    storage.write_text(storage.join(run_dir, CONFIG_FILE), storage.redact(json.dumps(resolved, indent=2, default=str)),
                       cfg.storage)  # fmt: skip
    printer = EpochPrinter(run_dir, cfg)
    with Ticker(printer.poll, interval_s=progress_interval()):
        result = build_trainer(cfg, prepared, root, name).fit()
    printer.clear()
    best = result.get_best_checkpoint(cfg.train.checkpoint_metric, cfg.train.checkpoint_mode) or result.checkpoint
    checkpoint_uri = result_uri(best.path, root)
    metrics = {k[len("val_"):]: v for k, v in result.metrics.items() if k.startswith("val_")}
    metrics.update(epoch=result.metrics["epoch"], train_loss=result.metrics["train_loss"])
    say(f"finished in {format_duration(time.monotonic() - started)}: {printer.summary(result.metrics)}; "
        f"best checkpoint {storage.redact(checkpoint_uri)}", "train")  # fmt: skip
    metrics["data"] = prepared.counts
    metrics["data_cached"] = prepared.cached
    storage.write_text(storage.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2), cfg.storage)
    pointer = {"run_dir": run_dir, "checkpoint": checkpoint_uri, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.write_text(storage.join(root, "latest.json"), json.dumps(pointer, indent=2), cfg.storage)
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
            print(f"\r\033[K{bar(len(self.done) / self.epochs)} epoch {running}/{self.epochs} running "
                  f"{format_duration(time.monotonic() - self.since)}{took}", end="", file=sys.stderr, flush=True)  # fmt: skip

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


def result_uri(path: str, root: str) -> str:
    """Ray reports scheme-less S3 paths; give users back a URI they can pass to ``mmray score``."""
    return f"s3://{path}" if storage.is_s3(root) and not path.startswith("s3://") else path
