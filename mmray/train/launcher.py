"""Driver side of training: prepare data once, then ``TorchTrainer(...).fit()``.

Steps: list + schema-check the input, build label maps and the tokenizer, preprocess train/val in a
bounded actor pool, quarantine bad rows (counts reconcile: ``rows_in == rows_used + rows_quarantined``),
cache the usable rows in the object store, and launch ``train_loop_per_worker`` on N workers.
A run lives in ``train.storage_path/train.name``; a fresh run gets a unique name and rerunning with the
same name resumes its last checkpoint (Ray Train V2 restores the run's snapshot).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import ray.train
from ray.train.torch import TorchTrainer

from mmray.config import Config, config_to_dict
from mmray.data import pipeline, storage
from mmray.data import schema as S
from mmray.data.labels import Task, build_task, infer_kind
from mmray.data.preprocess import PreprocessSpec
from mmray.data.text import TextNormalizer, load_tokenizer, train_wordpiece
from mmray.train.loop import train_loop_per_worker

__all__ = ["TrainResult", "fresh_run_name", "run_training"]

TrainResult = dict[str, Any]  # {"run_dir", "checkpoint", "metrics"}
_TOKENIZER_SAMPLE_ROWS = 200_000  # texts used to train a WordPiece vocabulary


def fresh_run_name() -> str:
    return f"mmray-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def storage_root(cfg: Config) -> str:
    path = cfg.train.storage_path
    return path.rstrip("/") if storage.is_s3(path) else os.path.abspath(os.path.expanduser(path))


def build_tasks(cfg: Config, uri: str, files: list[str]) -> list[Task]:
    """One task per label column; label maps from the training data (sorted, deterministic)."""
    fs, _ = storage.resolve(uri, cfg.storage)
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=cfg.data.label_columns)
    tasks = []
    for name in cfg.data.label_columns:
        column = table.column(name)
        values = column.to_pylist()
        kind = cfg.model.tasks.get(name) or infer_kind(column.type, len({str(v) for v in values if v is not None}))
        tasks.append(build_task(name, kind, values))
    return tasks


def prepare_tokenizer(cfg: Config, uri: str, files: list[str], run_dir: str) -> dict[str, bytes]:
    """The tokenizer's files: reused from the run dir (resume), loaded (pretrained) or trained."""
    saved = storage.join(run_dir, "tokenizer")
    if storage.exists(storage.join(saved, "tokenizer_config.json"), cfg.storage):
        return _read_dir(storage.copy_dir_from(saved, cfg.storage))
    enc = cfg.model.text_encoder
    with tempfile.TemporaryDirectory() as tmp:
        source = enc.tokenizer or (enc.name if enc.kind == "hf" else None)
        if source:
            load_tokenizer(source, cfg.storage).save_pretrained(tmp)
        else:
            normalize = TextNormalizer(cfg.data.text, cfg.storage)
            train_wordpiece(_texts(cfg, uri, files, normalize), cfg.data.text.vocab_size, tmp)
        storage.copy_dir_to(tmp, saved, cfg.storage)
        return _read_dir(tmp)


def _texts(cfg: Config, uri: str, files: list[str], normalize: TextNormalizer):
    fs, _ = storage.resolve(uri, cfg.storage)
    seen = 0
    for batch in pads.dataset(files, filesystem=fs, format="parquet").to_batches(columns=[cfg.data.text_column]):
        for text in batch.column(0).to_pylist():
            if text:
                yield normalize(text)
                seen += 1
        if seen >= _TOKENIZER_SAMPLE_ROWS:
            return


