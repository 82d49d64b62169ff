"""From the raw scored stream in staging to the layout that gets committed.

Ray streams every row (scored or failed) into ``<staging>/_raw/`` while scoring runs. Finalizing reads
those files once, on the driver (they hold predictions only: ids, classes, a few floats a row):

* scored rows are cast to one fixed schema, get the lineage columns, and are cut into files of exactly
  ``score.rows_per_file`` rows named ``part-00000.parquet`` ... (the last one smaller);
* failed rows become the quarantine table (``pipeline.quarantine_records``: ``id, stage, column, error``);
* with ``--evaluate``, scored rows with a usable label are folded into the metrics;
* ids that occur more than once (as strings: ``7`` in one file and ``"7"`` in another are one id) are
  counted, so the run can say so: every row is scored, and a reader that joins on id sees them all.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmray.data.pipeline import quarantine_records
from mmray.data.schema import ERROR, ID, QUARANTINE_SCHEMA
from mmray.score.commit import QUARANTINE, QUARANTINE_FILE, Staging
from mmray.score.label_metrics import LabelMetrics

__all__ = ["Finalized", "LINEAGE_FIELDS", "finalize", "lineage_schema", "repeated_ids"]

LINEAGE_FIELDS = (
    pa.field("model_id", pa.string()),  # content hash of the checkpoint
    pa.field("scored_at", pa.timestamp("us", tz="UTC")),  # when the run started
    pa.field("run_id", pa.string()),
)


def lineage_schema(schema: pa.Schema) -> pa.Schema:
    """The committed files' schema: prediction columns, then lineage."""
    return pa.schema([*schema, *LINEAGE_FIELDS])


@dataclass(frozen=True)
class Finalized:
    files: list[dict]  # {"name", "rows", "bytes"}, in name order
    quarantine: pa.Table
    rows_raw: int  # every row Ray wrote, scored or failed
    metrics: dict[str, float] | None
    repeated: dict[str, int]  # id -> rows, for ids on more than one row (all of them: warn with a few)

    @property
    def rows_scored(self) -> int:
        return sum(f["rows"] for f in self.files)


class _PartWriter:
    """Cuts scored rows into files of exactly ``rows_per_file`` rows, one row group each, numbered from
    ``first``."""

    def __init__(self, fs: pafs.FileSystem, directory: str, schema: pa.Schema, rows_per_file: int, first: int = 0):
        self.fs, self.directory, self.schema, self.rows_per_file = fs, directory, schema, rows_per_file
        self.first = first
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[dict] = []

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def close(self) -> list[dict]:
        if self.pending_rows:
            self._flush(self.pending_rows)
        return self.files

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        name = f"part-{self.first + len(self.files):05d}.parquet"
        path = f"{self.directory}/{name}"
        pq.write_table(table.slice(0, n), path, filesystem=self.fs, row_group_size=n)
        self.files.append({"name": name, "rows": n, "bytes": self.fs.get_file_info(path).size})
        rest = table.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows


def _raw_files(fs: pafs.FileSystem, raw: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(raw, allow_not_found=True, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _scored_rows(good: pa.Table, schema: pa.Schema, lineage: dict[str, object]) -> pa.Table:
    n = good.num_rows
    arrays = [good[f.name].cast(f.type) for f in schema]
    arrays += [pa.repeat(pa.scalar(lineage[f.name], type=f.type), n) for f in LINEAGE_FIELDS]
    return pa.Table.from_arrays(arrays, schema=lineage_schema(schema))


def repeated_ids(ids: list[pa.Array]) -> dict[str, int]:
    """``id -> rows`` for the ids (as strings) that occur more than once across ``ids``."""
    if not ids:
        return {}
    counts = pc.value_counts(pa.chunked_array(ids, pa.string()))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    return dict(zip(repeated.field("values").to_pylist(), repeated.field("counts").to_pylist()))


def finalize(
    st: Staging,
    schema: pa.Schema,
    model_id: str,
    scored_at: dt.datetime,
    rows_per_file: int,
    evaluation: LabelMetrics | None = None,
    first_file: int = 0,
) -> Finalized:
    """Turns ``<staging>/_raw`` into ``part-*.parquet`` and ``_quarantine/part-00000.parquet`` in staging.

    Args:
        schema: ``predictor.output_schema(tasks)``; lineage columns are appended.
        evaluation: folds in scored rows when ``--evaluate`` is on.
        first_file: number of the first part file (``--retry-quarantined`` appends to a commit's files).
    """
    lineage = {"model_id": model_id, "scored_at": scored_at, "run_id": st.run_id}
    writer = _PartWriter(st.fs, st.path, lineage_schema(schema), rows_per_file, first_file)
    quarantine, rows_raw, ids = [], 0, []
    for path in _raw_files(st.fs, st.raw):
        with st.fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches():
                table = pa.Table.from_batches([batch])
                rows_raw += table.num_rows
                ids.append(pc.cast(table[ID], pa.string()))  # ids only: a few bytes a row, for repeated_ids
                good = pc.fill_null(pc.equal(table[ERROR], ""), False)
                quarantine.append(quarantine_records(table))
                scored = table.filter(good)
                if evaluation is not None:
                    evaluation.update(scored)
                writer.add(_scored_rows(scored, schema, lineage))
    files = writer.close()
    bad = [q for q in quarantine if q.num_rows]
    quarantine_table = pa.concat_tables(bad) if bad else QUARANTINE_SCHEMA.empty_table()
    st.fs.create_dir(st.file(QUARANTINE), recursive=True)
    pq.write_table(quarantine_table, st.file(QUARANTINE_FILE), filesystem=st.fs)
    metrics = evaluation.result() if evaluation is not None else None
    return Finalized(files, quarantine_table, rows_raw, metrics, repeated_ids(ids))
