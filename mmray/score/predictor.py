"""The predictor actor: loads a checkpoint once per actor, maps preprocessed batches to predictions.

Rows that failed preprocessing pass through with their error so the job can quarantine them; a row
whose prediction is not finite is marked with stage ``predict``. No row is dropped here.
"""

from __future__ import annotations

import numpy as np
import torch

from mmray.checkpoint import load_info, load_model
from mmray.data import schema as S
from mmray.data.labels import Task
from mmray.metrics import task_probabilities

__all__ = ["Predictor", "output_columns"]


def output_columns(tasks: tuple[Task, ...] | list[Task]) -> list[str]:
    """Prediction columns: ``prediction, confidence, probabilities`` (suffixed ``_<task>`` if multi-task)."""
    return [c for t in tasks for c in _names(t, len(tasks) > 1).values()]


def _names(task: Task, multi: bool) -> dict[str, str]:
    suffix = f"_{task.name}" if multi else ""
    if task.kind == "regression":
        return {"prediction": f"prediction{suffix}"}
    names = ("prediction", "confidence", "probabilities")
    return {n: f"{n}{suffix}" for n in names}


class Predictor:
    """Callable class for ``map_batches(Predictor, fn_constructor_args=(checkpoint_dir, device))``.

    Args:
        checkpoint_dir: a local mmray checkpoint directory.
        device: "cuda", "cpu" or None (CUDA when this actor was given a GPU).
        keep_labels: pass the encoded label columns through (for ``--evaluate``).
    """

    def __init__(self, checkpoint_dir: str, device: str | None = None, keep_labels: bool = False):
        self.info = load_info(checkpoint_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(checkpoint_dir, self.info).to(self.device)
        self.keep_labels = keep_labels

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[S.ID])
        good = batch[S.ERROR] == ""
        out = {S.ID: batch[S.ID], S.ERROR: batch[S.ERROR].copy(), S.ERROR_COLUMN: batch[S.ERROR_COLUMN].copy(),
               S.ERROR_STAGE: batch[S.ERROR_STAGE].copy()}  # fmt: skip
        if self.keep_labels:
            out.update({k: v for k, v in batch.items() if S.task_of_label_key(k) is not None})
        multi = len(self.info.tasks) > 1
        columns = {t.name: {c: np.full(n, None, dtype=object) for c in _names(t, multi).values()} for t in self.info.tasks}
        if good.any():
            inputs = {k: torch.from_numpy(np.ascontiguousarray(batch[k][good])).to(self.device) for k in self._input_keys()}
            logits = self.model(inputs)["logits"]
            rows = np.flatnonzero(good)
            finite = np.ones(len(rows), dtype=bool)
            for t in self.info.tasks:
                probs = task_probabilities(t, logits[t.name]).cpu().numpy()
                finite &= np.isfinite(probs.reshape(len(rows), -1)).all(1)
                self._fill(t, _names(t, multi), probs, rows, columns[t.name])
            for r in rows[~finite]:
                out[S.ERROR][r], out[S.ERROR_COLUMN][r], out[S.ERROR_STAGE][r] = "non-finite prediction", "", "predict"
        for cols in columns.values():
            out.update(cols)
        return out

    @staticmethod
    def _input_keys() -> list[str]:
        return [S.INPUT_IDS, S.ATTENTION_MASK, S.PIXELS, S.mask_key(S.IMAGE), S.mask_key(S.TEXT)]

    @staticmethod
    def _fill(task: Task, names: dict[str, str], probs: np.ndarray, rows: np.ndarray, cols: dict) -> None:
        for j, r in enumerate(rows):
            p = probs[j]
            if task.kind == "regression":
                cols[names["prediction"]][r] = float(p)
                continue
            if task.kind == "multilabel":
                cols[names["prediction"]][r] = [c for c, q in zip(task.classes, p) if q >= 0.5]
                cols[names["confidence"]][r] = float(np.maximum(p, 1 - p).mean())
            else:
                k = int(p.argmax())
                cols[names["prediction"]][r] = task.classes[k]
                cols[names["confidence"]][r] = float(p[k])
            cols[names["probabilities"]][r] = [float(x) for x in p]
