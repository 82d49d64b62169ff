"""Losses and exactly-aggregatable metrics, per task.

Metrics are accumulated as sums (confusion matrices, score histograms, error sums), so that workers
all-reduce one flat tensor and the result equals a single-process evaluation: never an average of
per-worker averages. AUROC uses a 200-bin score histogram (exact up to the bin width).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmray.data.labels import Task

__all__ = ["MetricAccumulator", "per_row_loss", "task_probabilities", "weighted_row_loss"]

_BINS = 200
_CAL_BINS = 10  # multiclass calibration: rows and correct rows per top-probability bin (reliability diagram)


def per_row_loss(task: Task, logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Loss of one task per row ``[B]`` (callers weight rows, e.g. by modality presence).

    ``label_smoothing`` (training only; ``train.label_smoothing``) mixes each class target with the
    uniform distribution: multiclass as in ``F.cross_entropy``, binary and multilabel targets move
    from 0/1 to ``eps/2`` / ``1 - eps/2``. Regression ignores it.
    """
    logits = logits.float()
    if task.kind == "multiclass":
        return F.cross_entropy(logits, target.long(), reduction="none", label_smoothing=label_smoothing)
    if task.kind in ("multilabel", "binary"):
        soft = target.float() * (1 - label_smoothing) + label_smoothing / 2
        if task.kind == "binary":
            return F.binary_cross_entropy_with_logits(logits.squeeze(-1), soft, reduction="none")
        return F.binary_cross_entropy_with_logits(logits, soft, reduction="none").mean(-1)
    return F.mse_loss(logits.squeeze(-1), target.float(), reduction="none")


def weighted_row_loss(
    tasks: Sequence[Task],
    logits: dict[str, Tensor],
    targets: dict[str, Tensor],
    loss_weights: dict[str, float],
    label_smoothing: float = 0.0,
) -> Tensor:
    """The fused heads' training loss per row ``[B]``: ``per_row_loss`` weighted by ``model.loss_weights``
    (default 1), summed over tasks. The one definition, so that the ``loss`` of training, ``mmray
    evaluate`` and ``score --evaluate`` means the same; ``MetricAccumulator.update`` takes its ``.sum()``.
    Only training passes ``label_smoothing``: reported losses stay comparable across settings."""
    return sum(
        loss_weights.get(t.name, 1.0) * per_row_loss(t, logits[t.name], targets[t.name], label_smoothing) for t in tasks
    )


def task_probabilities(task: Task, logits: Tensor) -> Tensor:
    """Scores users see: softmax (multiclass), sigmoid (multilabel; binary as [p0, p1]), raw (regression)."""
    logits = logits.float()
    if task.kind == "multiclass":
        return logits.softmax(-1)
    if task.kind == "multilabel":
        return logits.sigmoid()
    if task.kind == "binary":
        p = logits.squeeze(-1).sigmoid()
        return torch.stack([1 - p, p], -1)
    return logits.squeeze(-1)


