"""Tasks and label maps: one head per label column, built from the training data, stored in checkpoints.

Kinds: ``multiclass`` (one label string/int per row), ``multilabel`` (a list of label strings per row),
``binary`` (bool, or exactly two classes), ``regression`` (float).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["LabelCollector", "LabelError", "Task", "infer_kind", "label_key", "pair_class", "task_from_dict"]

MAX_CLASSES = 100_000  # a label column with more distinct values is almost surely not categorical


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
        """One raw label -> the training target (index, multi-hot vector or float).

        Raises:
            LabelError: null, unknown to the label map, or not of this task's kind.
        """
        self._check_present(value, "label", "")
        if self.kind == "regression":
            try:
                target = float(value)
            except (TypeError, ValueError):
                raise LabelError(f"label {value!r} in column '{self.name}' is not a number") from None
            if not math.isfinite(target):
                raise LabelError(f"non-finite label {target} in column '{self.name}'")
            return target
        if self.kind == "multilabel":
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise LabelError(f"label {value!r} in column '{self.name}' is not a list of labels")
            vec = np.zeros(len(self.classes), dtype=np.float32)
            for v in value:
                self._check_present(v, "entry", " in the label list")
                vec[self._index(v)] = 1.0
            return vec
        idx = self._index(value)
        return float(idx) if self.kind == "binary" else idx

    def _check_present(self, value: Any, noun: str, where: str) -> None:
        """Null and NaN are missing labels (an integer column with nulls reaches numpy batches as
        float64 NaN); +-inf is no label either, and never a class (``label_key``)."""
        if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
            raise LabelError(f"null {noun}{where} in column '{self.name}'")
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            raise LabelError(f"non-finite {noun} {float(value)}{where} in column '{self.name}'")

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


def label_key(v: Any) -> str | None:
    """The label-map key of one raw label value; None for no label: null, NaN or +-inf (a float label
    file mixed with a string one must not add the classes 'nan' or 'inf')."""
    if v is None or (isinstance(v, (float, np.floating)) and not math.isfinite(v)):
        return None
    return _label_str(v)


def _label_str(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))  # an integer label column with nulls reaches numpy batches as float64
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


def task_from_distinct(name: str, kind: str, distinct: set[str]) -> Task:
    """A task from the distinct label strings of its column (list elements for multilabel)."""
    if kind == "regression":
        return Task(name, kind)
    if kind == "binary" and len(distinct) > 2:
        raise LabelError(f"column '{name}' is configured binary but has {len(distinct)} distinct labels")
    if not distinct:
        raise LabelError(f"column '{name}' has no labels in the training data")
    classes = tuple(sorted(distinct))
    if kind == "binary" and set(classes) <= {"true", "false"}:
        classes = ("false", "true")
    return Task(name, kind, classes)


class LabelCollector:
    """Streams one label column batch by batch, keeping only its distinct values (bounded memory).

    Usage: ``c = LabelCollector("label"); c.add(batch.column("label")) ...; task = c.task(kind)``.
    """

    def __init__(self, name: str, max_classes: int = MAX_CLASSES):
        self.name, self.max_classes = name, max_classes
        self.type: pa.DataType | None = None
        self.distinct: set[str] = set()
        self.overflow = False

    def add(self, column: pa.Array | pa.ChunkedArray) -> None:
        if self.type is None or pa.types.is_null(self.type):  # an all-null first file says nothing
            self.type = column.type
        if self.overflow:
            return  # only a regression task can use this column; task() says so otherwise
        values = column
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            values = pc.list_flatten(column)
        for v in pc.unique(values.drop_null()).to_pylist():
            if (key := label_key(v)) is not None:
                self.distinct.add(key)
        if len(self.distinct) > self.max_classes:
            self.overflow, self.distinct = True, set()

    def task(self, kind: str | None = None) -> Task:
        """The task; ``kind`` from ``model.tasks`` or, when None, inferred from the column's type.

        Raises:
            LabelError: no labels, too many distinct labels, or a binary column with more than two.
        """
        arrow_type = self.type if self.type is not None else pa.null()
        kind = kind or infer_kind(arrow_type, len(self.distinct))
        if kind != "regression" and self.overflow:
            raise LabelError(
                f"column '{self.name}' has more than {self.max_classes} distinct labels; "
                f"for a numeric target set model.tasks.{self.name}=regression"
            )
        return task_from_distinct(self.name, kind, self.distinct)


def pair_class(spec: str, tasks: Sequence[Task]) -> tuple[Task, int] | None:
    """``model.align.pairs`` against the tasks' label maps: None for "all" (every row is a true
    caption-image pair), else the task and class index of "TASK=VALUE". The one reading of the key, for
    training's alignment loss and ``mmray ablate --retrieval``.

    Raises:
        ValueError: an unknown task or label (a regression task has none), naming the key.
    """
    if spec == "all":
        return None
    name, label = (part.strip() for part in spec.split("=", 1))
    task = next((t for t in tasks if t.name == name), None)
    if task is None:
        raise ValueError(f"model.align.pairs: no task {name!r} (tasks: {[t.name for t in tasks]})")
    if label not in task.classes:
        raise ValueError(f"model.align.pairs: {label!r} is not a label of {name!r} (labels: {list(task.classes)})")
    return task, task.classes.index(label)
