"""Label metrics for ``mmray score --evaluate``: labels ride along with scoring; metrics are computed
as in training, over the scored rows that carry a usable label.

Labels are encoded in the preprocessing pool (``labeled.LabeledPreprocessor``) with the checkpoint's
label maps; a row whose label cannot be used is still scored, only left out of the metrics.

The predictor adds each task's logits as a hidden column; the driver folds them into a
``MetricAccumulator`` with the training loss (``metrics.weighted_row_loss``, per ``model.loss_weights``),
so the numbers mean exactly what the training metrics mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import torch

from mmray.data.labels import Task
from mmray.data.schema import label_key
from mmray.metrics import MetricAccumulator, weighted_row_loss
from mmray.score.labeled import LABEL_ERROR
from mmray.score.predictor import logits_key

__all__ = ["LabelMetrics"]


class LabelMetrics:
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
            target = rows[label_key(t.name)].to_pylist()
            targets[t.name] = torch.tensor(target, dtype=torch.int64 if t.kind == "multiclass" else torch.float32)
        loss = weighted_row_loss(self.tasks, logits, targets, self.loss_weights)
        self.acc.update(logits, targets, float(loss.sum()))

    def result(self) -> dict[str, float]:
        """Training's metric names (``loss``, ``accuracy``, ``<task>/<metric>`` ...) plus row counts."""
        metrics = self.acc.compute()
        metrics["rows_unlabeled"] = float(self.rows_unlabeled)
        return metrics
