"""Input slices: every row of every row group once, in order, read back by the actor-side reader with
its position in the input; a retry's slices are only those that hold its rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import StorageConfig
from mmray.data.schema import ROW
from mmray.data.slices import Slice, SlicePreprocessor, SliceReader, plan_slices, slice_rows


def _write(path, ids, row_group_size, id_type=None):
    table = pa.table({"id": pa.array(ids).cast(id_type or pa.string()), "text": [f"t{i}" for i in ids]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def two_files(tmp_path) -> dict[str, pq.FileMetaData]:
    a = _write(tmp_path / "a.parquet", list(range(0, 10)), row_group_size=4)  # groups of 4, 4, 2
    b = _write(tmp_path / "b.parquet", list(range(10, 13)), row_group_size=100)
    return {p: pq.read_metadata(p) for p in (a, b)}


def test_slices_cover_every_row_once_in_file_order(two_files):
    slices = plan_slices(two_files, rows_per_slice=3)
    a, b = two_files
    assert slices == [
        Slice(a, 0, 0, 3, 0),
        Slice(a, 0, 3, 4, 3),
        Slice(a, 1, 0, 3, 4),
        Slice(a, 1, 3, 4, 7),
        Slice(a, 2, 0, 2, 8),
        Slice(b, 0, 0, 3, 10),
    ]
    reader = SliceReader(a, StorageConfig(), ["id", "text"])
    tables = [reader.read(s) for s in slices]
    assert [i for t in tables for i in t["id"].to_pylist()] == [str(i) for i in range(13)]
    assert [r for t in tables for r in t[ROW].to_pylist()] == list(range(13))  # ids here equal positions


def test_a_retry_reads_only_the_slices_holding_its_rows_and_picks_rows_by_position(tmp_path):
    a = _write(tmp_path / "a.parquet", ["x", "y", "x", "z", "x"], row_group_size=2)  # "x" on three rows
    footers = {a: pq.read_metadata(a)}
    only = [2, 4]  # two of the three "x" rows
    slices = plan_slices(footers, 1, only)
    assert [(s.row_group, s.row) for s in slices] == [(1, 2), (2, 4)]
    reader = SliceReader(a, StorageConfig(), ["id", "text"], None, only)
    tables = [reader.read(s) for s in plan_slices(footers, 2, only)]
    assert [(i, r) for t in tables for i, r in zip(t["id"].to_pylist(), t[ROW].to_pylist())] == [("x", 2), ("x", 4)]
    assert plan_slices(footers, 2, []) == []


def test_an_empty_input_has_no_slices_and_a_slice_is_never_empty(tmp_path):
    empty = _write(tmp_path / "e.parquet", [], row_group_size=10)
    assert plan_slices({empty: pq.read_metadata(empty)}, 5) == []
    with pytest.raises(ValueError, match="rows_per_slice must be positive"):
        plan_slices({}, 0)


def test_files_whose_id_types_differ_read_as_one_schema_and_positions_run_on_across_files(tmp_path):
    a = _write(tmp_path / "a.parquet", [1, 2, 3], 10, pa.int64())
    b = _write(tmp_path / "b.parquet", ["4", "5"], 10)
    footers = {p: pq.read_metadata(p) for p in (a, b)}
    schema = SliceReader.read_schema(footers, ["id", "text"])
    assert schema.field("id").type == pa.string()
    reader = SliceReader(a, StorageConfig(), ["id", "text"], schema, only_rows=[1, 4])
    rows = [reader.read(s) for s in plan_slices(footers, 10)]
    assert [t.schema for t in rows] == [schema.append(pa.field(ROW, pa.int64()))] * 2
    assert [t["id"].to_pylist() for t in rows] == [["2"], ["5"]]
    assert SliceReader.read_schema({a: footers[a]}, ["id"]) is None  # one file: read as stored


@pytest.mark.parametrize(
    ("rows", "actors", "expected"),
    [(300, 1, 128), (10_000, 2, 1024), (2_000, 2, 256), (0, 1, 128), (10**7, 16, 1024)],
)
def test_slice_rows_are_whole_batches_about_four_per_actor(rows, actors, expected):
    assert slice_rows(rows, actors, batch_size=128) == expected


class _Upper:
    """A stand-in preprocessor: one row per row, in order, without the positions it was given."""

    def __call__(self, batch):
        return {"text": np.array([t.upper() for t in batch["text"]], dtype=object)}


def test_the_slice_preprocessor_puts_each_rows_position_back_on_what_it_maps(two_files):
    a, _ = two_files
    mapper = SlicePreprocessor((a, StorageConfig(), ["id", "text"]), _Upper, (), {}, batch_size=2)
    pieces = pa.Table.from_pylist([dataclasses.asdict(s) for s in plan_slices(two_files, rows_per_slice=3)])
    out = list(mapper(pieces))
    assert [len(b["text"]) for b in out] == [2, 1, 1, 2, 1, 1, 2, 2, 1]  # batch_size rows at most, per slice
    assert [r for b in out for r in b[ROW]] == list(range(13))
    assert [t for b in out for t in b["text"]] == [f"T{i}" for i in range(13)]
