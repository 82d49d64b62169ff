"""Modality ablation (``mmray ablate``): metrics of a checkpoint on labelled Parquet, for the full
model AND with each modality masked, so a user sees how much each modality contributes.

Variants (each with training's metrics: ``loss``, ``accuracy``, ``macro_f1``, ``auroc``, ``mae`` ...):
    full           the model as trained
    text_masked    every row's text marked missing (the fusion's "missing text" path)
    image_masked   every row's image marked missing
    unimodal.<m>   the auxiliary unimodal head of modality m on the rows that have m (when the model
                   has auxiliary heads): how well that encoder alone learned the task

Encoders run once per batch; only fusion and heads re-run per variant. The masked variants are
most meaningful for models trained with ``model.modality_dropout > 0`` (they then know how to
predict from one modality). Metric sums (``MetricAccumulator`` state) are computed per batch in an
actor pool and added on the driver, so the result equals a single-process evaluation. It reads the
checkpoint, preprocesses and quarantines exactly as scoring does (``open_checkpoint``, the same pools).

Example:
    mmray ablate --checkpoint runs/<name>/checkpoint_... --input work/data/test
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mmray.checkpoint import open_checkpoint
from mmray.config import Config, ModelConfig, StorageConfig
from mmray.data import pipeline, storage
from mmray.data.labels import Task
from mmray.data.schema import ERROR, IMAGE, MODALITIES, QUARANTINE_SCHEMA, TEXT, label_key
from mmray.metrics import MetricAccumulator, weighted_row_loss
from mmray.runtime import actor_device
from mmray.score.predictor import model_inputs

__all__ = ["AblationEvaluator", "VARIANTS", "accumulate", "run_ablation", "variant_masks", "variant_names"]

VARIANTS = ("full", "text_masked", "image_masked")
_MASKED = {"text_masked": TEXT, "image_masked": IMAGE}
_MAX_QUARANTINE_SAMPLES = 20


def variant_masks(masks: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """The modality masks of an ablation variant: the named modality marked missing on every row."""
    if variant == "full":
        return masks
    return {m: torch.zeros_like(v) if m == _MASKED[variant] else v for m, v in masks.items()}


class AblationEvaluator:
    """Callable class for ``map_batches``: one summary row per batch (metric state of every variant).

    Args:
        checkpoint_uri: local or ``s3://`` checkpoint; each actor fetches its own copy.
        store: S3 endpoint/region.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, checkpoint_uri: str, store: StorageConfig, device: str = "cpu"):
        self.device = torch.device(device)
        with open_checkpoint(checkpoint_uri, store) as checkpoint:
            self.info, self.model = checkpoint.info, checkpoint.load_model(device)
        self.tasks = list(self.info.tasks)
        self.names = variant_names(self.info.model)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.flatnonzero(batch[ERROR] == "")
        states = [MetricAccumulator(self.tasks) for _ in self.names]
        bad = pipeline.quarantine_records(batch).to_pylist()
        if len(good):
            self._update(batch, good, states)
        return {
            "state": np.stack([s.state().numpy() for s in states])[None],  # [1, variants, state]
            "quarantine": np.array([json.dumps(bad)], dtype=object),
        }

    def _update(self, batch: dict[str, np.ndarray], rows: np.ndarray, states: list[MetricAccumulator]) -> None:
        inputs = model_inputs(batch, rows, self.device)
        labels = {t.name: np.ascontiguousarray(batch[label_key(t.name)][rows]) for t in self.tasks}
        targets = {name: torch.from_numpy(v).to(self.device) for name, v in labels.items()}
        features = self.model.encode(inputs)
        masks = self.model.masks(inputs)
        aux = self.model.aux_logits(features)
        for name, acc in zip(self.names, states):
            if name in VARIANTS:
                logits, rows_targets = self.model.predict(features, variant_masks(masks, name)), targets
            else:
                modality = name.split(".", 1)[1]  # unimodal.<modality>: that modality's rows only
                present = masks[modality] > 0
                logits = {t: v[present] for t, v in aux[modality].items()}
                rows_targets = {t: v[present] for t, v in targets.items()}
            loss = weighted_row_loss(self.tasks, logits, rows_targets, self.info.model.loss_weights)
            acc.update(logits, rows_targets, float(loss.sum()))


