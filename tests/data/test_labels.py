"""Label maps and target encoding: streamed from the training data, strict when encoding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mmray.data.labels import LabelCollector, LabelError, Task


def collect(*chunks: pa.Array, max_classes: int = 100) -> LabelCollector:
    c = LabelCollector("y", max_classes=max_classes)
    for chunk in chunks:
        c.add(chunk)
    return c


def test_collector_streams_batches_into_one_sorted_label_map():
    chunks = [pa.array(["b", None, "a"]), pa.array(["c", "a"])]
    assert collect(*chunks).task() == collect(pa.concat_arrays(chunks)).task()
    assert collect(*chunks).task() == Task("y", "multiclass", ("a", "b", "c"))


@pytest.mark.parametrize(
    "chunks, task",
    [
        ([pa.array([True, False, None])], Task("y", "binary", ("false", "true"))),
        ([pa.array([0, 1, 1], pa.int64())], Task("y", "binary", ("0", "1"))),
        ([pa.array([3, 1, 2], pa.int32())], Task("y", "multiclass", ("1", "2", "3"))),
        ([pa.array([0.5, 1.5])], Task("y", "regression")),
        ([pa.array([["x"], ["z", "x"], [], None])], Task("y", "multilabel", ("x", "z"))),
        ([pa.nulls(2), pa.array(["p", "q"])], Task("y", "multiclass", ("p", "q"))),  # an all-null first file
    ],
)
def test_collector_infers_the_kind_from_the_arrow_type(chunks, task):
    assert collect(*chunks).task() == task


def test_configured_kind_wins_and_too_many_classes_points_at_regression():
    assert collect(pa.array([1.0, 2.5, 1.0])).task("multiclass") == Task("y", "multiclass", ("1", "2.5"))
    many = collect(pa.array([str(i) for i in range(101)]))
    with pytest.raises(LabelError, match="more than 100 distinct labels; .* model.tasks.y=regression"):
        many.task()
    assert collect(pa.array([float(i) for i in range(500)])).task() == Task("y", "regression")
    with pytest.raises(LabelError, match="no labels"):
        collect(pa.nulls(3, pa.string())).task()
    with pytest.raises(LabelError, match="configured binary but has 3"):
        collect(pa.array(["a", "b", "c"])).task("binary")


def test_encode_is_strict_about_nulls_unknowns_and_kinds():
    mc, ml, reg = Task("y", "multiclass", ("a", "b")), Task("t", "multilabel", ("a", "b")), Task("r", "regression")
    assert mc.encode("b") == 1 and ml.encode(np.array(["b"], dtype=object)).tolist() == [0.0, 1.0]
    assert reg.encode(np.float32(2.5)) == 2.5 and reg.encode("3") == 3.0
    for task, value, message in [
        (mc, None, "null label in column 'y'"),
        (mc, float("nan"), "null label"),
        (mc, "c", "label 'c' in column 'y' is not in the label map"),
        (ml, "a", "is not a list of labels"),
        (ml, ["a", None], "null entry"),
        (reg, "high", "is not a number"),
        (reg, float("inf"), "non-finite label"),
    ]:
        with pytest.raises(LabelError, match=message):
            task.encode(value)


def test_nan_and_inf_are_never_classes_and_quarantine_with_their_value():
    """A string label file mixed with a float one: the float file's NaN and +-inf are no labels."""
    mixed = collect(pa.array(["1", "0", None]), pa.array([1.0, float("nan"), float("inf"), float("-inf"), 0.0]))
    task = mixed.task()
    assert task == Task("y", "multiclass", ("0", "1"))
    assert task.encode(np.float64(1.0)) == 1 and task.encode("0") == 0
    for value, message in [
        (np.float64("inf"), "non-finite label inf in column 'y'"),
        (float("-inf"), "non-finite label -inf in column 'y'"),
        (np.float32("nan"), "null label in column 'y'"),
    ]:
        with pytest.raises(LabelError, match=message):
            task.encode(value)
    tags = collect(pa.array([["a"], ["b"]]), pa.array([[1.5, float("inf")], [float("nan")]])).task()
    assert tags == Task("y", "multilabel", ("1.5", "a", "b"))
    with pytest.raises(LabelError, match="non-finite entry inf in the label list in column 'y'"):
        tags.encode([1.5, float("inf")])
    with pytest.raises(LabelError, match="null entry in the label list in column 'y'"):
        tags.encode(np.array(["a", np.nan], dtype=object))
