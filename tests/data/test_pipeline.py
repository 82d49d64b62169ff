"""The Ray Data wiring on the session's Ray: read -> preprocessing pool -> usable rows + quarantine."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import DataConfig, ImageConfig, PreprocessConfig, StorageConfig, TextConfig
from mmray.data import pipeline, storage
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.data.schema import ERROR, ERROR_COLUMN, ERROR_STAGE, ID, PIXELS, QUARANTINE_SCHEMA, ROW, label_key
from mmray.data.text import train_wordpiece
from tests.data.corpus import encoded

STORE = StorageConfig()
TASK = Task("label", "binary", ("0", "1"))


@pytest.fixture(scope="module")
def processed(ray_session, tmp_path_factory):
    """Integer ids and labels with nulls (numpy batches turn them into float64 + NaN), over two files."""
    root = tmp_path_factory.mktemp("pipe")
    train_wordpiece(["a cat", "a dog"] * 5, 50, root / "tok")
    tok = {p.name: p.read_bytes() for p in (root / "tok").iterdir()}
    image = encoded((200, 30, 30))
    n = 40
    ids = [None if i == 3 else i for i in range(n)]
    labels = [None if i == 5 else i % 2 for i in range(n)]
    images = [b"junk" if i == 7 else image for i in range(n)]
    table = pa.table(
        {"id": pa.array(ids, pa.int64()), "text": ["a cat"] * n, "image": images, "label": pa.array(labels, pa.int64())}
    )
    (root / "in").mkdir()
    pq.write_table(table.slice(0, 25), root / "in" / "part-0.parquet")
    pq.write_table(table.slice(25), root / "in" / "part-1.parquet")
    data = DataConfig(text=TextConfig(max_length=8), image=ImageConfig(size=16))
    spec = PreprocessSpec.from_config(data, STORE, tasks=[TASK])
    uri = str(root / "in")
    files = pipeline.input_files(uri, spec.input_columns(), STORE)
    ds = pipeline.read_input(uri, files, STORE, list(spec.input_columns()))
    pcfg = PreprocessConfig(concurrency=1, batch_size=16, num_cpus=0.5)
    return pipeline.preprocess(ds, spec, tok, pcfg).materialize()


@pytest.mark.integration  # starts a preprocessing actor pool on the session's Ray
def test_every_row_comes_out_once_usable_or_quarantined(processed, tmp_path):
    streamed = pipeline.stream_quarantine(processed, str(tmp_path / "q" / "train.parquet"), STORE)
    quarantine = pq.read_table(tmp_path / "q" / "train.parquet")
    assert quarantine.schema == QUARANTINE_SCHEMA and streamed.rows == quarantine.num_rows == 3
    records = sorted(quarantine.to_pylist(), key=lambda r: str(r["id"]))
    assert records == [
        {"id": "5", "stage": "label", "column": "label", "error": "null label in column 'label'", "row": None},
        {"id": "7", "stage": "preprocess", "column": "image", "error": records[1]["error"], "row": None},
        {"id": None, "stage": "preprocess", "column": "id", "error": "null id", "row": None},
    ]  # training reads through Ray's reader: no input positions
    assert records[1]["error"].startswith("unknown or unsupported image format")
    usable = pipeline.usable_rows(processed).take_all()
    assert len(usable) + quarantine.num_rows == processed.count() == 40
    assert sorted(int(r[ID]) for r in usable) == [i for i in range(40) if i not in (3, 5, 7)]  # "8", not "8.0"
    assert all(r[label_key("label")] == int(r[ID]) % 2 for r in usable)
    assert usable[0][PIXELS].dtype == np.uint8 and usable[0][PIXELS].shape == (3, 16, 16)


def test_quarantine_is_written_even_when_empty(tmp_path, s3_server, s3_bucket):
    with pipeline.Quarantine(str(tmp_path / "q" / "train.parquet"), STORE) as q:
        q.add(QUARANTINE_SCHEMA.empty_table())
    assert q.rows == 0 and pq.read_table(tmp_path / "q" / "train.parquet").schema == QUARANTINE_SCHEMA
    store = StorageConfig(s3_endpoint_url=s3_server)
    table = pa.table(
        {"id": ["a"], "stage": ["preprocess"], "column": ["image"], "error": ["truncated image"], "row": [3]},
        schema=QUARANTINE_SCHEMA,
    )
    uri = f"s3://{s3_bucket}/run/quarantine/val.parquet"
    with pipeline.Quarantine(uri, store) as q:
        q.add(table)
    fs, path = storage.resolve(uri, store)
    assert pq.read_table(path, filesystem=fs).to_pylist() == table.to_pylist()


def test_a_mostly_bad_input_streams_to_the_quarantine_file_in_bounded_memory(tmp_path, monkeypatch):
    """The driver keeps one row group of records and a bounded reason count, never every bad row."""
    monkeypatch.setattr(pipeline, "_QUARANTINE_ROW_GROUP", 1000)
    monkeypatch.setattr(pipeline, "_MAX_REASON_KEYS", 50)
    where = tmp_path / "q.parquet"
    with pipeline.Quarantine(str(where), STORE) as q:
        for chunk in range(30):
            ids = [f"r{chunk}-{i}" for i in range(400)]
            q.add(
                pa.table(
                    {
                        "id": ids,
                        "stage": ["label"] * 400,
                        "column": ["label"] * 400,
                        "error": [f"label '{i}' is not in the label map" for i in ids],
                        "row": range(chunk * 400, chunk * 400 + 400),
                    },
                    schema=QUARANTINE_SCHEMA,
                )
            )
            assert q._pending_rows < 1000 + 400 and len(q.reasons) <= 50
    assert q.rows == 12_000
    written = pq.ParquetFile(where)
    assert written.metadata.num_rows == 12_000 and written.metadata.num_row_groups >= 8
    assert pq.read_table(where).column("id").to_pylist()[-1] == "r29-399"
    with pytest.raises(pipeline.DataQualityError, match="12000 of 12000 rows .* most common: 'label': "):
        pipeline.check_bad_fraction(12_000, q.rows, 0.1, str(where), q)


def test_one_quarantine_record_from_a_numpy_batch_or_an_arrow_table():
    """Actors hold numpy batches of Python objects, finalize reads Arrow: the records are the same, and a
    row whose error is null (neither good nor explained) is quarantined rather than lost. The input
    position comes along where the batch carries it (scoring), else it is null."""
    columns = {
        ID: ["a", "b", 7, None],
        ERROR: ["", "bad", None, "x" * 50],
        ERROR_STAGE: ["", "preprocess", "predict", "label"],
        ERROR_COLUMN: ["", "image", None, "label"],
        ROW: [10, 11, 12, 13],
    }
    records = pipeline.quarantine_records({k: np.array(v, dtype=object) for k, v in columns.items()})
    assert records.schema == QUARANTINE_SCHEMA
    assert records.to_pylist() == [
        {"id": "b", "stage": "preprocess", "column": "image", "error": "bad", "row": 11},
        {"id": "7", "stage": "predict", "column": None, "error": None, "row": 12},
        {"id": None, "stage": "label", "column": "label", "error": "x" * 50, "row": 13},
    ]
    arrow = pa.table({**columns, ID: pa.array([1, 2, 7, None], pa.int64())}).drop_columns([ROW])
    assert pipeline.quarantine_records(arrow).column("id").to_pylist() == ["2", "7", None]
    assert pipeline.quarantine_records(arrow).column("row").to_pylist() == [None] * 3
    assert pipeline.ranked_reasons(records) == [(("", ""), 1), (("image", "bad"), 1), (("label", "x" * 40), 1)]


def test_each_reason_is_shown_by_its_first_record_even_one_without_an_id():
    """``mmray validate-data`` names one row per reason: the first, its whole error, a null id kept."""
    records = pa.table(
        {
            "id": [None, "b", "c", "d"],
            "stage": ["label", "label", "preprocess", "preprocess"],
            "column": ["label", "label", "image", "image"],
            "error": ["x" * 40 + "1", "x" * 40 + "2", "truncated image", "truncated image"],
            "row": [0, 1, 2, 3],
        },
        schema=QUARANTINE_SCHEMA,
    )
    assert pipeline.reason_counts(records) == {("label", "x" * 40): 2, ("image", "truncated image"): 2}
    assert pipeline.reason_examples(records) == {
        ("label", "x" * 40): ("label", None, "x" * 40 + "1"),
        ("image", "truncated image"): ("preprocess", "c", "truncated image"),
    }
    counts = Counter(pipeline.reason_counts(records.slice(2))) + Counter(pipeline.reason_counts(records.slice(0, 2)))
    assert pipeline.ranked_reasons(counts) == pipeline.ranked_reasons(records)  # summed over batches


def test_bad_fraction_aborts_naming_the_share_the_reasons_and_the_file():
    quarantine = pa.table(
        {
            "id": ["a", "b", "c"],
            "stage": ["preprocess"] * 3,
            "column": ["image", "image", "text"],
            "error": ["truncated image", "truncated image", "missing text"],
        }
    )
    pipeline.check_bad_fraction(30, 3, 0.1, "/runs/r/quarantine/train.parquet", quarantine)  # exactly 10%: fine
    with pytest.raises(pipeline.DataQualityError) as e:
        pipeline.check_bad_fraction(20, 3, 0.1, "/runs/r/quarantine/train.parquet", quarantine)
    assert str(e.value) == (
        "3 of 20 rows (15.0%) were quarantined, above data.max_bad_fraction=0.1; most common: "
        "'image': truncated image (2), 'text': missing text (1); see /runs/r/quarantine/train.parquet "
        "(columns id, stage, column, error)"
    )
