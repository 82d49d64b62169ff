"""Ray Data wiring of the data layer: list + schema-check Parquet input, read it, run the preprocessing
actor pool, and split the result into usable rows and quarantine records.

Three things have one home here for every job (training, scoring, ``mmray ablate``; ``mmray
validate-data``, which starts no Ray): the schema check (``schema_errors`` over the footers that
``read_footers`` reads in parallel), the actor pool (``map_with_actors``) and the quarantine record
(``quarantine_records`` builds it from any stream that carries the bookkeeping columns,
``reason_counts`` groups it for summaries).

Reading is lazy and streaming (``read_parquet`` yields row-group-sized blocks, back-pressured by the
actor pool), so the driver never holds the data; the quarantine streams to its Parquet file as well
(``stream_quarantine``), keeping only counts, so even a mostly-bad input is bounded on the driver.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from mmray.config import PreprocessConfig, StorageConfig
from mmray.data import storage
from mmray.data.preprocess import Preprocessor, PreprocessSpec, keep_good
from mmray.data.schema import (
    ERROR,
    ERROR_COLUMN,
    ERROR_STAGE,
    ID,
    QUARANTINE_SCHEMA,
    ROW,
    SchemaError,
    check_columns,
    unify_columns,
)
from mmray.runtime import Demand

__all__ = [
    "DataQualityError",
    "Quarantine",
    "check_bad_fraction",
    "count_rows",
    "input_files",
    "input_footers",
    "map_with_actors",
    "preprocess",
    "preprocess_demand",
    "quarantine_records",
    "ranked_reasons",
    "read_footers",
    "read_input",
    "reason_counts",
    "reason_examples",
    "schema_errors",
    "stream_quarantine",
    "summarize_reasons",
    "usable_rows",
]

_FOOTER_READERS = 16  # footers are tiny: parallel reads hide S3 latency on inputs of many files


class DataQualityError(RuntimeError):
    """Too large a share of the input was quarantined; the quarantine was written first."""


def input_files(uri: str, expected: dict[str, str], store: StorageConfig) -> list[str]:
    """Lists the input's Parquet files and checks every file's schema before any work is done
    (``input_footers``, without the footers).

    Raises:
        FileNotFoundError: nothing at ``uri``.
        SchemaError: a file that is not Parquet, or lacks / mistypes a column; names the file.
    """
    return list(input_footers(uri, expected, store))


def input_footers(uri: str, expected: dict[str, str], store: StorageConfig) -> dict[str, pq.FileMetaData]:
    """The input's Parquet files (as listed: ``bucket/key`` on S3), in order, each with its footer, every
    file's schema checked before any work is done: one footer read serves the check and the caller.

    Args:
        expected: column -> kind, as from ``PreprocessSpec.input_columns()``.

    Raises:
        FileNotFoundError: nothing at ``uri``.
        SchemaError: a file that is not Parquet, or lacks / mistypes a column; names the file.
    """
    files = storage.list_parquet_files(uri, store)
    footers = read_footers(uri, files, store)
    errors = schema_errors(footers, expected)
    if errors:
        raise errors[0]  # files are sorted: the first failing file is named
    return dict(zip(files, footers.values()))  # read_footers keeps files' order


def read_footers(uri: str, files: list[str], store: StorageConfig) -> dict[str, pq.FileMetaData]:
    """Each file's Parquet footer (schema, row count), keyed by the path shown to users, in ``files``
    order. Read in parallel: footers are tiny, and on S3 latency, not bytes, dominates.

    Raises:
        FileNotFoundError: a listed file is gone.
        SchemaError: a file that is not Parquet; names it.
    """
    if not files:
        return {}
    fs, _ = storage.resolve(uri, store)

    def read(path: str) -> pq.FileMetaData:
        try:
            return pq.read_metadata(path, filesystem=fs)
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise SchemaError(
                f"{_shown(uri, path)} is not a readable Parquet file: {storage.redact(str(e))[:200]}"
            ) from None

    with ThreadPoolExecutor(min(_FOOTER_READERS, len(files))) as pool:
        return {_shown(uri, f): meta for f, meta in zip(files, pool.map(read, files))}  # first failure re-raised


def schema_errors(footers: Mapping[str, pq.FileMetaData], expected: dict[str, str]) -> list[SchemaError]:
    """Every schema problem of an input, as ``read_footers`` read it: one error per file that lacks or
    mistypes a column, in file order; when there is none, the cross-file one (files that disagree on a
    column's type beyond a cast). ``input_files`` raises the first, ``mmray validate-data`` lists all.

    Args:
        expected: column -> kind, as from ``PreprocessSpec.input_columns()``.
    """
    schemas = _arrow_schemas(footers)
    errors = []
    for path, schema in schemas.items():
        try:
            check_columns(schema, expected, path)
        except SchemaError as e:
            errors.append(e)
    if not errors:
        try:
            unify_columns(schemas, expected)  # what read_input casts to; fails naming both files
        except SchemaError as e:
            errors.append(e)
    return errors


def _schemas(uri: str, files: list[str], store: StorageConfig) -> dict[str, pa.Schema]:
    """Each file's Arrow schema (footers only, read in parallel), keyed by the path shown to users."""
    return _arrow_schemas(read_footers(uri, files, store))


def _arrow_schemas(footers: Mapping[str, pq.FileMetaData]) -> dict[str, pa.Schema]:
    return {path: meta.schema.to_arrow_schema() for path, meta in footers.items()}


def _shown(uri: str, path: str) -> str:
    return f"s3://{path}" if storage.is_s3(uri) else path


def count_rows(uri: str, files: list[str], store: StorageConfig) -> int:
    """Rows in the input's Parquet files, from their footers (``read_footers``). Preprocessing maps
    each input row to one output row, so this is ``rows_in``."""
    return sum(meta.num_rows for meta in read_footers(uri, files, store).values())


def read_input(uri: str, files: list[str], store: StorageConfig, columns: list[str]) -> ray.data.Dataset:
    """Reads ``columns`` of ``files`` lazily; files whose types differ (``id`` int64 in one, string in
    another) are read through one unified schema, cast per file, instead of failing in Ray's merge."""
    fs, _ = storage.resolve(uri, store)
    schema = unify_columns(_schemas(uri, files, store), dict.fromkeys(columns, "any")) if len(files) > 1 else None
    return ray.data.read_parquet(files, filesystem=fs, columns=columns, schema=schema)


def preprocess(
    ds: ray.data.Dataset,
    spec: PreprocessSpec,
    tokenizer_files: dict[str, bytes],
    pcfg: PreprocessConfig,
    actor: type = Preprocessor,
    extra_args: tuple = (),
) -> ray.data.Dataset:
    """Maps raw rows to model inputs in a bounded actor pool (one output row per input row).

    ``actor`` may extend ``Preprocessor`` (scoring's ``LabeledPreprocessor``); it is constructed with
    ``(spec, tokenizer_files, *extra_args)`` and the pool settings of ``pcfg``.
    """
    fetch = {
        "fetch_threads": pcfg.fetch_threads,
        "fetch_attempts": pcfg.fetch_attempts,
        "fetch_timeout_s": pcfg.fetch_timeout_s,
    }
    args = (spec, tokenizer_files, *extra_args)
    return map_with_actors(ds, actor, args, pcfg.batch_size, pcfg.concurrency, pcfg.num_cpus, kwargs=fetch)


def map_with_actors(
    ds: ray.data.Dataset,
    actor: type,
    args: tuple,
    batch_size: int,
    concurrency: int,
    num_cpus: float,
    num_gpus: float = 0.0,
    kwargs: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """``ds`` mapped by a fixed pool of ``concurrency`` actors of the callable class ``actor`` (built once
    per actor with ``args`` and ``kwargs``), on numpy batches of ``batch_size`` rows: the shape of every
    pool mmray runs (preprocessing, prediction, ablation), so each is sized by its config section alone."""
    return ds.map_batches(
        actor,
        fn_constructor_args=args,
        fn_constructor_kwargs=kwargs or {},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def preprocess_demand(pcfg: PreprocessConfig) -> Demand:
    """What the preprocessing pool of ``preprocess`` holds while it runs (for ``check_resources``)."""
    return Demand("data.preprocess.concurrency x data.preprocess.num_cpus", pcfg.concurrency, {"CPU": pcfg.num_cpus})


def usable_rows(ds: ray.data.Dataset) -> ray.data.Dataset:
    return ds.map_batches(keep_good, batch_format="numpy", batch_size=None)


class Quarantine:
    """Streams quarantine records (``id, stage, column, error, row``) into one Parquet file at ``uri``.

    Only the count and the counts of the most common reasons stay in memory: records are buffered up
    to one row group and written, so a mostly-bad input of any size cannot exhaust the driver. The
    file is written even when no row is bad. Use as a context manager; ``add`` takes Arrow tables
    of records.
    """

    def __init__(self, uri: str, store: StorageConfig):
        fs, path = storage.resolve(uri, store)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self.uri, self.rows = uri, 0
        self.reasons: Counter[tuple[str, str]] = Counter()  # (column, reason prefix) -> rows
        self._sink = fs.open_output_stream(path)
        self._writer = pq.ParquetWriter(self._sink, QUARANTINE_SCHEMA)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, records: pa.Table) -> None:
        if not records.num_rows:
            return
        records = records.cast(QUARANTINE_SCHEMA)
        self.rows += records.num_rows
        for key, count in reason_counts(records).items():
            if key in self.reasons or len(self.reasons) < _MAX_REASON_KEYS:
                self.reasons[key] += count
        self._pending.append(records)
        self._pending_rows += records.num_rows
        if self._pending_rows >= _QUARANTINE_ROW_GROUP:
            self._flush()

    def close(self) -> None:
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        self._sink.close()
        self._writer = None

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0


_QUARANTINE_ROW_GROUP = 65_536  # records buffered before a row group is written (a few MB at most)
_MAX_REASON_KEYS = 10_000  # distinct (column, reason prefix) pairs counted for the summary; rows always are


def quarantine_records(rows: pa.Table | pa.RecordBatch | Mapping[str, Any]) -> pa.Table:
    """The quarantine record (``id, stage, column, error, row``; ``QUARANTINE_SCHEMA``) of each row with
    an error, from anything that carries the bookkeeping columns: a preprocessed or scored Arrow batch,
    or a numpy batch inside an actor (``row`` from ``ROW`` where the batch has it, else null). A row
    whose error is null is no good row either: it is quarantined."""
    error = _as_string(rows[ERROR])
    bad = pc.invert(pc.fill_null(pc.equal(error, ""), False))
    columns = [_as_string(rows[ID]), _as_string(rows[ERROR_STAGE]), _as_string(rows[ERROR_COLUMN]), error]
    names = rows.column_names if isinstance(rows, (pa.Table, pa.RecordBatch)) else rows
    position = pc.cast(rows[ROW], pa.int64()) if ROW in names else pa.nulls(len(error), pa.int64())
    return pa.table([pc.filter(c, bad) for c in [*columns, position]], schema=QUARANTINE_SCHEMA)


def reason_counts(records: pa.Table) -> dict[tuple[str, str], int]:
    """``(column, reason) -> rows`` over quarantine records; the reason is the error's first 40
    characters, so variants of one problem ("undecodable image: ...") count as one."""
    counts = _by_reason(records).group_by(["column", "reason"]).aggregate([([], "count_all")])
    return {
        (c or "", r or ""): n
        for c, r, n in zip(*(counts.column(k).to_pylist() for k in ("column", "reason", "count_all")))
    }


def reason_examples(records: pa.Table) -> dict[tuple[str, str], tuple[str, str | None, str]]:
    """``(column, reason) -> (stage, id, error)`` of the first record of each reason of ``reason_counts``:
    the row a report names beside the count."""
    first = pc.ScalarAggregateOptions(skip_nulls=False)  # the first record's, even a null id
    firsts = (
        _by_reason(records)
        .group_by(["column", "reason"], use_threads=False)  # unthreaded: "first" is in record order
        .aggregate([(k, "first", first) for k in ("stage", "id", "error")])
    )
    keys = ("column", "reason", "stage_first", "id_first", "error_first")
    return {
        (c or "", r or ""): (st or "", i, e or "")
        for c, r, st, i, e in zip(*(firsts.column(k).to_pylist() for k in keys))
    }


def _by_reason(records: pa.Table) -> pa.Table:
    """The records with their reason: the error's first 40 characters."""
    return records.append_column("reason", pc.utf8_slice_codeunits(records.column("error"), 0, 40))


def stream_quarantine(ds: ray.data.Dataset, uri: str, store: StorageConfig) -> Quarantine:
    """Writes the quarantine records of a preprocessed dataset to ``uri`` as they stream past.

    Only the four bookkeeping columns are read, and bad rows are filtered batch by batch with Arrow
    on the driver (no extra task pool to start); the driver holds one row group of records at most.

    Returns:
        The closed ``Quarantine``: its ``rows`` and ``reasons`` (for ``summarize_reasons``).
    """
    bookkeeping = ds.select_columns([ID, ERROR, ERROR_COLUMN, ERROR_STAGE])
    with Quarantine(uri, store) as quarantine:
        for batch in bookkeeping.iter_batches(batch_format="pyarrow", batch_size=None):
            quarantine.add(quarantine_records(batch))
    return quarantine


def _as_string(column: pa.ChunkedArray | pa.Array | np.ndarray) -> pa.ChunkedArray | pa.Array:
    """Ray hands an all-null column over as type null, odd objects as a Python-object extension, and
    an actor's numpy batch holds Python objects."""
    if isinstance(column, np.ndarray):
        return pa.array([None if v is None else str(v) for v in column.tolist()], type=pa.string())
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in column.to_pylist()], type=pa.string())


