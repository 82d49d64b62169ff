"""Batch scoring: Parquet in -> preprocessing pool -> predictor pool -> committed Parquet out.

Every input row ends up either in the output or in ``<output>/_quarantine/``; the counts are
reconciled and recorded in the ``_SUCCESS`` marker (see ``mmray.score.commit``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray.data

from mmray.checkpoint import TOKENIZER_DIR, load_info, model_id
from mmray.config import Config
from mmray.data import pipeline, storage
from mmray.data import schema as S
from mmray.data.preprocess import PreprocessSpec
from mmray.score import commit
from mmray.score.predictor import Predictor, output_columns

__all__ = ["run_scoring"]


def _lineage(batch: dict[str, np.ndarray], columns: list[str], lineage: dict[str, str]) -> dict[str, np.ndarray]:
    """Scored rows only, with the output columns and lineage columns."""
    good = batch[S.ERROR] == ""
    out = {"id": batch[S.ID][good]}
    out.update({c: batch[c][good] for c in columns})
    out.update({k: np.full(int(good.sum()), v, dtype=object) for k, v in lineage.items()})
    return out


def run_scoring(
    cfg: Config,
    checkpoint: str,
    input_uri: str,
    output_uri: str,
    partition: dict[str, str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Scores ``input_uri`` with ``checkpoint`` into ``output_uri`` (optionally a ``key=value`` partition).

    Returns:
        ``{"output", "rows_in", "rows_scored", "rows_quarantined", "model_id", "status"}``;
        status is ``"committed"`` or ``"already scored"`` (an identical committed run exists).
    """
    local_ckpt = storage.copy_dir_from(checkpoint, cfg.storage)
    info = load_info(local_ckpt)
    spec = PreprocessSpec.from_dict(info.preprocess, tasks=info.tasks, with_labels=False, storage=cfg.storage)
    tokenizer_files = {p.name: p.read_bytes() for p in Path(local_ckpt, TOKENIZER_DIR).iterdir() if p.is_file()}
    files = pipeline.input_files(input_uri, spec.input_columns(), cfg.storage)
    mid = model_id(local_ckpt)
    target = commit.Target(output_uri, partition or {}, cfg.storage)
    identity = commit.run_identity(input_uri, files, mid, cfg, target)
    if not overwrite and commit.is_committed(target, identity):
        return {"output": target.uri, "status": "already scored", "model_id": mid, **commit.committed_counts(target)}

    run_id = uuid.uuid4().hex[:12]
    scored_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    sc = cfg.score
    predicted = pipeline.preprocess(
        pipeline.read_input(input_uri, files, cfg.storage, list(spec.input_columns())), spec, tokenizer_files,
        cfg.data.preprocess,
    ).map_batches(
        Predictor,
        fn_constructor_args=(local_ckpt,),
        batch_size=sc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=sc.concurrency),
        num_cpus=sc.num_cpus,
        num_gpus=sc.num_gpus,
    ).materialize()
    rows_in = predicted.count()
    quarantine = pipeline.quarantine_table(predicted)
    columns = output_columns(info.tasks)
    lineage = {"model_id": mid, "scored_at": scored_at, "run_id": run_id}
    scored = predicted.map_batches(
        _lineage, fn_args=(columns, lineage), batch_format="numpy", batch_size=None
    ).materialize()
    counts = {"rows_in": rows_in, "rows_scored": scored.count(), "rows_quarantined": quarantine.num_rows}
    if counts["rows_scored"] + counts["rows_quarantined"] != rows_in:
        raise AssertionError(f"scoring row counts do not reconcile: {counts}")  # never lose a row
    commit.commit(target, run_id, scored, quarantine, identity, counts, sc.rows_per_file)
    pipeline.check_bad_fraction(rows_in, quarantine.num_rows, cfg.data.max_bad_fraction, target.quarantine_uri)
    return {"output": target.uri, "status": "committed", "model_id": mid, "run_id": run_id, **counts}
