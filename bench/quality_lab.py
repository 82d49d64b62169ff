"""Model-quality lab: one training run of the real model on a generated task, in one process, no Ray.

The same pieces as ``mmray train`` (``make_task_dataset``, ``build_tasks``, ``prepare_tokenizer``,
``Preprocessor``, ``build_parts``, ``train_epoch``, ``validation_metrics``) driven directly, so one
experiment on 3,000 rows takes a minute or two on one CPU thread instead of a Ray start per run. It
prints validation accuracy by epoch and the test accuracy (plus, with ``--also``, the test accuracy on
other tasks' test sets, e.g. the same model on another negative sampling). What ``bench/quality.py``
measures through the real CLI is the reference; this is for quick, comparable A/B runs.

Usage:
    OMP_NUM_THREADS=1 python bench/quality_lab.py --task match --rows 3000 model.fusion=cross_attention
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mmray.config import load_config
from mmray.data.benchmarks import make_task_dataset
from mmray.data.prepare import build_tasks, prepare_tokenizer
from mmray.data.preprocess import Preprocessor, PreprocessSpec
from mmray.train import optim
from mmray.train.loop import build_parts, train_epoch, validation_metrics

REPO = Path(__file__).resolve().parents[1]


def tensors(path: str, pre: Preprocessor) -> dict[str, torch.Tensor]:
    """A split, preprocessed as the training actors do, as one dict of tensors."""
    table = pq.read_table(path)
    raw = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    out = pre(raw)
    return {k: torch.from_numpy(v) for k, v in out.items() if isinstance(v, np.ndarray) and v.dtype != object}


def batches(data: dict[str, torch.Tensor], size: int, g: torch.Generator | None):
    n = next(iter(data.values())).shape[0]
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    for i in range(0, n, size):
        yield {k: v[order[i : i + size]] for k, v in data.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/recipe.yaml")
    p.add_argument("--task", default="match")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(REPO / args.config, args.overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        splits = make_task_dataset(args.task, tmp, args.rows, args.data_seed)
        train_dir = splits["train"]["path"]
        files = sorted(str(f) for f in Path(train_dir).glob("*.parquet"))
        tasks = build_tasks(cfg, train_dir, files)
        tokenizer = prepare_tokenizer(cfg, train_dir, files, str(Path(tmp, "tokenizer")))
        pre = Preprocessor(PreprocessSpec.from_config(cfg.data, cfg.storage, tasks), tokenizer)
        data = {s: tensors(splits[s]["path"], pre) for s in ("train", "val", "test")}
    vocab = len(json.loads(tokenizer["tokenizer.json"])["model"]["vocab"])
    n_train = data["train"]["pixels"].shape[0]
    parts = build_parts(cfg, tasks, vocab, n_train, 1, torch.device("cpu"))
    g = torch.Generator().manual_seed(cfg.train.seed)

    def measure(split: str) -> float:
        m = validation_metrics(parts.model, batches(data[split], 256, None), tasks, {}, reduce=lambda t: t)
        return m["accuracy"]

    vals = []
    for _ in range(cfg.train.epochs):
        train_epoch(parts, batches(data["train"], cfg.train.batch_size, g), cfg, tasks)
        vals.append(round(measure("val"), 3))
        print(f"epoch {len(vals)} val {vals[-1]}", file=sys.stderr, flush=True)
    result = {
        "task": args.task,
        "overrides": args.overrides,
        "test": round(measure("test"), 3),
        "train": round(measure("train"), 3),  # far above val: memorised rows, not the rule
        "val": vals,
        "s": round(time.perf_counter() - started),
        "params": sum(q.numel() for q in parts.model.parameters()),
        "lr": optim.lr_scale(cfg.train, 1) * cfg.train.lr,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