class MetricAccumulator:
    """Accumulates loss and per-task statistics; ``state()`` is one tensor to all-reduce."""

    def __init__(self, tasks: Sequence[Task]):
        self.tasks = list(tasks)
        self._sizes = [self._size(t) for t in self.tasks]
        self._state = torch.zeros(2 + sum(self._sizes), dtype=torch.float64)  # [loss_sum, rows, ...]

    @staticmethod
    def _size(t: Task) -> int:
        c = len(t.classes)
        if t.kind == "multiclass":
            return c * c + 2 * _CAL_BINS
        if t.kind == "binary":
            return 4 + 2 * _BINS  # tp fp fn tn + pos/neg histograms
        if t.kind == "multilabel":
            return c * (4 + 2 * _BINS)
        return 2  # regression: abs error sum, squared error sum

    def _slices(self):
        start = 2
        for t, n in zip(self.tasks, self._sizes):
            yield t, slice(start, start + n)
            start += n

    @torch.no_grad()
    def update(
        self, logits: dict[str, Tensor], targets: dict[str, Tensor], loss_sum: float, rows: int | None = None
    ) -> None:
        """Adds one batch. ``loss_sum`` is the batch's summed (not mean) loss; ``rows`` its row count
        (default: the logits'; needed without tasks)."""
        rows = rows if rows is not None else next(iter(logits.values())).shape[0]
        self._state[0] += float(loss_sum)
        self._state[1] += rows
        for t, sl in self._slices():
            out, y = logits[t.name].detach().float().cpu(), targets[t.name].detach().cpu()
            self._state[sl] += self._batch_stats(t, out, y)

    @staticmethod
    def _batch_stats(t: Task, out: Tensor, y: Tensor) -> Tensor:
        if t.kind == "multiclass":
            c = len(t.classes)
            pred = out.argmax(-1)
            confusion = torch.bincount(y.long() * c + pred, minlength=c * c).double()
            top = (out.softmax(-1).max(-1).values * _CAL_BINS).long().clamp(0, _CAL_BINS - 1)
            rows = torch.bincount(top, minlength=_CAL_BINS).double()
            correct = torch.bincount(top[pred == y.long()], minlength=_CAL_BINS).double()
            return torch.cat([confusion, rows, correct])
        if t.kind == "regression":
            err = out.squeeze(-1).double() - y.double()
            return torch.stack([err.abs().sum(), (err**2).sum()])
        scores = out.sigmoid()
        if t.kind == "binary":
            scores, y = scores.reshape(-1, 1), y.reshape(-1, 1)
        parts = []
        for j in range(scores.shape[1]):
            s, pos = scores[:, j], y[:, j] > 0.5
            pred = s >= 0.5
            tp, fp = (pred & pos).sum(), (pred & ~pos).sum()
            fn, tn = (~pred & pos).sum(), (~pred & ~pos).sum()
            b = (s * _BINS).long().clamp(0, _BINS - 1)
            parts += [
                torch.stack([tp, fp, fn, tn]).double(),
                torch.bincount(b[pos], minlength=_BINS).double(),
                torch.bincount(b[~pos], minlength=_BINS).double(),
            ]
        return torch.cat(parts)

    def state(self) -> Tensor:
        return self._state.clone()

    def task_stats(self) -> dict[str, dict[str, Tensor]]:
        """The sums behind each task's metrics, for plots (``mmray report``): multiclass ``confusion``
        ``[true, predicted]`` and ``calibration_rows`` / ``calibration_correct`` per top-probability
        bin; binary and multilabel ``counts`` ``[label, (tp, fp, fn, tn)]`` and score histograms
        ``pos_hist`` / ``neg_hist`` ``[label, bin]``; regression ``abs_err`` / ``sq_err`` sums."""
        out = {}
        for t, sl in self._slices():
            st = self._state[sl]
            if t.kind == "multiclass":
                c = len(t.classes)
                out[t.name] = {
                    "confusion": st[: c * c].view(c, c),
                    "calibration_rows": st[c * c : c * c + _CAL_BINS],
                    "calibration_correct": st[c * c + _CAL_BINS :],
                }
            elif t.kind == "regression":
                out[t.name] = {"abs_err": st[0], "sq_err": st[1]}
            else:
                per = st.view(-1, 4 + 2 * _BINS)
                out[t.name] = {"counts": per[:, :4], "pos_hist": per[:, 4 : 4 + _BINS], "neg_hist": per[:, 4 + _BINS :]}
        return out

    def load_state(self, state: Tensor) -> None:
        self._state = state.detach().to(torch.float64).cpu().clone()

    def compute(self) -> dict[str, float]:
        """Metrics by name: ``loss`` plus ``<task>/<metric>``; a single task's also unprefixed."""
        rows = float(self._state[1])
        out: dict[str, float] = {"loss": float(self._state[0]) / max(rows, 1.0), "rows": rows}
        for t, sl in self._slices():
            for k, v in _task_metrics(t, self._state[sl], rows).items():
                out[f"{t.name}/{k}"] = v
                if len(self.tasks) == 1:
                    out[k] = v
        return out


def _task_metrics(t: Task, st: Tensor, rows: float) -> dict[str, float]:
    if t.kind == "multiclass":
        c = len(t.classes)
        cm = st[: c * c].view(c, c)
        total = cm.sum().clamp_min(1)
        tp = cm.diag()
        prec = tp / cm.sum(0).clamp_min(1)
        rec = tp / cm.sum(1).clamp_min(1)
        f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-12), torch.zeros_like(tp))
        present = (cm.sum(1) + cm.sum(0)) > 0
        macro = f1[present].mean() if present.any() else torch.tensor(0.0)
        return {"accuracy": float(tp.sum() / total), "macro_f1": float(macro)}
    if t.kind == "regression":
        n = max(rows, 1.0)
        return {"mae": float(st[0]) / n, "rmse": (float(st[1]) / n) ** 0.5}
    per = st.view(-1, 4 + 2 * _BINS)
    f1s, aucs, correct, total = [], [], 0.0, 0.0
    for row in per:
        tp, fp, fn, tn = row[:4]
        f1s.append(float(2 * tp / (2 * tp + fp + fn)) if (tp + fp + fn) > 0 else 1.0)
        aucs.append(_auroc(row[4 : 4 + _BINS], row[4 + _BINS :]))
        correct += float(tp + tn)
        total += float(tp + fp + fn + tn)
    valid = [a for a in aucs if a == a]
    return {
        "accuracy": correct / max(total, 1.0),
        "macro_f1": sum(f1s) / len(f1s),
        "auroc": sum(valid) / len(valid) if valid else float("nan"),
    }


def _auroc(pos: Tensor, neg: Tensor) -> float:
    """AUROC from score histograms: P(score_pos > score_neg) + 0.5 P(tie within a bin)."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = torch.cumsum(neg, 0) - neg
    wins = (pos * neg_below).sum() + 0.5 * (pos * neg).sum()
    return float(wins / (n_pos * n_neg))
