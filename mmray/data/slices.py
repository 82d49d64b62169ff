"""Input read as row slices by the actors that process them: no read or file-listing task in between.

Scoring already lists its input and reads every footer on the driver (to check the schema, fingerprint
the input and count rows), so it knows each file's row groups and their sizes. ``plan_slices`` cuts
them into ``Slice``s of at most ``rows_per_slice`` rows, ``slice_dataset`` makes a Ray dataset of those
few bytes each, and the actor that preprocesses (``SlicePreprocessor``: a ``SliceReader`` and scoring's
preprocessor, or preprocessor and model) reads its slice itself. Against ``ray.data.read_parquet`` this removes a file-listing task and a read task that each
hold a whole CPU (seconds on a small input), and it cuts an input of one large row group into as many
pieces as the pool has actors, where a read would make it one block for one actor.

Training does not read this way yet: tried, it changed which rows each trainer worker's batches hold
(a two-worker run's validation loss moved 11% from the one-worker run's at epoch 1, outside what
tests/test_train_e2e.py allows), which needs its own look at how the shards split many small blocks.

A slice reads its row group whole and keeps the last one read (``SliceReader``): consecutive slices of
one group on one actor read it once. Rows keep the file's order inside a slice, and each gets its
position in the input (``schema.ROW``), which the quarantine records: ``--retry-quarantined`` reads
only the slices that hold the rows it retries and picks them by position, whatever their ids.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from mmray.config import StorageConfig
from mmray.data import storage
from mmray.data.schema import ROW, unify_columns

__all__ = ["Slice", "SlicePreprocessor", "SliceReader", "numpy_batch", "plan_slices", "slice_dataset", "slice_rows"]


@dataclasses.dataclass(frozen=True)
class Slice:
    """Rows ``[start, stop)`` of row group ``row_group`` of ``path`` (as listed: ``bucket/key`` on S3);
    ``row`` is the input position of its first row (``schema.ROW``)."""

    path: str
    row_group: int
    start: int
    stop: int
    row: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def slice_rows(rows: int, actors: int, batch_size: int, max_batches: int = 8) -> int:
    """Rows per slice: about four slices per actor (so a slow slice does not leave the others idle, and
    progress shows early), at least one batch and at most ``max_batches`` batches, a whole number of
    batches (no slice ends in a short batch but the last of a row group)."""
    per_actor = math.ceil(rows / max(1, 4 * actors))
    batches = min(max_batches, max(1, math.ceil(per_actor / batch_size)))
    return batches * batch_size


def plan_slices(
    footers: Mapping[str, pq.FileMetaData], rows_per_slice: int, only_rows: list[int] | None = None
) -> list[Slice]:
    """Every row of the input once, in file and row-group order, cut into slices of at most
    ``rows_per_slice`` rows (empty row groups give none); with ``only_rows`` (sorted input positions),
    only the slices that hold one of them."""
    if rows_per_slice <= 0:
        raise ValueError(f"rows_per_slice must be positive, got {rows_per_slice}")
    slices, row = [], 0
    for path, meta in footers.items():
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            slices += [Slice(path, g, s, min(s + rows_per_slice, n), row + s) for s in range(0, n, rows_per_slice)]
            row += n
    if only_rows is not None:
        slices = [s for s in slices if _holds_any(only_rows, s.row, s.row + s.rows)]
    return slices


def _holds_any(sorted_rows: list[int], start: int, stop: int) -> bool:
    i = bisect.bisect_left(sorted_rows, start)
    return i < len(sorted_rows) and sorted_rows[i] < stop


def slice_dataset(slices: list[Slice]) -> ray.data.Dataset:
    """One block per slice, each a row ``{path, row_group, start, stop, row}``: what a pool's actors read."""
    items = [dataclasses.asdict(s) for s in slices]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


class SliceReader:
    """Reads slices of one input in an actor: the ``columns`` it names, cast to one schema when the
    files' types differ (as ``pipeline.read_input`` does), then each row's input position
    (``schema.ROW``); optionally only the rows at the positions ``only_rows``.

    Args:
        uri: the input (its filesystem: local, or S3 with ``store``'s endpoint and region).
        columns: the columns to read, in order.
        schema: the one schema every slice is cast to (``read_schema``; None: read as stored).
    """

    def __init__(
        self,
        uri: str,
        store: StorageConfig,
        columns: list[str],
        schema: pa.Schema | None = None,
        only_rows: list[int] | None = None,
    ):
        self.fs, _ = storage.resolve(uri, store)
        self.columns, self.schema = list(columns), schema
        self.only = pa.array(only_rows, pa.int64()) if only_rows is not None else None
        self._last: tuple[tuple[str, int], pa.Table] | None = None

    @staticmethod
    def read_schema(footers: Mapping[str, pq.FileMetaData], columns: list[str]) -> pa.Schema | None:
        """The schema every slice is cast to (None when the files agree): ``schema.unify_columns``."""
        if len(footers) < 2:
            return None
        return unify_columns({p: m.schema.to_arrow_schema() for p, m in footers.items()}, dict.fromkeys(columns, "any"))

    def _group(self, path: str, group: int) -> pa.Table:
        if self._last is None or self._last[0] != (path, group):
            with self.fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=self.columns)
            self._last = ((path, group), table)
        return self._last[1]

    def read(self, piece: Slice) -> pa.Table:
        """The slice's rows (those at ``only_rows``, when given), columns in order, in the read schema,
        then ``ROW``."""
        table = self._group(piece.path, piece.row_group).slice(piece.start, piece.rows)
        if self.schema is not None:
            table = table.select(self.schema.names).cast(self.schema)
        table = table.append_column(ROW, pa.array(np.arange(piece.row, piece.row + piece.rows, dtype=np.int64)))
        if self.only is not None:
            table = table.filter(pc.is_in(table[ROW], value_set=self.only))
        return table


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A table as the numpy batch Ray Data hands a ``batch_format="numpy"`` function."""
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


class SlicePreprocessor:
    """Callable class for ``map_batches`` over ``slice_dataset``: reads each slice (``SliceReader``) and
    maps it, ``batch_size`` rows at a time, with ``actor(*args, **kwargs)`` (a ``Preprocessor``, or
    anything built on one, which returns one row per row it is given, in order); yields one output
    batch per input batch, each row with its input position (``ROW``) put back.

    Args:
        reader: ``SliceReader`` arguments (input URI, storage, columns, read schema, rows to keep).
    """

    def __init__(self, reader: tuple, actor: Callable[..., Any], args: tuple, kwargs: dict, batch_size: int):
        self.reader = SliceReader(*reader)
        self.process = actor(*args, **kwargs)
        self.batch_size = batch_size

    def __call__(self, pieces: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        for piece in pieces.to_pylist():
            table = self.reader.read(Slice(**piece))
            for start in range(0, table.num_rows, self.batch_size):
                batch = numpy_batch(table.slice(start, self.batch_size))
                out = self.process(batch)
                out[ROW] = batch[ROW]  # one output row per input row, in order
                yield out
