"""How the preprocessed splits reach the trainer workers.

``prepare_datasets`` preprocesses each split once up front, writes its quarantine and reconciles the
counts (``rows_in == rows_used + rows_quarantined``); cached splits share one read and one actor pool
(``preprocess_together``), so a run starts the pool once. Two decisions live here:

* ``data.cache``: keep the decoded, tokenized rows in Ray's object store for the whole run
  (preprocessing runs once; a prototype measured epochs ~40x slower on 2 CPUs when the actor pool
  re-ran every epoch), or stream them (preprocessing re-runs each epoch, memory stays bounded).
  ``auto`` caches when the estimated size fits in ``data.cache_max_fraction`` of the object store;
  ``features`` caches, and ``mmray.train.features`` then replaces the cached rows with the frozen
  encoders' outputs.
* Sharding: the training split is cut into exactly equal shards (every rank takes the same number
  of DDP steps, so no rank waits forever in a collective), the validation split into shards that
  drop no row (metrics cover the whole split however many workers there are).

Blocks keep their input order everywhere (``preserve_order``): with one worker and a fixed seed,
the batches (and so the metrics) of two runs are identical; the local shuffle is seeded per epoch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
import ray.data
import ray.train
from ray.data.dataset import MaterializedDataset

from mmray.config import Config
from mmray.console import say
from mmray.data import pipeline, storage
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.data.schema import ID
from mmray.runtime import guard_stalls

__all__ = [
    "ShardConfig",
    "cache_decision",
    "finish_split",
    "object_store_bytes",
    "one_pass",
    "ordered_blocks",
    "prepare_datasets",
    "prepare_split",
    "preprocess_together",
    "preprocessed",
    "row_bytes",
]

TRAIN = "train"
_ROW_OVERHEAD = 64  # Arrow offsets/validity per row and column, rounded up


def row_bytes(cfg: Config, tasks: list[Task]) -> int:
    """Bytes one preprocessed training row takes in the object store (uint8 pixels, int64 tokens)."""
    size, length = cfg.data.image.size, cfg.data.text.max_length
    labels = sum(8 if t.kind == "multiclass" else 4 * t.out_dim for t in tasks)
    return 3 * size * size + 2 * 8 * length + 2 * 4 + labels + _ROW_OVERHEAD


def object_store_bytes() -> int:
    """The cluster's object store capacity (all nodes)."""
    return int(ray.cluster_resources().get("object_store_memory", 0))


def cache_decision(mode: str, nbytes: int, store_bytes: int, max_fraction: float) -> tuple[bool, str]:
    """Whether to materialize, and a one-line reason for the log.

    Args:
        mode: ``data.cache``: ``always``, ``never``, ``auto`` or ``features`` (cached, then encoded).
        nbytes: estimated size of the preprocessed splits.
        store_bytes: object store capacity.
        max_fraction: ``data.cache_max_fraction``.
    """
    if mode in ("always", "never", "features"):
        return mode != "never", f"data.cache={mode}"
    budget = int(store_bytes * max_fraction)
    fits = nbytes <= budget
    verb = "fits in" if fits else "exceeds"
    return fits, (
        f"data.cache=auto: ~{nbytes / 2**20:.1f} MiB preprocessed {verb} "
        f"{max_fraction:.0%} of the {store_bytes / 2**30:.1f} GiB object store"
    )


