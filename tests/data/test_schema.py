"""The schema check before any work: a missing or mistyped column names the column, type and file."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import StorageConfig
from mmray.data import pipeline, storage
from mmray.data.schema import SchemaError, check_columns

EXPECTED = {"id": "any", "text": "string", "image": "binary", "label": "label"}
GOOD = pa.schema([("id", pa.int64()), ("text", pa.large_string()), ("image", pa.binary()), ("label", pa.string())])


def test_accepts_the_usual_arrow_variants():
    check_columns(GOOD, EXPECTED, "f.parquet")
    variants = pa.schema([("id", pa.string()), ("text", pa.dictionary(pa.int32(), pa.string())),
                          ("image", pa.large_binary()), ("label", pa.list_(pa.string()))])  # fmt: skip
    check_columns(variants, EXPECTED, "f.parquet")
    all_null = pa.schema([("id", pa.string()), ("text", pa.null()), ("image", pa.null()), ("label", pa.null())])
    check_columns(all_null, EXPECTED, "f.parquet")  # rows missing a modality or label: the quarantine's job


def test_missing_column_names_column_type_file_and_a_close_match():
    schema = pa.schema([("id", pa.string()), ("Text", pa.string()), ("image", pa.binary()), ("label", pa.string())])
    with pytest.raises(SchemaError) as e:
        check_columns(schema, EXPECTED, "s3://b/data/part-0.parquet")
    assert str(e.value) == ("column 'text' is missing in s3://b/data/part-0.parquet (expected string; found "
                            "['id', 'Text', 'image', 'label']); did you mean 'Text'?")  # fmt: skip


@pytest.mark.parametrize("column, arrow_type, expected", [
    ("text", pa.int64(), "string"),
    ("image", pa.string(), "binary (encoded image bytes)"),
    ("label", pa.struct([("a", pa.int8())]), "string, integer, boolean, floating point or list"),
])  # fmt: skip
def test_mistyped_column_names_actual_and_expected_type(column, arrow_type, expected):
    schema = GOOD.set(GOOD.get_field_index(column), pa.field(column, arrow_type))
    with pytest.raises(SchemaError) as e:
        check_columns(schema, EXPECTED, "/data/x.parquet")
    assert str(e.value) == f"column '{column}' in /data/x.parquet has type {arrow_type}, expected {expected}"


def _write(path, schema: pa.Schema) -> None:
    pq.write_table(schema.empty_table(), path)


def test_input_files_checks_every_file_before_any_work(tmp_path):
    _write(tmp_path / "part-0.parquet", GOOD)
    _write(tmp_path / "part-1.parquet", GOOD.remove(GOOD.get_field_index("image")))
    with pytest.raises(SchemaError, match=f"column 'image' is missing in {tmp_path}/part-1.parquet"):
        pipeline.input_files(str(tmp_path), EXPECTED, StorageConfig())
    (tmp_path / "part-1.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match=f"{tmp_path}/part-1.parquet is not a readable Parquet file"):
        pipeline.input_files(str(tmp_path), EXPECTED, StorageConfig())
    with pytest.raises(FileNotFoundError, match="no Parquet data at"):
        pipeline.input_files(str(tmp_path / "nothing"), EXPECTED, StorageConfig())


def test_input_files_on_s3_names_the_s3_uri(s3_server, s3_bucket):
    store = StorageConfig(s3_endpoint_url=s3_server)
    fs, root = storage.resolve(f"s3://{s3_bucket}/in", store)
    for i, schema in enumerate([GOOD, GOOD.set(1, pa.field("text", pa.binary()))]):
        with fs.open_output_stream(f"{root}/part-{i}.parquet") as f:
            pq.write_table(schema.empty_table(), f)
    with pytest.raises(SchemaError) as e:
        pipeline.input_files(f"s3://{s3_bucket}/in", EXPECTED, store)
    assert str(e.value) == f"column 'text' in s3://{s3_bucket}/in/part-1.parquet has type binary, expected string"
