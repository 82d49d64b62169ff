"""Tasks and label maps: one head per label column, built from the training data, stored in checkpoints.

Kinds: ``multiclass`` (one label string/int per row), ``multilabel`` (a list of label strings per row),
``binary`` (bool, or exactly two classes), ``regression`` (float).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["LabelError", "Task", "build_task", "infer_kind", "task_from_dict"]


class LabelError(ValueError):
    """A label value is null, unknown to the label map, or of the wrong kind."""


@dataclass(frozen=True)
class Task:
    name: str  # the label column
    kind: str  # multiclass | multilabel | binary | regression
    classes: tuple[str, ...] = ()  # label map, in output order; empty for regression

    @property
    def out_dim(self) -> int:
        return 1 if self.kind in ("binary", "regression") else len(self.classes)

    def encode(self, value: Any) -> np.ndarray | int | float:
        """One raw label -> the training target (index, multi-hot vector or float)."""
        if value is None or (isinstance(value, float) and np.isnan(value)):
            raise LabelError(f"null label in column '{self.name}'")
        if self.kind == "regression":
            return float(value)
        if self.kind == "multilabel":
            vec = np.zeros(len(self.classes), dtype=np.float32)
            for v in value:
                vec[self._index(v)] = 1.0
            return vec
        idx = self._index(value)
        return float(idx) if self.kind == "binary" else idx

    def _index(self, value: Any) -> int:
        key = _label_str(value)
        try:
            return self.classes.index(key)
        except ValueError:
            raise LabelError(f"label {key!r} in column '{self.name}' is not in the label map") from None

    def empty_target(self) -> np.ndarray | int | float:
        return np.zeros(len(self.classes), dtype=np.float32) if self.kind == "multilabel" else 0

    def to_dict(self) -> dict:
        return asdict(self)


def task_from_dict(d: dict) -> Task:
    return Task(name=d["name"], kind=d["kind"], classes=tuple(d.get("classes", ())))


def _label_str(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    return str(v)


def infer_kind(arrow_type: pa.DataType, n_distinct: int) -> str:
    """Task kind from the label column's Arrow type (configurable via ``model.tasks``)."""
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return "multilabel"
    if pa.types.is_boolean(arrow_type):
        return "binary"
    if pa.types.is_floating(arrow_type):
        return "regression"
    return "binary" if n_distinct == 2 and pa.types.is_integer(arrow_type) else "multiclass"


def build_task(name: str, kind: str, values: list[Any]) -> Task:
    """Builds a task's label map (sorted distinct values) from the training column's values."""
    if kind == "regression":
        return Task(name, kind)
    if kind == "multilabel":
        distinct = {_label_str(x) for v in values if v is not None for x in v}
    else:
        distinct = {_label_str(v) for v in values if v is not None}
    if kind == "binary" and len(distinct) > 2:
        raise LabelError(f"column '{name}' is configured binary but has {len(distinct)} distinct labels")
    if not distinct:
        raise LabelError(f"column '{name}' has no labels in the training data")
    classes = tuple(sorted(distinct))
    if kind == "binary" and set(classes) <= {"true", "false"}:
        classes = ("false", "true")
    return Task(name, kind, classes)
