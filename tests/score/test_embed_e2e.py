"""``mmray embed`` end to end on the session's trained checkpoint: one row of vectors per usable input
row, a null vector where a row lacks that modality, every other row quarantined, committed once.

Both runs go through ``cli.main`` in this process, which keeps the session's Ray (an interpreter
start less per run; the subprocess path is the score tests').
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray import cli
from mmray.checkpoint import open_checkpoint
from mmray.config import StorageConfig
from mmray.data.schema import IMAGE, TEXT
from mmray.data.synthetic import SCHEMA, make_rows
from mmray.score import commit
from mmray.score.predictor import Predictor
from tests.score.test_predictor import preprocessed

pytestmark = pytest.mark.integration

ROWS, BAD, NO_TEXT = 40, (0, 7), (3, 12, 25)  # undecodable image and no text; text missing, image fine


def embed(args: list[str], capsys) -> dict:
    """``mmray embed ARGS`` in this process; its final JSON line (exit 0 asserted)."""
    capsys.readouterr()
    code = cli.main(["embed", *args, "score.rows_per_file=16"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_embed_writes_each_rows_vectors_once_and_quarantines_the_rest(trained, tmp_path, capsys):
    rows = make_rows(ROWS, seed=21, id_prefix="e")
    for i in BAD:
        rows["image"][i], rows["text"][i] = b"not an image", None
    for i in NO_TEXT:
        rows["text"][i] = None
    source, out = tmp_path / "in", tmp_path / "vectors"
    source.mkdir()
    table = pa.table(rows, schema=SCHEMA)
    pq.write_table(table.slice(0, 20), source / "part-00000.parquet")
    pq.write_table(table.slice(20), source / "part-00001.parquet")
    args = ["--checkpoint", trained["checkpoint"], "--input", str(source), "--output", str(out)]

    result = embed(args, capsys)
    assert result["status"] == "committed"
    assert (result["rows_in"], result["rows_scored"], result["rows_quarantined"]) == (ROWS, ROWS - len(BAD), len(BAD))

    committed = commit.read_committed(commit.Target(str(out)))
    assert committed.schema.field("fused").type == pa.list_(pa.float32())
    assert committed.schema.names[:4] == ["id", "fused", IMAGE, TEXT]
    got = {r["id"]: r for r in committed.to_pylist()}
    assert len(got) == committed.num_rows  # one row per id
    good = [rows["id"][i] for i in range(ROWS) if i not in BAD]
    assert sorted(got) == sorted(good)
    quarantine = pq.read_table(out / commit.QUARANTINE_FILE)
    assert sorted(quarantine["id"].to_pylist()) == sorted(rows["id"][i] for i in BAD)
    assert set(quarantine["stage"].to_pylist()) == {"preprocess"}

    with open_checkpoint(trained["checkpoint"]) as opened:
        model = opened.load_model()
    dims = {"fused": model.fusion.out_dim, IMAGE: model.encoders[IMAGE].out_dim, TEXT: model.encoders[TEXT].out_dim}
    for i, row_id in enumerate(rows["id"]):
        if i in BAD:
            continue
        assert {c: len(got[row_id][c]) for c in dims if got[row_id][c] is not None} == {
            c: n for c, n in dims.items() if not (c == TEXT and i in NO_TEXT)
        }
        assert (got[row_id][TEXT] is None) == (i in NO_TEXT)

    # The committed vectors are the model's: what the predictor gives these rows without Ray.
    direct = Predictor(trained["checkpoint"], StorageConfig(), row_kind="embeddings")(
        preprocessed(trained["checkpoint"], rows)
    )
    for j, row_id in enumerate(direct["id"]):
        if row_id in got:
            np.testing.assert_allclose(got[row_id]["fused"], direct["fused"][j], rtol=0, atol=1e-6)
            np.testing.assert_allclose(got[row_id][IMAGE], direct[IMAGE][j], rtol=0, atol=1e-6)

    again = embed(args, capsys)  # exactly once: the rerun commits nothing
    assert again["status"] == "already scored" and again["run_id"] == result["run_id"]
    assert commit.read_committed(commit.Target(str(out))).equals(committed)


def test_embedding_into_a_target_that_holds_predictions_is_refused_and_overwrite_replaces_them(
    trained, tmp_path, capsys
):
    """A commit of the other output is never "already scored": embed refuses a target that holds
    ``mmray score``'s predictions (exit 2, nothing changed), and with --overwrite replaces them."""
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    pq.write_table(pa.table(make_rows(12, seed=22, id_prefix="p"), schema=SCHEMA), source / "part-00000.parquet")
    args = ["--checkpoint", trained["checkpoint"], "--input", str(source), "--output", str(out)]
    capsys.readouterr()
    assert cli.main(["score", *args]) == 0, capsys.readouterr().err[-3000:]
    scored = commit.committed_run(commit.Target(str(out)))
    assert scored["output"] == "score"

    capsys.readouterr()
    assert cli.main(["embed", *args]) == 2
    err = capsys.readouterr().err
    assert "already holds a committed result" in err and "--overwrite" in err, err[-2000:]
    assert commit.committed_run(commit.Target(str(out)))["run_id"] == scored["run_id"]  # untouched
    assert "prediction" in commit.read_committed(commit.Target(str(out))).schema.names

    replaced = embed([*args, "--overwrite"], capsys)
    assert replaced["status"] == "committed" and replaced["rows_scored"] == 12
    now = commit.committed_run(commit.Target(str(out)))
    assert now["output"] == "embed" and now["run_id"] == replaced["run_id"] != scored["run_id"]
    names = commit.read_committed(commit.Target(str(out))).schema.names
    assert "fused" in names and "prediction" not in names