@contextmanager
def ordered_blocks() -> Iterator[None]:
    """Datasets created inside keep their blocks in input order (they copy the context when created)."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def preprocessed(
    cfg: Config, uri: str, files: list[str], spec: PreprocessSpec, tokenizer_files: dict[str, bytes]
) -> ray.data.Dataset:
    """``files`` (on ``uri``'s filesystem) through the preprocessing pool, lazily: one output row per
    input row, in input order (``ordered_blocks``), guarded by ``data.stall_timeout_s``."""
    source = pipeline.read_input(uri, files, cfg.storage, list(spec.input_columns()))
    return pipeline.preprocess(
        guard_stalls(source, cfg.data.stall_timeout_s),  # carried into the trainer workers' shards
        spec,
        tokenizer_files,
        cfg.data.preprocess,
    )


def prepare_split(
    cfg: Config,
    uri: str,
    files: list[str],
    spec: PreprocessSpec,
    tokenizer_files: dict[str, bytes],
    run_dir: str,
    split: str,
    rows_in: int,
    cache: bool,
) -> tuple[ray.data.Dataset, dict[str, int]]:
    """Preprocesses one split, writes its quarantine, returns (usable rows, counts).

    Cached: preprocessing runs once and the usable rows stay in the object store. Streamed: one pass
    writes the quarantine as it streams (only its counts are kept) and training
    re-runs preprocessing every epoch; because it is a pure function of the row, every epoch yields
    exactly ``rows_used`` rows (image URIs that fail transiently are retried; one that fails for
    good in a later epoch only is dropped from that epoch).

    Args:
        rows_in: the split's row count from its file footers (``pipeline.count_rows``): preprocessing maps
            each input row to exactly one output row.
        cache: from ``cache_decision``.
    """
    processed = preprocessed(cfg, uri, files, spec, tokenizer_files)
    return finish_split(cfg, processed.materialize() if cache else processed, run_dir, split, rows_in)


def finish_split(
    cfg: Config, processed: ray.data.Dataset, run_dir: str, split: str, rows_in: int
) -> tuple[ray.data.Dataset, dict[str, int]]:
    """One split's preprocessed rows (materialized: cached; lazy: streamed) -> its quarantine under
    ``run_dir``, the bad-fraction check, (usable rows, counts); cached usable rows are materialized
    and must number ``rows_in - rows_quarantined``."""
    where = storage.join(run_dir, "quarantine", f"{split}.parquet")
    quarantine = pipeline.stream_quarantine(processed, where, cfg.storage)
    pipeline.check_bad_fraction(rows_in, quarantine.rows, cfg.data.max_bad_fraction, where, quarantine)
    usable = pipeline.usable_rows(processed).drop_columns([ID])
    counts = {"rows_in": rows_in, "rows_used": rows_in - quarantine.rows, "rows_quarantined": quarantine.rows}
    if isinstance(processed, MaterializedDataset):
        usable = usable.materialize()
        if usable.count() != counts["rows_used"]:  # never lose a row
            raise AssertionError(f"{split}: row counts do not reconcile: {counts}, {usable.count()} usable rows kept")
    return usable, counts


def _all_files(inputs: dict[str, tuple[str, list[str]]]) -> list[str]:
    """Every split's files, split after split (the order ``preprocess_together`` cuts them back in)."""
    return [f for _, split_files in inputs.values() for f in split_files]


def one_pass(inputs: dict[str, tuple[str, list[str]]]) -> bool:
    """Whether the splits can be preprocessed together: more than one, all on one kind of filesystem
    (local or S3: one read resolves them all), and no file in two splits (each row has one split)."""
    files = _all_files(inputs)
    return (
        len(inputs) > 1
        and len({storage.is_s3(uri) for uri, _ in inputs.values()}) == 1
        and len(set(files)) == len(files)
    )


def preprocess_together(
    cfg: Config,
    spec: PreprocessSpec,
    tokenizer_files: dict[str, bytes],
    inputs: dict[str, tuple[str, list[str]]],
    rows: dict[str, int],
) -> dict[str, MaterializedDataset]:
    """Every split's files in one read, one actor pool and one materialized pass, then cut back into
    the splits at their row counts: each input row makes exactly one output row and blocks keep input
    order, so the first ``rows[first]`` rows are the first split's. A run pays the pool's start-up
    (a process per actor, its tokenizer) once instead of once per split."""
    uri = next(iter(inputs.values()))[0]
    processed = preprocessed(cfg, uri, _all_files(inputs), spec, tokenizer_files).materialize()
    cuts = list(itertools.accumulate(rows[name] for name in inputs))[:-1]
    return dict(zip(inputs, processed.split_at_indices(cuts), strict=True))


def prepare_datasets(
    cfg: Config,
    spec: PreprocessSpec,
    tasks: list[Task],
    tokenizer_files: dict[str, bytes],
    run_dir: str,
    inputs: dict[str, tuple[str, list[str]]],
) -> tuple[dict, dict, bool]:
    """Preprocesses every split, cached or streamed per ``data.cache``; returns (datasets, counts, cached).
    Cached splits are preprocessed in one pass when ``one_pass`` allows it (``preprocess_together``).

    Args:
        inputs: split name -> (URI, its Parquet files).
    """
    rows = {name: pipeline.count_rows(uri, files, cfg.storage) for name, (uri, files) in inputs.items()}
    cache, why = cache_decision(
        cfg.data.cache, sum(rows.values()) * row_bytes(cfg, tasks), object_store_bytes(), cfg.data.cache_max_fraction
    )
    say(f"{why}: {'caching' if cache else 'streaming'} the preprocessed splits")
    datasets, counts = {}, {}
    with ordered_blocks():
        together = preprocess_together(cfg, spec, tokenizer_files, inputs, rows) if cache and one_pass(inputs) else {}
        for name, (uri, files) in inputs.items():
            if name in together:
                datasets[name], counts[name] = finish_split(cfg, together[name], run_dir, name, rows[name])
            else:
                datasets[name], counts[name] = prepare_split(
                    cfg, uri, files, spec, tokenizer_files, run_dir, name, rows[name], cache
                )
    return datasets, counts, cache


class ShardConfig(ray.train.DataConfig):
    """Splits ``train`` with ``equal=True`` and every other dataset with ``equal=False``.

    Ray Train's default splits every dataset with ``equal=True``, which drops up to ``world - 1``
    validation rows, so metrics would depend on the number of workers. Evaluation needs no equal
    shards: its only collective is one all-reduce after the last batch.
    """

    def __init__(self, equal_splits: tuple[str, ...] = (TRAIN,)):
        super().__init__(datasets_to_split="all")
        self._equal_splits = frozenset(equal_splits)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            ds.context.execution_options.preserve_order = True  # reproducible batches (see module doc)
            equal = name in self._equal_splits
            for i, split in enumerate(ds.streaming_split(world_size, equal=equal, locality_hints=hints)):
                output[i][name] = split
        return output
