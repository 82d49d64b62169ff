"""The predictor actor: loads a checkpoint once per actor, maps preprocessed batches to predictions.

Rows that failed preprocessing pass through with their error so the job can quarantine them; a row
whose prediction is not finite is marked with stage ``predict``. No row is dropped here.

Output columns per task (suffixed ``_<task>`` when the model has several tasks): ``prediction``
(class name, list of class names for multilabel, float for regression), ``confidence`` and
``probabilities`` (aligned with the task's classes, which the manifest records).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from mmray.checkpoint import open_checkpoint
from mmray.config import StorageConfig
from mmray.data.labels import Task
from mmray.data.schema import ERROR, ERROR_COLUMN, ERROR_STAGE, ID, MODEL_INPUTS, task_of_label_key
from mmray.metrics import task_probabilities
from mmray.score.labeled import LABEL_ERROR

__all__ = ["Predictor", "logits_key", "model_inputs", "output_columns", "output_schema"]

_LOGITS_PREFIX = "_logits__"


def logits_key(task: str) -> str:
    """Hidden column with a row's raw logits (``--evaluate`` only; never in the committed output)."""
    return f"{_LOGITS_PREFIX}{task}"


def model_inputs(batch: dict[str, np.ndarray], rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """What the model reads (``MODEL_INPUTS`` present in the batch) of ``rows``, as tensors on
    ``device``: every inference actor (prediction, ablation) hands the model exactly this."""
    return {k: torch.from_numpy(np.ascontiguousarray(batch[k][rows])).to(device) for k in MODEL_INPUTS if k in batch}


def _names(task: Task, multi: bool) -> dict[str, str]:
    suffix = f"_{task.name}" if multi else ""
    if task.kind == "regression":
        return {"prediction": f"prediction{suffix}"}
    return {n: f"{n}{suffix}" for n in ("prediction", "confidence", "probabilities")}


def output_columns(tasks: Sequence[Task]) -> list[str]:
    """Prediction columns: ``prediction, confidence, probabilities`` (suffixed ``_<task>`` if multi-task)."""
    return [c for t in tasks for c in _names(t, len(tasks) > 1).values()]


def output_schema(tasks: Sequence[Task]) -> pa.Schema:
    """Arrow schema of the scored rows (``id`` + prediction columns), the same in every output file."""
    fields = [pa.field("id", pa.string())]
    for t in tasks:
        names = _names(t, len(tasks) > 1)
        if t.kind == "regression":
            fields.append(pa.field(names["prediction"], pa.float64()))
            continue
        pred = pa.list_(pa.string()) if t.kind == "multilabel" else pa.string()
        fields += [
            pa.field(names["prediction"], pred),
            pa.field(names["confidence"], pa.float64()),
            pa.field(names["probabilities"], pa.list_(pa.float64())),
        ]
    return pa.schema(fields)


class Predictor:
    """Callable class for ``map_batches(Predictor, fn_constructor_args=(uri, storage, model_id, device))``.

    Args:
        checkpoint_uri: an mmray checkpoint directory, local or ``s3://`` (each actor fetches it, so
            actors on any node work without shared storage).
        store: endpoint/region for S3.
        expected_model_id: refuse to run when the fetched checkpoint's content hash differs from the
            one the driver recorded (the lineage column must name the model that actually predicted).
        device: ``"cpu"`` or ``"cuda"`` (the job passes ``"cuda"`` when the actor was given GPUs).
        evaluate: pass the encoded label columns through and add the hidden logits columns.
    """

    def __init__(
        self,
        checkpoint_uri: str,
        store: StorageConfig,
        expected_model_id: str | None = None,
        device: str = "cpu",
        evaluate: bool = False,
    ):
        self.device = torch.device(device)
        with open_checkpoint(checkpoint_uri, store) as checkpoint:
            found = checkpoint.model_id()
            if expected_model_id is not None and found != expected_model_id:
                raise RuntimeError(
                    f"checkpoint {checkpoint_uri} changed during scoring: model_id {found}, "
                    f"expected {expected_model_id}"
                )
            self.info, self.model = checkpoint.info, checkpoint.load_model(device)
        self.tasks = self.info.tasks
        self.evaluate = evaluate

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[ID])
        out = {k: np.asarray(batch[k]).copy() for k in (ID, ERROR, ERROR_COLUMN, ERROR_STAGE)}
        if self.evaluate:
            out.update({k: v for k, v in batch.items() if task_of_label_key(k) is not None or k == LABEL_ERROR})
        multi = len(self.tasks) > 1
        columns = {c: np.full(n, None, dtype=object) for c in output_columns(self.tasks)}
        if self.evaluate:
            columns.update({logits_key(t.name): np.full(n, None, dtype=object) for t in self.tasks})
        rows = np.flatnonzero(out[ERROR] == "")
        if len(rows):
            logits = self.model(model_inputs(batch, rows, self.device))["logits"]
            finite = np.ones(len(rows), dtype=bool)
            for t in self.tasks:
                raw = logits[t.name].float().cpu()
                probs = task_probabilities(t, raw).numpy()
                finite &= np.isfinite(probs.reshape(len(rows), -1)).all(1)
                _fill(t, _names(t, multi), probs, rows, columns)
                if self.evaluate:
                    _put_rows(columns[logits_key(t.name)], rows, raw.reshape(len(rows), -1).numpy())
            for r in rows[~finite]:
                out[ERROR][r], out[ERROR_COLUMN][r], out[ERROR_STAGE][r] = "non-finite prediction", "", "predict"
                for col in columns.values():
                    col[r] = None
        out.update(columns)
        return out


def _put_rows(column: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """One Python list per row (numpy would broadcast a 2-D assignment into an object array)."""
    for j, r in enumerate(rows):
        column[r] = values[j].tolist()


def _fill(task: Task, names: dict[str, str], probs: np.ndarray, rows: np.ndarray, cols: dict) -> None:
    if task.kind == "regression":
        cols[names["prediction"]][rows] = probs.astype(np.float64).reshape(-1)
        return
    if task.kind == "multilabel":
        preds = [[c for c, q in zip(task.classes, p) if q >= 0.5] for p in probs]
        conf = np.maximum(probs, 1 - probs).mean(1)
    else:
        k = probs.argmax(1)
        preds = [task.classes[i] for i in k]
        conf = probs[np.arange(len(k)), k]
    for j, r in enumerate(rows):
        cols[names["prediction"]][r] = preds[j]
    cols[names["confidence"]][rows] = conf.astype(np.float64)
    _put_rows(cols[names["probabilities"]], rows, probs.astype(np.float64))
