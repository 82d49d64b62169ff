"""The predictor actor: loads a checkpoint once per actor, maps preprocessed batches to output rows.

Rows that failed preprocessing pass through with their error so the job can quarantine them; a row
whose output is not finite is marked with stage ``predict``. No row is dropped here.

What a row's output is, is the one thing ``mmray score`` and ``mmray embed`` do differently, so it is
a ``RowOutput`` (its columns, their Arrow schema, how to fill them from the model's one forward pass),
chosen by name (``ROW_KINDS``); the actor, the pool and the job around it are the same.

``predictions`` (``mmray score``), per task (suffixed ``_<task>`` when the model has several tasks):
``prediction`` (class name, list of class names for multilabel, float for regression), ``confidence``
and ``probabilities`` (aligned with the task's classes, which the manifest records).

``embeddings`` (``mmray embed``): ``fused`` (the vector the heads read) and each modality's pooled
vector (``image``, ``text``: its encoder's output, which the fusion reads), ``list<float32>``; with
alignment (``model.align``) also each modality's unit vector in the joint space (``image_aligned``,
``text_aligned``: what a vector store searches across modalities); a row without a modality has null
for that modality's vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from mmray.checkpoint import open_checkpoint
from mmray.config import StorageConfig
from mmray.data.labels import Task
from mmray.data.schema import ERROR, ERROR_COLUMN, ERROR_STAGE, ID, MODALITIES, MODEL_INPUTS, ROW, task_of_label_key
from mmray.metrics import task_probabilities
from mmray.models.classifier import ModelOutput
from mmray.score.labeled import LABEL_ERROR

__all__ = [
    "ROW_KINDS",
    "Embeddings",
    "Predictions",
    "Predictor",
    "RowOutput",
    "aligned_column",
    "logits_key",
    "model_inputs",
    "output_columns",
    "output_schema",
    "row_output",
]

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


class RowOutput(Protocol):
    """What the predictor writes for each row (besides ``id`` and the bookkeeping columns)."""

    command: str  # the mmray command that writes it, for messages
    non_finite: str  # quarantine reason of a row whose output is not finite

    def schema(self) -> pa.Schema:
        """``id`` + the output columns, as committed (``finalize`` casts every file to it)."""

    def columns(self) -> list[str]:
        """Columns ``fill`` writes (hidden ones too), None for rows it does not fill."""

    def carried(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Input columns passed through unchanged."""

    def fill(self, out: ModelOutput, rows: np.ndarray, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Writes the model's output for ``rows`` (the batch's good rows, in order) into ``columns``;
        returns whether each of those rows' output is finite."""


