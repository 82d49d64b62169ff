"""Finalizing the raw scored stream (no Ray): sized part files, lineage, quarantine, --evaluate metrics."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmray.checkpoint import load_info, load_model, model_id
from mmray.config import StorageConfig
from mmray.data.schema import ATTENTION_MASK, IMAGE, INPUT_IDS, PIXELS, QUARANTINE_SCHEMA, TEXT, mask_key
from mmray.data.synthetic import make_rows
from mmray.metrics import MetricAccumulator, per_row_loss
from mmray.score import commit
from mmray.score.finalize import finalize, lineage_schema
from mmray.score.label_metrics import LabelMetrics
from mmray.score.predictor import Predictor, output_schema
from tests.score.conftest import CLASSES, TASK
from tests.score.test_predictor import preprocessed

SCORED_AT = dt.datetime(2024, 5, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def stage_raw(tmp_path, ckpt, batches: list[dict[str, list]], evaluate: bool = False) -> commit.Staging:
    """Writes predictor outputs into ``<staging>/_raw`` the way Ray's write does: one file per block."""
    st = commit.open_staging(commit.Target(str(tmp_path / "out")), "a1" * 6)
    st.fs.create_dir(st.raw, recursive=True)
    predict = Predictor(str(ckpt), StorageConfig(), evaluate=evaluate)
    for i, rows in enumerate(batches):
        out = predict(preprocessed(ckpt, rows, label_tasks=[TASK] if evaluate else ()))
        pq.write_table(pa.table({k: pa.array(list(v)) for k, v in out.items()}), f"{st.raw}/blk-{i}.parquet")
    return st


def test_rows_are_cut_into_files_of_exactly_rows_per_file_with_lineage(tmp_path, tiny_checkpoint):
    first, second = make_rows(7, seed=1, id_prefix="a"), make_rows(6, seed=2, id_prefix="b")
    first["image"][0], first["text"][0] = b"junk", None
    st = stage_raw(tmp_path, tiny_checkpoint, [first, second])

    result = finalize(st, output_schema([TASK]), "m" * 16, SCORED_AT, rows_per_file=5)

    assert [(f["name"], f["rows"]) for f in result.files] == [
        ("part-00000.parquet", 5),
        ("part-00001.parquet", 5),
        ("part-00002.parquet", 2),
    ]
    assert result.rows_raw == 13 and result.rows_scored == 12
    assert result.quarantine.to_pylist() == [
        {
            "id": first["id"][0],
            "stage": "preprocess",
            "column": "image",
            "error": result.quarantine.column("error")[0].as_py(),
            "row": None,  # these raw rows come from a numpy batch without input positions
        }
    ]
    parts = [pq.read_table(st.file(f["name"])) for f in result.files]
    assert all(p.schema == lineage_schema(output_schema([TASK])) for p in parts)
    table = pa.concat_tables(parts)
    assert sorted(table.column("id").to_pylist()) == sorted(first["id"][1:] + second["id"])
    assert set(table.column("model_id").to_pylist()) == {"m" * 16}
    assert set(table.column("run_id").to_pylist()) == {st.run_id}
    assert set(table.column("scored_at").to_pylist()) == {SCORED_AT}
    assert pq.read_table(st.file(commit.QUARANTINE_FILE)).num_rows == 1


def test_no_rows_at_all_gives_no_files_and_an_empty_quarantine(tmp_path, tiny_checkpoint):
    st = commit.open_staging(commit.Target(str(tmp_path / "out")), "b2" * 6)
    result = finalize(st, output_schema([TASK]), "m" * 16, SCORED_AT, rows_per_file=5)
    assert result.files == [] and result.rows_raw == 0
    assert pq.read_table(st.file(commit.QUARANTINE_FILE)).schema == QUARANTINE_SCHEMA


def test_evaluate_metrics_equal_a_direct_metric_accumulation(tmp_path, tiny_checkpoint):
    rows = make_rows(12, seed=9)
    rows["label"][0] = None  # scored, not evaluated
    rows["image"][1], rows["text"][1] = b"junk", None  # quarantined, not evaluated
    st = stage_raw(tmp_path, tiny_checkpoint, [rows], evaluate=True)
    info = load_info(tiny_checkpoint)

    evaluation = LabelMetrics(info.tasks, {})
    result = finalize(st, output_schema([TASK]), model_id(tiny_checkpoint), SCORED_AT, 100, evaluation)

    batch = preprocessed(tiny_checkpoint, {k: v[2:] for k, v in rows.items()})
    model = load_model(tiny_checkpoint)
    with torch.no_grad():
        logits = model(
            {
                k: torch.from_numpy(np.ascontiguousarray(batch[k]))
                for k in (INPUT_IDS, ATTENTION_MASK, PIXELS, mask_key(IMAGE), mask_key(TEXT))
            }
        )["logits"]
    target = torch.tensor([CLASSES.index(v) for v in rows["label"][2:]])
    expected = MetricAccumulator([TASK])
    expected.update(logits, {"label": target}, float(per_row_loss(TASK, logits["label"], target).sum()))
    want = expected.compute()

    assert result.rows_scored == 11 and result.metrics["rows"] == 10 and result.metrics["rows_unlabeled"] == 1
    for key in ("accuracy", "macro_f1", "label/accuracy"):
        assert result.metrics[key] == pytest.approx(want[key])
    assert result.metrics["loss"] == pytest.approx(want["loss"], rel=1e-5)
    scored = pq.read_table(st.file("part-00000.parquet"))
    assert scored.column_names == lineage_schema(output_schema([TASK])).names  # hidden columns never committed
