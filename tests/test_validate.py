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
from tests.helpers import run_cli

OVERRIDES = ["data.text.max_length=8", "data.image.size=16"]
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.binary()), ("label", pa.string())])
FORGED = "\nresult       OK (0 problems)"  # what a hostile string would print as mmray's own verdict


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


def test_token_lengths_are_exact_special_tokens_included_truncation_counted(tmp_path):
    """Single-letter words are one WordPiece token each (the trained vocabulary starts from the
    alphabet), so a row of n words is n + 2 tokens with [CLS] and [SEP], cut at max_length 8."""
    red = encoded((200, 30, 30))
    texts = ["a", "a b", "a b c", "a b c d", "a b c d e f g h i j", None]  # 3, 4, 5, 6, 8 (of 12); no text
    rows = [{"id": f"r{i}", "text": t, "image": red, "label": "red"} for i, t in enumerate(texts)]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, SCHEMA), tmp_path / "data" / "part-0.parquet")
    r = validate_data(str(tmp_path / "data"), load_config(None, OVERRIDES))
    assert r["quarantine"]["rows"] == 0 and r["missing"]["text"] == pytest.approx(1 / 6)
    # numpy's linear percentiles of [3, 4, 5, 6, 8]: p90 at index 3.6 is 6 + 0.6 * 2, p99 at 3.96
    assert r["text_tokens"] == pytest.approx(
        {"p50": 5.0, "p90": 7.2, "p99": 7.92, "max": 8.0, "max_length": 8, "truncated": 1 / 5}
    )
    assert "text tokens  p50 5  p90 7.2  p99 7.92  max 8  (max_length 8: 20.0% truncated)" in format_report(r)


def test_tokens_per_row_are_counted_with_the_configured_segmenter(tmp_path):
    from mmray.data.benchmarks import make_task_dataset

    data = make_task_dataset("match", tmp_path, rows=60, seed=0, files_per_split=1, lang="zh")["train"]["path"]
    tokens = {}
    for segmenter in ("none", "jieba"):
        cfg = load_config(None, [f"data.text.segmenter={segmenter}"])
        tokens[segmenter] = validate_data(data, cfg)["text_tokens"]["p50"]
    assert tokens["jieba"] < tokens["none"]  # whole words, not characters


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Terminal escapes in an id (of a row that is quarantined), a label value and a file name."""
    root = tmp_path_factory.mktemp("hostile") / "data"
    root.mkdir()
    red = encoded((200, 30, 30))
    rows = [{"id": f"ok{i}", "text": "a red thing", "image": red, "label": "red"} for i in range(3)]
    rows += [
        {"id": "x\x1b[2J" + FORGED, "text": "a red thing", "image": b"junk", "label": "red"},
        {"id": "v", "text": "a red thing", "image": red, "label": "red\x1b]0;pwned\x07\u202e"},
    ]
    pq.write_table(pa.Table.from_pylist(rows, SCHEMA), root / ("part-\x1b[31m\u2028" + FORGED + ".parquet"))
    return root


def test_nothing_from_the_data_reaches_the_terminal_unescaped(hostile, capsys, monkeypatch):
    proc = run_cli(["validate-data", str(hostile), *OVERRIDES], check=False)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert not any(c in out for c in "\x1b\x07\r\u2028\u202e"), out
    verdicts = [line for line in out.splitlines() if line.startswith("result")]
    assert verdicts == ["result       PROBLEMS: 1 of 5 rows would be quarantined"], out
    assert "(e.g. id x\\x1b[2J\\nresult       OK (0 problems))" in out  # the id, shown escaped
    assert "part-\\x1b[31m\\u2028\\nresult" in out and "red\\x1b]0;pwned\\x07\\u202e 1" in out
    # --json stays exact: json.dumps escapes what a terminal acts on, and the id round-trips
    monkeypatch.setenv("MMRAY_VERBOSE", "0")
    assert cli.main(["validate-data", "--json", str(hostile), *OVERRIDES]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["quarantine"]["reasons"][0]["example_id"] == "x\x1b[2J" + FORGED


def test_nan_and_inf_labels_are_quarantined_not_classes(tmp_path, capsys, monkeypatch):
    """A string label file beside a float one whose NaN and +-inf would otherwise become classes."""
    red = encoded((200, 30, 30))
    strings = [{"id": f"s{i}", "text": "a red thing", "image": red, "label": str(i % 2)} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(strings, SCHEMA), tmp_path / "a.parquet")
    values = [1.0, 0.0, float("nan"), float("inf"), float("-inf")]
    floats = [{"id": f"f{i}", "text": "a red thing", "image": red, "label": v} for i, v in enumerate(values)]
    float_schema = SCHEMA.set(3, pa.field("label", pa.float64()))
    pq.write_table(pa.Table.from_pylist(floats, float_schema), tmp_path / "b.parquet")
    monkeypatch.setenv("MMRAY_VERBOSE", "0")
    assert cli.main(["validate-data", "--json", str(tmp_path), *OVERRIDES]) == 1
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["label_classes"] == {"label": 2}  # the values 1.0 and "1" are one class, NaN and inf none
    assert r["labels"]["label"] == {"0": 4, "1": 4, "nan": 1, "inf": 1, "-inf": 1}
    reasons = {x["example_id"]: (x["stage"], x["column"], x["error"]) for x in r["quarantine"]["reasons"]}
    assert reasons == {
        "f2": ("label", "label", "null label in column 'label'"),
        "f3": ("label", "label", "non-finite label inf in column 'label'"),
        "f4": ("label", "label", "non-finite label -inf in column 'label'"),
    }


def test_flags_and_overrides_come_in_any_order(dataset):
    proc = run_cli(
        ["validate-data", str(dataset / "good"), "--json", *OVERRIDES, "--max-rows", "5", "data.max_bad_fraction=0.5"]
    )
    assert proc.json["rows_checked"] == 5 and proc.json["quarantine"]["max_bad_fraction"] == 0.5