def _read_dir(directory: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


def prepare_split(cfg: Config, uri: str, files: list[str], spec, tokenizer_files, run_dir: str, split: str):
    """Preprocesses one split; writes its quarantine; returns (usable dataset, counts)."""
    columns = list(spec.input_columns())
    processed = pipeline.preprocess(
        pipeline.read_input(uri, files, cfg.storage, columns), spec, tokenizer_files, cfg.data.preprocess
    ).materialize()
    quarantine = pipeline.quarantine_table(processed)
    rows_in = processed.count()
    where = storage.join(run_dir, "quarantine", f"{split}.parquet")
    pipeline.write_quarantine(quarantine, where, cfg.storage)
    pipeline.check_bad_fraction(rows_in, quarantine.num_rows, cfg.data.max_bad_fraction, where)
    usable = pipeline.usable_rows(processed).drop_columns([S.ID]).materialize()
    counts = {"rows_in": rows_in, "rows_used": usable.count(), "rows_quarantined": quarantine.num_rows}
    if counts["rows_used"] + counts["rows_quarantined"] != rows_in:
        raise AssertionError(f"{split}: row counts do not reconcile: {counts}")  # never lose a row
    return usable, counts


def run_training(cfg: Config) -> TrainResult:
    """Runs one training job end to end; Ray must already be initialised."""
    if not cfg.data.train or not cfg.data.val:
        raise ValueError("data.train and data.val must be set")
    name = cfg.train.name or fresh_run_name()
    root = storage_root(cfg)
    run_dir = storage.join(root, name)
    unlabeled = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=(), with_labels=False)
    expected = {**unlabeled.input_columns(), **{c: "label" for c in cfg.data.label_columns}}
    train_files = pipeline.input_files(cfg.data.train, expected, cfg.storage)
    val_files = pipeline.input_files(cfg.data.val, expected, cfg.storage)
    tasks = build_tasks(cfg, cfg.data.train, train_files)
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=tasks, with_labels=True)
    tokenizer_files = prepare_tokenizer(cfg, cfg.data.train, train_files, run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for fname, data in tokenizer_files.items():
            Path(tmp, fname).write_bytes(data)
        vocab_size = len(load_tokenizer(tmp))

    train_ds, train_counts = prepare_split(cfg, cfg.data.train, train_files, spec, tokenizer_files, run_dir, "train")
    val_ds, val_counts = prepare_split(cfg, cfg.data.val, val_files, spec, tokenizer_files, run_dir, "val")

    inputs = {
        "config": config_to_dict(cfg),
        "tasks": [t.to_dict() for t in tasks],
        "preprocess": spec.to_dict(),
        "tokenizer_files": tokenizer_files,
        "vocab_size": vocab_size,
        "train_rows": train_counts["rows_used"],
        "run_dir": run_dir,
        "resume_from": _local_checkpoint(cfg.train.resume_from, cfg),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=inputs,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=dict(cfg.train.resources_per_worker),
        ),
        run_config=_run_config(cfg, root, name),
        datasets={"train": train_ds, "val": val_ds},
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(cfg.train.checkpoint_metric, cfg.train.checkpoint_mode) or result.checkpoint
    checkpoint_uri = _uri(best.path, root)
    metrics = {k[len("val_"):]: v for k, v in result.metrics.items() if k.startswith("val_")}
    metrics.update(epoch=result.metrics["epoch"], train_loss=result.metrics["train_loss"])
    metrics["data"] = {"train": train_counts, "val": val_counts}
    storage.write_text(storage.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2), cfg.storage)
    pointer = {"run_dir": run_dir, "checkpoint": checkpoint_uri, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.write_text(storage.join(root, "latest.json"), json.dumps(pointer, indent=2), cfg.storage)
    return {"run_dir": run_dir, "checkpoint": checkpoint_uri, "metrics": metrics}


def _run_config(cfg: Config, root: str, name: str) -> ray.train.RunConfig:
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
    )


def _uri(path: str, root: str) -> str:
    """Ray reports scheme-less S3 paths; give users back a URI they can pass to ``mmray score``."""
    return f"s3://{path}" if storage.is_s3(root) and not path.startswith("s3://") else path


def _local_checkpoint(uri: str | None, cfg: Config) -> str | None:
    return storage.copy_dir_from(uri, cfg.storage) if uri else None
