"""``mmray score --evaluate``: labels ride along with scoring; metrics are computed as in training.

Labels are encoded in the preprocessing pool with the checkpoint's label maps. Unlike training, a
missing or unknown label does not quarantine the row: it is scored all the same and only left out of
the metrics (``_label_error`` says why), so ``--evaluate`` never changes what gets scored.

The predictor adds each task's logits as a hidden column; the driver folds them into a
``MetricAccumulator`` with the training loss (``metrics.weighted_row_loss``, per ``model.loss_weights``),
so the numbers mean exactly what the training metrics mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mmray.data import schema as S
from mmray.data.labels import LabelError, Task
from mmray.data.preprocess import PreprocessSpec, Preprocessor
from mmray.metrics import MetricAccumulator, weighted_row_loss
from mmray.score.predictor import LABEL_ERROR, logits_key

__all__ = ["Evaluation", "LabeledPreprocessor"]


class LabeledPreprocessor:
    """The data layer's ``Preprocessor`` plus, for ``label_tasks``, each label encoded as in training.

    With no label tasks it is exactly ``Preprocessor``: scoring has one code path with or without
    ``--evaluate``. ``preprocessor_kwargs`` go to ``Preprocessor`` (fetch threads, attempts).
    """

    def __init__(self, spec: PreprocessSpec, tokenizer_files: dict[str, bytes], label_tasks: Sequence[Task] = (),
                 **preprocessor_kwargs: Any):  # fmt: skip
        self.preprocess = Preprocessor(spec, tokenizer_files, **preprocessor_kwargs)
        self.tasks = tuple(label_tasks)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.preprocess(batch)
        if not self.tasks:
            return out
        n = len(out[S.ID])
        errors = np.full(n, "", dtype=object)
        for t in self.tasks:
            column = np.empty(n, dtype=object)
            for i, raw in enumerate(batch[t.name]):
                try:
                    value = t.encode(raw)  # numpy scalars/arrays from Ray encode like Python values
                except LabelError as e:
                    value = t.empty_target()  # keeps the column typed; the row is excluded by LABEL_ERROR
                    errors[i] = errors[i] or str(e)
                column[i] = value.tolist() if isinstance(value, np.ndarray) else value
            out[S.label_key(t.name)] = column
        out[LABEL_ERROR] = errors
        return out


class Evaluation:
    """Driver-side metrics over scored rows that carry a usable label."""

    def __init__(self, tasks: Sequence[Task], loss_weights: dict[str, float]):
        self.tasks = list(tasks)
        self.loss_weights = dict(loss_weights)
        self.acc = MetricAccumulator(self.tasks)
        self.rows_unlabeled = 0

    def update(self, scored: pa.Table) -> None:
        """Adds scored rows (no preprocessing/prediction errors) with their hidden label/logits columns."""
        usable = pc.fill_null(pc.equal(scored[LABEL_ERROR], ""), False)
        rows = scored.filter(usable)
        self.rows_unlabeled += scored.num_rows - rows.num_rows
        if not rows.num_rows:
            return
        logits, targets = {}, {}
        for t in self.tasks:
            logits[t.name] = torch.tensor(rows[logits_key(t.name)].to_pylist(), dtype=torch.float32)
            target = rows[S.label_key(t.name)].to_pylist()
            targets[t.name] = torch.tensor(target, dtype=torch.int64 if t.kind == "multiclass" else torch.float32)
        loss = weighted_row_loss(self.tasks, logits, targets, self.loss_weights)
        self.acc.update(logits, targets, float(loss.sum()))

    def result(self) -> dict[str, float]:
        """Training's metric names (``loss``, ``accuracy``, ``<task>/<metric>`` ...) plus row counts."""
        metrics = self.acc.compute()
        metrics["rows_unlabeled"] = float(self.rows_unlabeled)
        return metrics
