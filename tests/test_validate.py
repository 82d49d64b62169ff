"""``mmray validate-data``: training's checks, in one process, on a small table with one broken row of
each kind; the exit status says ok / problems / unreadable."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray import cli
from mmray.config import load_config
from mmray.validate import format_report, validate_data
from tests.data.corpus import encoded

OVERRIDES = ["data.text.max_length=8", "data.image.size=16"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """20 good rows over two files, plus: a duplicated id, an undecodable image, a null label, a row
    with neither text nor image."""
    root = tmp_path_factory.mktemp("validate")
    red, blue = encoded((200, 30, 30)), encoded((30, 30, 200))
    rows = [
        {
            "id": f"r{i}",
            "text": f"a {'red' if i % 2 else 'blue'} thing number {i}",
            "image": red if i % 2 else blue,
            "label": "red" if i % 2 else "blue",
        }
        for i in range(20)
    ]
    rows += [
        {"id": "r3", "text": "a red twin", "image": red, "label": "red"},
        {"id": "junk", "text": "a red thing", "image": b"not an image", "label": "red"},
        {"id": "nolabel", "text": "a blue thing", "image": blue, "label": None},
        {"id": "empty", "text": None, "image": None, "label": "blue"},
    ]
    table = pa.Table.from_pylist(
        rows, pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.binary()), ("label", pa.string())])
    )
    (root / "data").mkdir()
    pq.write_table(table.slice(0, 12), root / "data" / "part-0.parquet")
    pq.write_table(table.slice(12), root / "data" / "part-1.parquet")
    (root / "good").mkdir()
    pq.write_table(table.slice(0, 20), root / "good" / "part-0.parquet")
    return root


def test_reports_every_kind_of_problem_with_trainings_reasons(dataset):
    r = validate_data(str(dataset / "data"), load_config(None, OVERRIDES))
    assert [f["rows"] for f in r["files"]] == [12, 12] and r["rows"] == r["rows_checked"] == 24
    assert not r["ok"] and r["schema_problems"] == []
    reasons = {x["example_id"]: (x["stage"], x["column"], x["rows"]) for x in r["quarantine"]["reasons"]}
    assert reasons == {
        "junk": ("preprocess", "image", 1),
        "nolabel": ("label", "label", 1),
        "empty": ("preprocess", "text,image", 1),
    }
    assert r["quarantine"]["rows"] == 3
    assert r["duplicate_ids"] == {"ids": 1, "rows": 2, "examples": ["r3"]}
    assert r["labels"] == {"label": {"red": 12, "blue": 11, "None": 1}}
    assert r["images"]["format"] == {"PNG": 22} and r["images"]["decode_errors"] == 1
    assert 0 < r["text_tokens"]["p50"] <= r["text_tokens"]["max"] <= 8
    assert r["missing"] == {"text": 0.0, "image": 0.0}  # the row missing both is quarantined instead
    table = format_report(r)
    for expected in (
        "schema       ok",
        "3 rows (12.5%",
        "label/label: ",
        "preprocess/image: ",
        "(e.g. id junk)",
        "1 duplicated (e.g. r3)",
        "result       PROBLEMS: 3 of 24 rows would be quarantined",
    ):
        assert expected in table, table


def test_exit_status_is_0_ok_1_problems_2_unreadable(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMRAY_VERBOSE", "0")
    assert cli.main(["validate-data", str(dataset / "good"), *OVERRIDES]) == 0
    assert "result       OK" in capsys.readouterr().out
    assert cli.main(["validate-data", "--json", str(dataset / "data"), *OVERRIDES]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quarantine"]["rows"] == 3
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert cli.main(["validate-data", str(tmp_path / "bad.parquet")]) == 2
    assert "bad.parquet is not a readable Parquet file" in capsys.readouterr().err
    assert cli.main(["validate-data", str(tmp_path / "nothing-here")]) == 2


def test_a_schema_problem_is_reported_with_trainings_message(dataset, capsys, monkeypatch):
    monkeypatch.setenv("MMRAY_VERBOSE", "0")
    assert cli.main(["validate-data", str(dataset / "good"), "data.label_column=lable", *OVERRIDES]) == 1
    out = capsys.readouterr().out
    assert "column 'lable' is missing in " in out and "did you mean 'label'?" in out
    # data to score needs no label column
    assert cli.main(["validate-data", "--unlabeled", str(dataset / "good"), "data.label_column=lable", *OVERRIDES]) == 0


def test_tokens_per_row_are_counted_with_the_configured_segmenter(tmp_path):
    from mmray.data.tasks import make_task_dataset

    data = make_task_dataset("match", tmp_path, rows=60, seed=0, files_per_split=1, lang="zh")["train"]["path"]
    tokens = {}
    for segmenter in ("none", "jieba"):
        cfg = load_config(None, [f"data.text.segmenter={segmenter}"])
        tokens[segmenter] = validate_data(data, cfg)["text_tokens"]["p50"]
    assert tokens["jieba"] < tokens["none"]  # whole words, not characters
