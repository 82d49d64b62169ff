"""The Ray Data wiring on the session's Ray: read -> preprocessing pool -> usable rows + quarantine."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import DataConfig, ImageConfig, PreprocessConfig, StorageConfig, TextConfig
from mmray.data import pipeline, storage
from mmray.data import schema as S
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
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
    table = pa.table({"id": pa.array(ids, pa.int64()), "text": ["a cat"] * n, "image": images,
                      "label": pa.array(labels, pa.int64())})  # fmt: skip
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
def test_every_row_comes_out_once_usable_or_quarantined(processed):
    quarantine = pipeline.quarantine_table(processed)
    assert quarantine.schema == S.QUARANTINE_SCHEMA
    records = sorted(quarantine.to_pylist(), key=lambda r: str(r["id"]))
    assert records == [
        {"id": "5", "stage": "label", "column": "label", "error": "null label in column 'label'"},
        {"id": "7", "stage": "preprocess", "column": "image", "error": records[1]["error"]},
        {"id": None, "stage": "preprocess", "column": "id", "error": "null id"},
    ]
    assert records[1]["error"].startswith("unknown or unsupported image format")
    usable = pipeline.usable_rows(processed).take_all()
    assert len(usable) + quarantine.num_rows == processed.count() == 40
    assert sorted(int(r[S.ID]) for r in usable) == [i for i in range(40) if i not in (3, 5, 7)]  # "8", not "8.0"
    assert all(r[S.label_key("label")] == int(r[S.ID]) % 2 for r in usable)
    assert usable[0][S.PIXELS].dtype == np.uint8 and usable[0][S.PIXELS].shape == (3, 16, 16)


def test_quarantine_is_written_even_when_empty(tmp_path, s3_server, s3_bucket):
    pipeline.write_quarantine(S.QUARANTINE_SCHEMA.empty_table(), str(tmp_path / "q" / "train.parquet"), STORE)
    assert pq.read_table(tmp_path / "q" / "train.parquet").schema == S.QUARANTINE_SCHEMA
    store = StorageConfig(s3_endpoint_url=s3_server)
    table = pa.table({"id": ["a"], "stage": ["preprocess"], "column": ["image"], "error": ["truncated image"]})
    uri = f"s3://{s3_bucket}/run/quarantine/val.parquet"
    pipeline.write_quarantine(table, uri, store)
    fs, path = storage.resolve(uri, store)
    assert pq.read_table(path, filesystem=fs).to_pylist() == table.to_pylist()


def test_bad_fraction_aborts_naming_the_share_the_reasons_and_the_file():
    quarantine = pa.table({"id": ["a", "b", "c"], "stage": ["preprocess"] * 3, "column": ["image", "image", "text"],
                           "error": ["truncated image", "truncated image", "missing text"]})  # fmt: skip
    pipeline.check_bad_fraction(30, 3, 0.1, "/runs/r/quarantine/train.parquet", quarantine)  # exactly 10%: fine
    with pytest.raises(pipeline.DataQualityError) as e:
        pipeline.check_bad_fraction(20, 3, 0.1, "/runs/r/quarantine/train.parquet", quarantine)
    assert str(e.value) == (
        "3 of 20 rows (15.0%) were quarantined, above data.max_bad_fraction=0.1; most common: "
        "'image': truncated image (2), 'text': missing text (1); see /runs/r/quarantine/train.parquet "
        "(columns id, stage, column, error)"
    )
