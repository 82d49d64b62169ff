"""Ray Data wiring of the data layer: list + schema-check Parquet input, read it, run the preprocessing
actor pool, and split the result into usable rows and quarantine records.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from mmray.config import PreprocessConfig, StorageConfig
from mmray.data import schema as S
from mmray.data import storage
from mmray.data.preprocess import PreprocessSpec, Preprocessor, keep_errors, keep_good

__all__ = ["DataQualityError", "check_bad_fraction", "input_files", "preprocess", "read_input", "write_quarantine"]


class DataQualityError(RuntimeError):
    """Too large a share of the input was quarantined; the quarantine was written first."""


def input_files(uri: str, expected: dict[str, str], store: StorageConfig) -> list[str]:
    """Lists the input's Parquet files and checks every file's schema before any work is done.

    Args:
        expected: column -> kind, as from ``PreprocessSpec.input_columns()``.
    """
    files = storage.list_parquet_files(uri, store)
    fs, _ = storage.resolve(uri, store)
    for f in files:
        S.check_columns(pq.read_schema(f, filesystem=fs), expected, f"s3://{f}" if storage.is_s3(uri) else f)
    return files


def read_input(uri: str, files: list[str], store: StorageConfig, columns: list[str]) -> ray.data.Dataset:
    fs, _ = storage.resolve(uri, store)
    return ray.data.read_parquet(files, filesystem=fs, columns=columns)


def preprocess(
    ds: ray.data.Dataset, spec: PreprocessSpec, tokenizer_files: dict[str, bytes], pcfg: PreprocessConfig
) -> ray.data.Dataset:
    """Maps raw rows to model inputs in a bounded actor pool (one output row per input row)."""
    return ds.map_batches(
        Preprocessor,
        fn_constructor_args=(spec, tokenizer_files),
        batch_size=pcfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pcfg.concurrency),
        num_cpus=pcfg.num_cpus,
    )


def usable_rows(ds: ray.data.Dataset) -> ray.data.Dataset:
    return ds.map_batches(keep_good, batch_format="numpy", batch_size=None)


def quarantine_table(ds: ray.data.Dataset) -> pa.Table:
    """Collects the (small: four short strings a row) quarantine records to the driver."""
    bad = ds.select_columns([S.ID, S.ERROR, S.ERROR_COLUMN, S.ERROR_STAGE]).map_batches(
        keep_errors, batch_format="numpy", batch_size=None
    )
    tables = [t.cast(S.QUARANTINE_SCHEMA) for t in _arrow_blocks(bad) if t.num_rows]
    return pa.concat_tables(tables) if tables else S.QUARANTINE_SCHEMA.empty_table()


def _arrow_blocks(ds: ray.data.Dataset):
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield pa.table({name: batch[name].to_pylist() for name in S.QUARANTINE_SCHEMA.names})


def write_quarantine(table: pa.Table, uri: str, store: StorageConfig) -> None:
    """Writes (replacing) ``uri`` as one Parquet file; an empty quarantine is written too."""
    fs, path = storage.resolve(uri, store)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def check_bad_fraction(rows_in: int, rows_bad: int, limit: float, where: str) -> None:
    if rows_in and rows_bad / rows_in > limit:
        raise DataQualityError(
            f"{rows_bad} of {rows_in} rows ({rows_bad / rows_in:.1%}) were quarantined, above "
            f"data.max_bad_fraction={limit}; see {where}"
        )
