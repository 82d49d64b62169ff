"""Bad input end to end through the real CLI: every broken kind is quarantined with its reason, the
counts reconcile in the final JSON line, metrics and the scoring marker, and mostly-garbage input
aborts with a clear error after the quarantine was written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from mmray.data.slices import SlicePreprocessor
from tests.data.corpus import KEPT_PARTIAL, NULL_ID, QUARANTINED, UNKNOWN_LABEL, make_corpus
from tests.helpers import leaks, ray_log_files, run_cli, run_cli_here
from tests.hostile.corpus import ACCESS_KEY, LABEL_ATTACKS, SECRET, make_hostile
from tests.hostile.corpus import KEPT as HOSTILE_KEPT

pytestmark = pytest.mark.integration

FAST = ["train.epochs=2", "train.num_workers=1", "data.image_uri_column=image_uri"]
ACTOR_NAME = ":actor_name:"  # how Ray heads an actor's worker log (ray_constants.LOG_PREFIX_ACTOR_NAME)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    return {
        "root": root,
        "train": make_corpus(root / "train", good=160, seed=1),
        "val": make_corpus(root / "val", good=100, seed=2, unknown_label=True),
        "test": make_corpus(root / "test", good=80, seed=3, with_labels=False),
    }


def roots(root: Path) -> str:
    """Local image URIs are read only under data.image_uri_roots (none by default)."""
    return f"data.image_uri_roots=[{root}]"


@pytest.fixture(scope="module")
def trained(corpus, ray_address) -> dict:
    proc = run_cli_here(
        [
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.train={corpus['train']['path']}",
            f"data.val={corpus['val']['path']}",
            f"train.storage_path={corpus['root'] / 'runs'}",
            *FAST,
            roots(corpus["root"]),
        ],
    )
    return proc.json


def _records(path: Path | str) -> dict:
    table = pads.dataset(str(path), format="parquet").to_table()
    assert table.column_names == ["id", "stage", "column", "error", "row"]
    return {r["id"]: r for r in table.to_pylist()}


def _assert_quarantine(records: dict, extra: dict) -> None:
    expected = {**QUARANTINED, **extra}
    assert set(records) == set(expected) | {None}, "every broken row, and nothing else, is quarantined"
    for row_id, (stage, column, reason) in expected.items():
        got = records[row_id]
        assert (got["stage"], got["column"]) == (stage, column), got
        assert got["error"].startswith(reason), got
    _, stage, column, reason = NULL_ID
    assert (records[None]["stage"], records[None]["column"], records[None]["error"]) == (stage, column, reason)


def test_training_quarantines_every_broken_kind_and_counts_reconcile(trained, corpus):
    data = trained["metrics"]["data"]
    for split in ("train", "val"):
        counts, made = data[split], corpus[split]
        assert counts["rows_in"] == made["rows"]
        assert counts["rows_quarantined"] == made["bad"]
        assert counts["rows_used"] + counts["rows_quarantined"] == counts["rows_in"]
    run_dir = Path(trained["run_dir"])
    assert json.loads((run_dir / "metrics.json").read_text())["data"] == data
    _assert_quarantine(_records(run_dir / "quarantine" / "train.parquet"), {})
    unknown = {UNKNOWN_LABEL[0]: UNKNOWN_LABEL[1:]}
    _assert_quarantine(_records(run_dir / "quarantine" / "val.parquet"), unknown)


def test_scoring_quarantines_bad_rows_and_scores_partial_ones(trained, corpus, ray_address):
    out = corpus["root"] / "preds"
    test = corpus["test"]
    res = run_cli_here(
        [
            "score",
            "--checkpoint",
            trained["checkpoint"],
            "--input",
            test["path"],
            "--output",
            str(out),
            roots(corpus["root"]),
        ],
    ).json  # the image URI column comes from the checkpoint
    assert res["rows_in"] == test["rows"]
    assert res["rows_quarantined"] == test["bad"]
    assert res["rows_scored"] + res["rows_quarantined"] == res["rows_in"]
    scored = pads.dataset(str(out), format="parquet").to_table(columns=["id", "prediction"]).to_pylist()
    assert sorted(r["id"] for r in scored) == sorted(test["good_ids"])  # partial rows too: by mask
    assert set(KEPT_PARTIAL) <= {r["id"] for r in scored}
    quarantine = {k: v for k, v in QUARANTINED.items() if k != "bad-null-label"}
    records = {r["id"]: r for r in pq.read_table(out / "_quarantine").to_pylist()}
    assert set(records) == set(quarantine) | {None}
    for row_id, (stage, column, reason) in quarantine.items():
        assert (records[row_id]["stage"], records[row_id]["column"]) == (stage, column)
        assert records[row_id]["error"].startswith(reason)
    success = json.loads((out / "_SUCCESS").read_text())
    assert (success["rows_in"], success["rows_quarantined"]) == (res["rows_in"], res["rows_quarantined"])


def test_mostly_garbage_aborts_after_writing_the_quarantine(corpus, ray_address, tmp_path):
    garbage = make_corpus(tmp_path / "garbage", good=4, seed=4)
    runs = tmp_path / "runs"
    proc = run_cli_here(
        [
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.train={garbage['path']}",
            f"data.val={corpus['val']['path']}",
            f"train.storage_path={runs}",
            "train.name=garbage",
            *FAST,
            roots(tmp_path),
        ],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert "data.max_bad_fraction=0.1" in message and f"{garbage['bad']} of {garbage['rows']} rows" in message
    assert "most common:" in message
    where = runs / "garbage" / "quarantine" / "train.parquet"
    assert str(where) in message
    assert pq.read_table(where).num_rows == garbage["bad"]


def test_scoring_hostile_rows_scores_or_quarantines_every_row(trained, ray_session, ray_address, tmp_path):
    """The tests/hostile attacks through the real CLI, Ray pools and commit: each attack row is
    quarantined with its reason, every other row scored, the counts add up, and no secret is printed,
    written, or logged by the Ray actors that read the rows."""
    hostile = make_hostile(tmp_path / "hostile", good=160)  # 14 attacks in 179 rows: under max_bad_fraction
    out = tmp_path / "preds"
    before = ray_log_files(ray_session)
    proc = run_cli(
        [
            "score",
            "--checkpoint",
            trained["checkpoint"],
            "--input",
            hostile["input"],
            "--output",
            str(out),
            roots(Path(hostile["root"])),
        ],
        ray_address,
    )
    res = proc.json
    assert res["rows_in"] == hostile["rows"] and res["rows_quarantined"] == len(hostile["quarantined"])
    assert res["rows_scored"] + res["rows_quarantined"] == res["rows_in"]
    records = {r["id"]: r for r in pq.read_table(out / "_quarantine").to_pylist()}
    assert set(records) == set(hostile["quarantined"])
    for row_id, (stage, column, reason) in hostile["quarantined"].items():
        got = records[row_id]
        assert (got["stage"], got["column"]) == (stage, column) and got["error"].startswith(reason), got
    scored = pads.dataset(str(out), format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(scored) == sorted([*hostile["good_ids"], *HOSTILE_KEPT, *LABEL_ATTACKS])  # labels unread
    quarantine_bytes = b"".join(p.read_bytes() for p in (out / "_quarantine").iterdir())
    assert SECRET not in proc.stderr + proc.stdout and SECRET.encode() not in quarantine_bytes
    # The actors that read the rows write their output to Ray's session logs, not to the CLI's: scan the
    # files this run wrote there, having found those actors' own (Ray heads each with its actor's name).
    written = [p for p, size in ray_log_files(ray_session).items() if before.get(p) != size]
    actor = f"{ACTOR_NAME}MapWorker(MapBatches({SlicePreprocessor.__name__}))".encode()
    readers = [p for p in written if actor in p.read_bytes()]
    assert readers, f"no log of the actors that read the rows among {sorted(p.name for p in written)}"
    assert not leaks(written, SECRET, ACCESS_KEY)
