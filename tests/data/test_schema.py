"""The schema check before any work: a missing or mistyped column names the column, type and file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import DataConfig, ImageConfig, StorageConfig, TextConfig
from mmray.data import pipeline, storage
from mmray.data.labels import Task
from mmray.data.preprocess import Preprocessor, PreprocessSpec
from mmray.data.schema import ERROR, INPUT_IDS, PIXELS, SchemaError, check_columns, label_key, unify_columns
from mmray.data.synthetic import make_rows
from mmray.data.text import train_wordpiece

EXPECTED = {"id": "any", "text": "string", "image": "binary", "label": "label"}
GOOD = pa.schema([("id", pa.int64()), ("text", pa.large_string()), ("image", pa.binary()), ("label", pa.string())])


def _batch(path) -> dict:
    table = pq.read_table(path)
    return {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}


def test_accepts_the_usual_arrow_variants(tmp_path):
    """Each variant passes the check on a real Parquet file and preprocesses to exactly what the plain
    types give; all-null columns pass too, and each of their rows is then quarantined with its reason."""
    rows = make_rows(6, seed=2)
    tags = [["a"], ["b"], [], ["a", "b"], ["b"], ["a"]]
    plain = pa.table({"id": rows["id"], "text": rows["text"], "image": rows["image"], "label": tags})
    variants = plain.cast(
        pa.schema(
            [
                ("id", pa.string()),
                ("text", pa.large_string()),
                ("image", pa.large_binary()),
                ("label", pa.list_(pa.string())),
            ]
        )
    )
    variants = variants.set_column(1, "text", variants.column("text").cast(pa.string()).dictionary_encode())
    variants = variants.set_column(0, "id", pa.array(range(6), pa.int64()))
    pq.write_table(plain, tmp_path / "plain.parquet")
    (tmp_path / "variants").mkdir()
    pq.write_table(variants, tmp_path / "variants" / "part-0.parquet")
    assert pq.read_schema(tmp_path / "variants" / "part-0.parquet").field("text").type == pa.dictionary(
        pa.int32(), pa.string()
    )  # the variant survived the round trip
    assert pipeline.input_files(str(tmp_path / "variants"), EXPECTED, StorageConfig()) == [
        str(tmp_path / "variants" / "part-0.parquet")
    ]

    tok = tmp_path / "tok"
    train_wordpiece(rows["text"], vocab_size=120, out_dir=tok)
    tasks = [Task("label", "multilabel", ("a", "b"))]
    data = DataConfig(text=TextConfig(max_length=12), image=ImageConfig(size=16, max_pixels=1 << 20))
    spec = PreprocessSpec.from_config(data, StorageConfig(), tasks=tasks)
    pre = Preprocessor(spec, {p.name: p.read_bytes() for p in tok.iterdir()})
    want, got = pre(_batch(tmp_path / "plain.parquet")), pre(_batch(tmp_path / "variants" / "part-0.parquet"))
    assert list(got[ERROR]) == [""] * 6
    for key in (INPUT_IDS, PIXELS, label_key("label")):
        np.testing.assert_array_equal(np.stack(got[key]), np.stack(want[key]), err_msg=key)

    all_null = pa.schema([("id", pa.string()), ("text", pa.null()), ("image", pa.null()), ("label", pa.null())])
    check_columns(all_null, EXPECTED, "f.parquet")  # rows missing a modality or label: the quarantine's job
    nulls = pre(
        {
            "id": np.array(["n0", "n1"], dtype=object),
            **{c: np.array([None, None], dtype=object) for c in ("text", "image", "label")},
        }
    )
    assert all(nulls[ERROR]), nulls[ERROR]


def test_missing_column_names_column_type_file_and_a_close_match():
    schema = pa.schema([("id", pa.string()), ("Text", pa.string()), ("image", pa.binary()), ("label", pa.string())])
    with pytest.raises(SchemaError) as e:
        check_columns(schema, EXPECTED, "s3://b/data/part-0.parquet")
    assert str(e.value) == (
        "column 'text' is missing in s3://b/data/part-0.parquet (expected string; found "
        "['id', 'Text', 'image', 'label']); did you mean 'Text'?"
    )


@pytest.mark.parametrize(
    "column, arrow_type, expected",
    [
        ("text", pa.int64(), "string"),
        ("image", pa.string(), "binary (encoded image bytes)"),
        ("label", pa.struct([("a", pa.int8())]), "string, integer, boolean, floating point or list"),
    ],
)
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


def test_schema_errors_name_every_failing_file_in_order_and_input_files_raises_the_first(tmp_path):
    rows = {"id": [1, 2], "text": ["a", "b"], "image": [b"", b""], "label": ["x", "y"]}
    pq.write_table(pa.table(rows, schema=GOOD), tmp_path / "part-0.parquet")
    _write(tmp_path / "part-1.parquet", GOOD.remove(GOOD.get_field_index("image")))
    _write(tmp_path / "part-2.parquet", GOOD.set(1, pa.field("text", pa.binary())))
    files = storage.list_parquet_files(str(tmp_path), StorageConfig())
    footers = pipeline.read_footers(str(tmp_path), files, StorageConfig())
    assert list(footers) == files and [m.num_rows for m in footers.values()] == [2, 0, 0]
    assert pipeline.count_rows(str(tmp_path), files, StorageConfig()) == 2
    errors = [str(e) for e in pipeline.schema_errors(footers, EXPECTED)]
    assert errors == [
        f"column 'image' is missing in {tmp_path}/part-1.parquet (expected binary (encoded image bytes); "
        "found ['id', 'text', 'label'])",
        f"column 'text' in {tmp_path}/part-2.parquet has type binary, expected string",
    ]
    with pytest.raises(SchemaError) as e:
        pipeline.input_files(str(tmp_path), EXPECTED, StorageConfig())
    assert str(e.value) == errors[0]
    assert pipeline.schema_errors(dict(list(footers.items())[:1]), EXPECTED) == []


def test_input_files_on_s3_names_the_s3_uri(s3_server, s3_bucket):
    store = StorageConfig(s3_endpoint_url=s3_server)
    fs, root = storage.resolve(f"s3://{s3_bucket}/in", store)
    for i, schema in enumerate([GOOD, GOOD.set(1, pa.field("text", pa.binary()))]):
        with fs.open_output_stream(f"{root}/part-{i}.parquet") as f:
            pq.write_table(schema.empty_table(), f)
    with pytest.raises(SchemaError) as e:
        pipeline.input_files(f"s3://{s3_bucket}/in", EXPECTED, store)
    assert str(e.value) == f"column 'text' in s3://{s3_bucket}/in/part-1.parquet has type binary, expected string"


def _files(tmp_path, *tables: pa.Table) -> str:
    for i, table in enumerate(tables):
        pq.write_table(table, tmp_path / f"part-{i}.parquet")
    return str(tmp_path)


def test_unify_promotes_or_reads_disagreeing_scalars_as_strings():
    def schemas(*types):
        return {f"f{i}.parquet": pa.schema([("id", t), ("label", pa.string())]) for i, t in enumerate(types)}

    kinds = {"id": "any", "label": "label"}
    assert unify_columns(schemas(pa.int64(), pa.int64(), pa.null()), kinds) is None  # they agree: read as is
    assert unify_columns(schemas(pa.int32(), pa.int64()), kinds).field("id").type == pa.int64()
    assert unify_columns(schemas(pa.int64(), pa.string()), kinds).field("id").type == pa.string()
    assert unify_columns(schemas(pa.bool_(), pa.float64()), kinds).field("id").type == pa.string()
    with pytest.raises(SchemaError) as e:
        unify_columns(schemas(pa.string(), pa.null(), pa.list_(pa.string())), kinds)
    assert str(e.value) == (
        "column 'id' is string in f0.parquet but list<item: string> in f2.parquet; make the files agree"
    )


def test_files_with_int_and_string_ids_and_labels_read_as_one_dataset(ray_session, tmp_path):
    """Ray's own read fails on them ('Unable to merge: Field id has incompatible types: int64 vs string')."""
    uri = _files(
        tmp_path,
        pa.table({"id": pa.array([1, 2]), "text": ["a", "b"], "label": pa.array([0, 1])}),
        pa.table({"id": ["x", None], "text": ["c", "d"], "label": ["1", "0"]}),
    )
    expected = {"id": "any", "text": "string", "label": "label"}
    files = pipeline.input_files(uri, expected, StorageConfig())
    rows = pipeline.read_input(uri, files, StorageConfig(), list(expected)).take_all()
    assert sorted((r["id"] or "", r["label"]) for r in rows) == [("", "0"), ("1", "0"), ("2", "1"), ("x", "1")]


def test_files_whose_types_cannot_be_unified_fail_before_any_work_naming_both(tmp_path):
    uri = _files(
        tmp_path,
        pa.table({"id": ["a"], "text": ["t"], "label": ["cat"]}),
        pa.table({"id": ["b"], "text": ["t"], "label": [["cat", "dog"]]}),
    )
    with pytest.raises(SchemaError) as e:
        pipeline.input_files(uri, {"id": "any", "text": "string", "label": "label"}, StorageConfig())
    assert str(e.value) == (
        f"column 'label' is string in {tmp_path}/part-0.parquet but list<element: string> in "
        f"{tmp_path}/part-1.parquet; make the files agree"
    )