class Predictions:
    """Per task ``prediction, confidence, probabilities``; with ``evaluate`` also the encoded labels
    (passed through) and the hidden raw logits (``logits_key``), for the metrics."""

    command, non_finite = "score", "non-finite prediction"

    def __init__(self, tasks: Sequence[Task], evaluate: bool = False):
        self.tasks, self.evaluate = tuple(tasks), evaluate

    def schema(self) -> pa.Schema:
        return output_schema(self.tasks)

    def columns(self) -> list[str]:
        hidden = [logits_key(t.name) for t in self.tasks] if self.evaluate else []
        return [*output_columns(self.tasks), *hidden]

    def carried(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.evaluate:
            return {}
        return {k: v for k, v in batch.items() if task_of_label_key(k) is not None or k == LABEL_ERROR}

    def fill(self, out: ModelOutput, rows: np.ndarray, columns: dict[str, np.ndarray]) -> np.ndarray:
        finite = np.ones(len(rows), dtype=bool)
        for t in self.tasks:
            raw = out["logits"][t.name].float().cpu()
            probs = task_probabilities(t, raw).numpy()
            finite &= np.isfinite(probs.reshape(len(rows), -1)).all(1)
            _fill(t, _names(t, len(self.tasks) > 1), probs, rows, columns)
            if self.evaluate:
                _put_rows(columns[logits_key(t.name)], rows, raw.reshape(len(rows), -1).numpy())
        return finite


FUSED = "fused"


def aligned_column(modality: str) -> str:
    """``embed``'s column of a modality's unit vector in the aligned space (``text_aligned``, ...)."""
    return f"{modality}_aligned"


class Embeddings:
    """``fused`` and one pooled vector per modality (``MODALITIES``), null where the row lacks it; with
    ``aligned`` (a checkpoint with ``model.align``) also each modality's unit vector in the joint space."""

    command, non_finite = "embed", "non-finite embedding"

    def __init__(self, aligned: bool = False):
        self.aligned = aligned

    def schema(self) -> pa.Schema:
        vector = pa.list_(pa.float32())
        return pa.schema([pa.field("id", pa.string()), *(pa.field(c, vector) for c in self.columns())])

    def columns(self) -> list[str]:
        return [FUSED, *MODALITIES, *(aligned_column(m) for m in MODALITIES if self.aligned)]

    def carried(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {}

    def fill(self, out: ModelOutput, rows: np.ndarray, columns: dict[str, np.ndarray]) -> np.ndarray:
        fused = out["fused"].float().cpu().numpy()
        finite = np.isfinite(fused).all(1)
        _put_rows(columns[FUSED], rows, fused)
        for m in MODALITIES:
            present = out["masks"][m].cpu().numpy() > 0
            per_modality = {m: out["pooled"][m], **({aligned_column(m): out["aligned"][m]} if self.aligned else {})}
            for column, tensor in per_modality.items():
                vectors = tensor.float().cpu().numpy()
                finite &= np.isfinite(vectors).all(1) | ~present  # a missing modality's vector is not written
                _put_rows(columns[column], rows[present], vectors[present])
        return finite


ROW_KINDS = {"predictions": Predictions, "embeddings": Embeddings}  # row kind -> what writes it


def row_output(row_kind: str, tasks: Sequence[Task], evaluate: bool = False, aligned: bool = False) -> RowOutput:
    """The ``RowOutput`` of ``row_kind`` (a key of ``ROW_KINDS``) for a model with ``tasks`` (and, with
    ``aligned``, an alignment projection: ``embed`` writes its vectors too).

    Raises:
        ValueError: an unknown kind, ``evaluate`` with anything but predictions, or predictions from a
            model without task heads (``mmray pretrain``'s).
    """
    if row_kind not in ROW_KINDS:
        raise ValueError(f"row kind {row_kind!r}: expected one of {sorted(ROW_KINDS)}")
    if row_kind == "predictions" and not tasks:
        raise ValueError(
            "the checkpoint has no task heads (mmray pretrain made it): nothing to predict; embed with it "
            "(mmray embed), or train on it with model.init_from=CHECKPOINT and score that run's checkpoint"
        )
    if row_kind == "predictions":
        return Predictions(tasks, evaluate)
    if evaluate:
        raise ValueError(f"--evaluate needs predictions; {row_kind} have none")
    return Embeddings(aligned)


class Predictor:
    """Callable class for ``map_batches(Predictor, fn_constructor_args=(uri, storage, model_id, device, ...))``.

    Args:
        checkpoint_uri: an mmray checkpoint directory, local or ``s3://`` (each actor fetches it, so
            actors on any node work without shared storage).
        store: endpoint/region for S3.
        expected_model_id: refuse to run when the fetched checkpoint's content hash differs from the
            one the driver recorded (the lineage column must name the model that actually predicted).
        device: ``"cpu"`` or ``"cuda"`` (the job passes ``"cuda"`` when the actor was given GPUs).
        evaluate: pass the encoded label columns through and add the hidden logits columns.
        row_kind: what each row gets, a key of ``ROW_KINDS`` (``row_output``).
    """

    def __init__(
        self,
        checkpoint_uri: str,
        store: StorageConfig,
        expected_model_id: str | None = None,
        device: str = "cpu",
        evaluate: bool = False,
        row_kind: str = "predictions",
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
        self.rows_out = row_output(row_kind, self.tasks, evaluate, aligned=self.info.model.align.weight > 0)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[ID])
        carried = (ID, ERROR, ERROR_COLUMN, ERROR_STAGE, *((ROW,) if ROW in batch else ()))  # ROW: from slices
        out = {k: np.asarray(batch[k]).copy() for k in carried}
        out.update(self.rows_out.carried(batch))
        columns = {c: np.full(n, None, dtype=object) for c in self.rows_out.columns()}
        rows = np.flatnonzero(out[ERROR] == "")
        if len(rows):
            finite = self.rows_out.fill(self.model(model_inputs(batch, rows, self.device)), rows, columns)
            for r in rows[~finite]:
                out[ERROR][r], out[ERROR_COLUMN][r], out[ERROR_STAGE][r] = self.rows_out.non_finite, "", "predict"
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