def check_bad_fraction(
    rows_in: int, rows_bad: int, limit: float, where: str, quarantine: pa.Table | Quarantine | None = None
) -> None:
    """Raises DataQualityError when more than ``limit`` of the rows were quarantined.

    Args:
        quarantine: the records (a table, or the streamed ``Quarantine``), to name the most common
            reasons in the message.
    """
    if rows_in and rows_bad / rows_in > limit:
        reasons = summarize_reasons(quarantine) if quarantine is not None else ""
        top = f"; most common: {reasons}" if reasons else ""
        raise DataQualityError(
            f"{rows_bad} of {rows_in} rows ({rows_bad / rows_in:.1%}) were quarantined, above "
            f"data.max_bad_fraction={limit}{top}; see {storage.redact(where)} (columns id, stage, column, error)"
        )


def ranked_reasons(
    quarantine: pa.Table | Quarantine | Mapping[tuple[str, str], int], top: int | None = None
) -> list[tuple[tuple[str, str], int]]:
    """``((column, reason), rows)`` of the ``top`` (None: all) most frequent reasons, most rows first,
    ties by reason: of quarantine records, a ``Quarantine``, or ``reason_counts`` summed over batches."""
    if isinstance(quarantine, pa.Table):
        quarantine = reason_counts(quarantine)
    counts = quarantine.reasons if isinstance(quarantine, Quarantine) else quarantine
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def summarize_reasons(quarantine: pa.Table | Quarantine, top: int = 3) -> str:
    """``"'column': reason (count), ..."`` for the ``top`` most frequent (column, reason) pairs."""
    return ", ".join(f"'{column}': {reason} ({count})" for (column, reason), count in ranked_reasons(quarantine, top))
