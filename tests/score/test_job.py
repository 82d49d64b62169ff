"""The scoring job's decisions around the lease, without Ray: an empty input commits without scoring."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import load_config
from mmray.data.synthetic import SCHEMA
from mmray.score import commit, job
from tests.score.commit.conftest import stage_run


class NoLease:
    """A writer that ignores leases (an older mmray, or one whose lease was broken while it worked)."""

    uri = "none"

    def check(self) -> None:
        pass


@pytest.fixture
def empty_input(tmp_path) -> str:
    (tmp_path / "in").mkdir()
    pq.write_table(SCHEMA.empty_table(), tmp_path / "in" / "part-00000.parquet")
    return str(tmp_path / "in")


def test_a_commit_that_lands_while_scoring_is_never_replaced(tiny_checkpoint, empty_input, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    target = commit.Target(out, {"date": "d1"})
    real_finalize, foreign = job.finalize, {}

    def finalize_while_another_model_commits(*args, **kwargs):
        st, manifest, success = stage_run(target, [2])
        commit.publish(st, manifest, success, NoLease())
        foreign["run_id"] = st.run_id
        return real_finalize(*args, **kwargs)

    monkeypatch.setattr(job, "finalize", finalize_while_another_model_commits)
    with pytest.raises(
        commit.ConcurrentCommitError,
        match=r"date=d1 changed while this run was scoring \(committed "
        r"run None -> [0-9a-f]{12}\); nothing was committed",
    ):
        job.run_scoring(load_config(None), str(tiny_checkpoint), empty_input, out, {"date": "d1"})
    assert commit.committed_run(target)["run_id"] == foreign["run_id"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["date=d1"]  # staging and lease gone


def test_a_run_that_finds_the_lease_held_does_nothing(tiny_checkpoint, empty_input, tmp_path):
    out = str(tmp_path / "out")
    target = commit.Target(out, {"date": "d1"})
    with commit.lease(target):
        with pytest.raises(commit.LeaseHeldError, match=r"date=d1 is being scored by another run \(pid \d+ on host"):
            job.run_scoring(load_config(None), str(tiny_checkpoint), empty_input, out, {"date": "d1"})
    assert not (tmp_path / "out").exists() or sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    result = job.run_scoring(load_config(None), str(tiny_checkpoint), empty_input, out, {"date": "d1"})
    assert result["status"] == "committed" and result["rows_in"] == 0


def test_reordered_partition_keys_are_already_scored(tiny_checkpoint, empty_input, tmp_path):
    out = str(tmp_path / "out")
    first = job.run_scoring(load_config(None), str(tiny_checkpoint), empty_input, out, {"a": "1", "b": "2"})
    again = job.run_scoring(load_config(None), str(tiny_checkpoint), empty_input, out, {"b": "2", "a": "1"})
    assert first["status"] == "committed" and again["status"] == "already scored"
    assert again["run_id"] == first["run_id"] and again["output"] == first["output"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a=1"]


def test_scoring_progress_counts_the_rows_of_finished_part_files(tmp_path, capsys):
    import pyarrow as pa
    from pyarrow import fs as pafs

    stage = commit.Staging(
        commit.Target(str(tmp_path / "out")),
        "run1",
        pafs.LocalFileSystem(),
        str(tmp_path / "st"),
        str(tmp_path / "out"),
    )
    progress = job.ScoringProgress(stage, total=300)
    progress.poll()  # nothing written yet: nothing to say
    (tmp_path / "st" / "_raw").mkdir(parents=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(120)]}), tmp_path / "st" / "_raw" / "a.parquet")
    (tmp_path / "st" / "_raw" / "b.parquet").write_bytes(b"PAR1 still being written")
    progress.poll()
    progress.poll()  # unchanged: no new line
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmray score: scored 120/300 rows (40%)  ") and " ETA " in lines[0]


def test_on_a_terminal_scoring_progress_is_one_line_with_a_bar_rewritten_in_place(tmp_path, capsys, monkeypatch):
    import sys

    import pyarrow as pa
    from pyarrow import fs as pafs

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    stage = commit.Staging(
        commit.Target(str(tmp_path / "out")),
        "run1",
        pafs.LocalFileSystem(),
        str(tmp_path / "st"),
        str(tmp_path / "out"),
    )
    progress = job.ScoringProgress(stage, total=200)
    (tmp_path / "st" / "_raw").mkdir(parents=True)
    for name, rows in (("a", 50), ("b", 150)):
        pq.write_table(
            pa.table({"id": [f"{name}{i}" for i in range(rows)]}), tmp_path / "st" / "_raw" / f"{name}.parquet"
        )
        progress.poll()
    first, last = capsys.readouterr().err.split("\r")[1:]
    assert first.startswith("mmray score: scored 50/200 rows (25%)") and first.endswith(f"[{'#' * 6}{'-' * 18}]\033[K")
    assert last.startswith("mmray score: scored 200/200 rows (100%)") and last.endswith(f"[{'#' * 24}]\033[K\n")


def test_a_quarantine_written_without_input_positions_keeps_its_rows_and_says_so(
    tiny_checkpoint, empty_input, tmp_path, capsys
):
    """A commit from before positions were recorded: ``--retry-quarantined`` cannot find its rows, so
    they stay quarantined (nothing is lost or scored twice) and the run says what to do instead."""
    out = str(tmp_path / "out")
    first = job.run_scoring(load_config(None), str(tiny_checkpoint), empty_input, out)
    old = pa.table(
        {
            "id": ["a", "b"],
            "stage": ["preprocess", "preprocess"],
            "column": ["image_uri", "image_uri"],
            "error": ["image fetch failed: s3://b/a.png: timed out", "invalid image URI: http://x"],
        }
    )
    pq.write_table(old, tmp_path / "out" / commit.QUARANTINE_FILE)
    again = job.run_scoring(load_config(None), str(tiny_checkpoint), empty_input, out, retry_quarantined=True)
    assert again["status"] == "nothing to retry" and again["run_id"] == first["run_id"]
    assert (
        f"warning: 1 quarantined rows are not retried: run {first['run_id']}'s quarantine does not record "
        "their input position" in capsys.readouterr().err
    )