def variant_names(model_cfg: ModelConfig) -> list[str]:
    """The reported variants; ``unimodal.<m>`` when the model has auxiliary heads (builder's rule)."""
    aux = sorted(MODALITIES) if model_cfg.aux_loss_weight > 0 else []
    return [*VARIANTS, *(f"unimodal.{m}" for m in aux)]


def run_ablation(cfg: Config, checkpoint: str, input_uri: str, with_stats: bool = False) -> dict[str, Any]:
    """Every variant's metrics of ``checkpoint`` on the labelled Parquet at ``input_uri``; Ray must be
    initialised.

    Args:
        with_stats: also return the full model's ``MetricAccumulator.task_stats()`` (confusion
            matrices, calibration bins, score histograms) as lists, under ``"stats"``.

    Returns:
        ``{"checkpoint", "input", "rows_in", "rows_evaluated", "rows_quarantined", "metrics":
        {variant: {metric: value}}, "quarantine": [up to 20 records], "quarantine_reasons"}``.
    """
    with open_checkpoint(checkpoint, cfg.storage) as opened:
        info, tokenizer_files = opened.info, opened.tokenizer_files()
    names = variant_names(info.model)
    spec = info.preprocess_spec(with_labels=True, storage=cfg.storage, image_uri_roots=cfg.data.image_uri_roots)
    files = pipeline.input_files(input_uri, spec.input_columns(), cfg.storage)
    sc = cfg.score
    source = pipeline.read_input(input_uri, files, cfg.storage, list(spec.input_columns()))
    preprocessed = pipeline.preprocess(source, spec, tokenizer_files, cfg.data.preprocess)
    args = (checkpoint, cfg.storage, actor_device(sc.num_gpus))
    summaries = pipeline.map_with_actors(
        preprocessed, AblationEvaluator, args, sc.batch_size, sc.concurrency, sc.num_cpus, sc.num_gpus
    )
    accumulators, quarantine = accumulate(names, info.tasks, summaries.iter_rows())
    reasons = pipeline.ranked_reasons(pa.Table.from_pylist(quarantine, QUARANTINE_SCHEMA))
    metrics = {name: acc.compute() for name, acc in accumulators.items()}
    evaluated = int(metrics["full"]["rows"])
    full = accumulators["full"].task_stats()
    stats = {"stats": {t: {k: v.tolist() for k, v in st.items()} for t, st in full.items()}}
    return {
        "checkpoint": storage.redact(checkpoint),
        "input": storage.redact(input_uri),
        "rows_in": evaluated + len(quarantine),
        "rows_evaluated": evaluated,
        "rows_quarantined": len(quarantine),
        "metrics": metrics,
        "quarantine": quarantine[:_MAX_QUARANTINE_SAMPLES],
        "quarantine_reasons": {f"{column}: {reason}": rows for (column, reason), rows in reasons},
        **(stats if with_stats else {}),
    }


def accumulate(
    names: list[str], tasks: Sequence[Task], summaries: Iterable[dict]
) -> tuple[dict[str, MetricAccumulator], list[dict]]:
    """Adds the per-batch summary rows of ``AblationEvaluator``.

    Returns:
        (variant -> its accumulator, holding the sums of every batch; every quarantine record).
    """
    total, quarantine = None, []
    for row in summaries:
        state = np.array(row["state"], dtype=np.float64)  # a copy: Ray hands read-only arrays, torch warns on them
        state = torch.as_tensor(state).reshape(len(names), -1)
        total = state if total is None else total + state
        quarantine += json.loads(row["quarantine"])
    accumulators = {}
    for i, name in enumerate(names):
        accumulators[name] = acc = MetricAccumulator(tasks)
        if total is not None:
            acc.load_state(total[i])
    return accumulators, quarantine
