"""Label maps and the tokenizer from the training files: streamed file by file, kept and inherited."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import config_from_dict
from mmray.data.labels import Task
from mmray.data.prepare import build_tasks, prepare_tokenizer, sample_texts
from mmray.data.text import TextNormalizer


@pytest.fixture
def files(tmp_path) -> list[str]:
    """Two files whose label column has different types: all-null in the first, strings in the second."""
    first = pa.table({"text": ["  a CAT ", None, ""], "label": pa.nulls(3), "score": [0.5, 1.0, 2.0]})
    second = pa.table({"text": ["a dog", "two dogs"], "label": ["dog", "cat"], "score": [1.5, 0.0]})
    paths = [str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]
    for table, path in zip([first, second], paths):
        pq.write_table(table, path, row_group_size=2)
    return paths


def test_label_maps_are_sorted_and_kinds_come_from_the_config_or_the_column_type(files, tmp_path):
    cfg = config_from_dict({"data": {"label_column": ["label", "score"]}})
    assert build_tasks(cfg, str(tmp_path), files) == [
        Task("label", "multiclass", ("cat", "dog")),
        Task("score", "regression"),
    ]
    as_classes = config_from_dict({"data": {"label_column": ["score"]}, "model": {"tasks": {"score": "multiclass"}}})
    assert build_tasks(as_classes, str(tmp_path), files) == [Task("score", "multiclass", ("0", "0.5", "1", "1.5", "2"))]


def test_sample_texts_normalises_skips_empty_rows_and_stops_after_the_limit(files, tmp_path):
    normalize = TextNormalizer(config_from_dict({"data": {"text": {"lowercase": True}}}).data.text)
    assert list(sample_texts(str(tmp_path), files, "text", normalize, None)) == ["a cat", "a dog", "two dogs"]
    # Whole batches (row groups of 2 here): the limit is reached within the first batch holding text.
    assert list(sample_texts(str(tmp_path), files, "text", normalize, None, limit=1)) == ["a cat"]


def test_a_trained_tokenizer_is_kept_reused_and_inherited(files, tmp_path):
    cfg = config_from_dict({"data": {"text": {"vocab_size": 50}}})
    run = tmp_path / "run" / "tokenizer"
    trained = prepare_tokenizer(cfg, str(tmp_path), files, str(run))
    assert "tokenizer.json" in trained and (run / "tokenizer.json").read_bytes() == trained["tokenizer.json"]
    # A rerun of the run reuses what it kept, whatever the data says now (its checkpoints index by it).
    (run / "tokenizer.json").write_bytes(b'{"kept": true}')
    assert prepare_tokenizer(cfg, str(tmp_path), files[:1], str(run))["tokenizer.json"] == b'{"kept": true}'
    # A new run continuing a checkpoint takes that checkpoint's tokenizer and keeps its own copy.
    fresh = tmp_path / "next" / "tokenizer"
    assert prepare_tokenizer(cfg, str(tmp_path), files, str(fresh), inherit_from=str(run)) == {
        **trained,
        "tokenizer.json": b'{"kept": true}',
    }
    assert (fresh / "tokenizer.json").read_bytes() == b'{"kept": true}'
