"""The actor pools a scoring run streams its rows through, and what they hold (``score.pools``).

Two layouts, one per kind of hardware:

* ``fused`` (``auto`` on CPU): one pool whose actors each read their slice of the input
  (``data.slices``), preprocess it and run the model on it. On CPU, preprocessing and the model share
  the same cores; a second pool only adds a process per actor, a torch import per process and a copy
  of every preprocessed batch through the object store.
* ``split`` (``auto`` when the predictor has a GPU): CPU actors read and preprocess, GPU actors predict,
  so the GPU is fed while the CPUs decode.

Either way the input is never read by a separate Ray Data read task: the driver already holds every
footer, so the actors read row slices themselves. A pool starts no more actors than the input can keep
busy (``pool_size``: at least ``MIN_BATCHES_PER_ACTOR`` batches each), so a 300-row partition starts one
actor instead of paying for a start-up that would score nothing. The resource check still counts the
configured sizes: a config that cannot fit the cluster fails on a small input as on a large one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow.parquet as pq
import ray.data

from mmray.config import Config, StorageConfig
from mmray.data import pipeline
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.data.slices import SlicePreprocessor, SliceReader, plan_slices, slice_dataset, slice_rows
from mmray.runtime import READ_TASKS, Demand, actor_device, guard_stalls
from mmray.score.labeled import LabeledPreprocessor

__all__ = ["MIN_BATCHES_PER_ACTOR", "Pools", "ScoringPreprocessor", "plan_pools", "scored_stream"]

# A pool gets one actor per this many batches of input, up to its configured size: starting an actor
# (a process, a torch import, the model) costs seconds, about what one actor scores in 8 batches.
MIN_BATCHES_PER_ACTOR = 8


def pool_size(configured: int, rows: int, batch_size: int) -> int:
    """Actors a pool starts for ``rows`` rows: the configured size, fewer when the input is small."""
    return max(1, min(configured, math.ceil(rows / (MIN_BATCHES_PER_ACTOR * batch_size))))


@dataclasses.dataclass(frozen=True)
class Pools:
    """The layout a run uses and its pools' sizes: ``readers`` actors read and preprocess (and, fused,
    predict too); ``predictors`` is 0 when fused."""

    fused: bool
    readers: int
    predictors: int
    reader_cpus: float
    num_gpus: float  # per predicting actor

    def demands(self, cfg: Config) -> list[Demand]:
        """What the *configured* pools hold at once, for ``check_resources`` (not the row-count sizes:
        a config that cannot fit fails on every input alike)."""
        pre, sc = cfg.data.preprocess, cfg.score
        if self.fused:
            keys = "(data.preprocess.concurrency + score.concurrency) x max(data.preprocess.num_cpus, score.num_cpus)"
            return [Demand(keys, pre.concurrency + sc.concurrency, {"CPU": self.reader_cpus}), READ_TASKS]
        predictor = {"CPU": sc.num_cpus, "GPU": self.num_gpus}
        return [
            pipeline.preprocess_demand(pre),
            Demand("score.concurrency x (score.num_cpus, score.num_gpus)", sc.concurrency, predictor),
            READ_TASKS,  # the output's write tasks
        ]

    def describe(self) -> str:
        if self.fused:
            return f"{self.readers} actor(s) reading, preprocessing and predicting"
        return f"{self.readers} preprocessing + {self.predictors} predicting actor(s)"


def plan_pools(cfg: Config, rows: int, num_gpus: float) -> Pools:
    """The layout (``score.pools``; ``auto``: fused unless the predictor has a GPU) and its sizes."""
    pre, sc = cfg.data.preprocess, cfg.score
    fused = sc.pools == "fused" or (sc.pools == "auto" and num_gpus == 0)
    if fused:
        actors = pool_size(pre.concurrency + sc.concurrency, rows, sc.batch_size)
        return Pools(True, actors, 0, max(pre.num_cpus, sc.num_cpus), num_gpus)
    readers = pool_size(pre.concurrency, rows, pre.batch_size)
    return Pools(False, readers, pool_size(sc.concurrency, rows, sc.batch_size), pre.num_cpus, num_gpus)


class ScoringPreprocessor:
    """What a scoring actor runs on each batch: ``LabeledPreprocessor``, then (given ``predictor``
    arguments, the fused layout) the model (``predictor.Predictor``) on its output."""

    def __init__(
        self, spec: PreprocessSpec, tokenizer_files: dict, label_tasks: tuple, predictor: tuple | None, **fetch
    ):
        self.preprocess = LabeledPreprocessor(spec, tokenizer_files, label_tasks, **fetch)
        self.predict = None
        if predictor is not None:
            from mmray.score.predictor import Predictor  # torch: only where the model runs

            self.predict = Predictor(*predictor)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.preprocess(batch)
        return self.predict(out) if self.predict is not None else out


def scored_stream(
    cfg: Config,
    pools: Pools,
    source: tuple[str, list[str], StorageConfig, dict[str, pq.FileMetaData]],
    spec: PreprocessSpec,
    preprocessor: tuple[dict[str, bytes], tuple[Task, ...]],
    predictor: tuple,
    rows: int,
    only_rows: list[int] | None = None,
) -> ray.data.Dataset:
    """The input's rows through the pools (only those at the sorted input positions ``only_rows``, when
    given: only the slices that hold them are read), as output rows.

    Args:
        source: (input URI, columns to read, storage, path -> footer of each input file).
        preprocessor: (tokenizer files, label tasks) for ``LabeledPreprocessor``.
        predictor: ``Predictor`` arguments but the device: (checkpoint, storage, model id, evaluate,
            row kind).
        rows: rows to score (sizes the slices).
    """
    uri, columns, store, footers = source
    sc, pre = cfg.score, cfg.data.preprocess
    batch_size = sc.batch_size if pools.fused else pre.batch_size
    slices = plan_slices(footers, slice_rows(rows, pools.readers, batch_size), only_rows)
    pieces = guard_stalls(slice_dataset(slices), cfg.data.stall_timeout_s)
    reader = (uri, store, columns, SliceReader.read_schema(footers, columns), only_rows)
    fetch = {"fetch_threads": pre.fetch_threads, "fetch_attempts": pre.fetch_attempts}
    fetch["fetch_timeout_s"] = pre.fetch_timeout_s
    checkpoint, model_store, model_id, evaluate, row_kind = predictor
    # Whichever actor predicts (the fused one, or the split layout's second pool) holds pools.num_gpus.
    predict = (checkpoint, model_store, model_id, actor_device(pools.num_gpus), evaluate, row_kind)
    scorer = (spec, *preprocessor, predict if pools.fused else None)
    first = pieces.map_batches(
        SlicePreprocessor,
        fn_constructor_args=(reader, ScoringPreprocessor, scorer, fetch, batch_size),
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pools.readers),
        num_cpus=pools.reader_cpus,
        num_gpus=pools.num_gpus if pools.fused else 0,
    )
    if pools.fused:
        return first
    from mmray.score.predictor import Predictor

    return pipeline.map_with_actors(
        first, Predictor, predict, sc.batch_size, pools.predictors, sc.num_cpus, pools.num_gpus
    )
