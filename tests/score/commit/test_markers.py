"""Markers: which targets may be replaced, where a rejected run's quarantine goes, and readers that never
mix two publishes."""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.data import schema
from mmray.score import commit
from mmray.score.commit import Target
from tests.score.commit.conftest import publish, stage_run, visible_parquet


def test_rejected_quarantine_never_touches_a_committed_result(tmp_path):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    rows = {"id": ["x"], "stage": ["preprocess"], "column": ["image"], "error": ["boom"], "row": [0]}
    bad = pa.table(rows, schema=schema.QUARANTINE_SCHEMA)
    first = commit.write_rejected_quarantine(target, bad, "e" * 12)
    assert first == os.path.join(target.uri, "_quarantine", "part-00000.parquet")
    assert commit.committed_run(target) is None and visible_parquet(target) == []

    st, manifest, success = stage_run(target, [2], bad=2)
    publish(st, manifest, success)
    second = commit.write_rejected_quarantine(target, bad, "f" * 12)
    assert second == os.path.join(target.uri, "_quarantine", f"_rejected-{'f' * 12}.parquet")
    assert pq.read_table(os.path.join(target.uri, commit.QUARANTINE_FILE)).num_rows == 2  # the committed one
    assert commit.committed_run(target)["run_id"] == st.run_id


def test_a_target_holding_foreign_data_is_never_replaced(tmp_path):
    user_data = tmp_path / "warehouse"
    (user_data / "events").mkdir(parents=True)
    (user_data / "report.csv").write_text("a,b\n")
    with pytest.raises(commit.OutputExistsError, match=r"holds data mmray did not write \(events, report.csv\)"):
        commit.check_replaceable(Target(str(user_data)))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(commit.OutputExistsError, match="is a file"):
        commit.check_replaceable(Target(str(tmp_path / "afile")))

    target = Target(str(tmp_path / "out"), {"date": "d1"})
    commit.check_replaceable(target)  # absent
    os.makedirs(os.path.join(target.uri, "_quarantine"))
    commit.check_replaceable(target)  # a rejected run's quarantine only
    st, manifest, success = stage_run(target, [2])
    publish(st, manifest, success)
    commit.check_replaceable(target)  # a commit
    with pytest.raises(commit.OutputExistsError, match="date=d1"):
        commit.check_replaceable(Target(str(tmp_path / "out")))  # the root of partitions is not a commit


def test_a_target_with_only_hidden_entries_is_user_data_and_never_replaced(tmp_path):
    target = Target(str(tmp_path / "home"))
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "id_ed25519").write_text("secret")
    (tmp_path / "home" / "_archive").mkdir()
    with pytest.raises(commit.OutputExistsError, match=r"holds data mmray did not write \(.ssh, _archive\)"):
        commit.check_replaceable(target)
    os.makedirs(tmp_path / "empty")
    commit.check_replaceable(Target(str(tmp_path / "empty")))  # empty: fine


def test_read_committed_never_mixes_two_publishes(any_target, monkeypatch):
    first, manifest, success = stage_run(any_target, [2, 2, 2])
    publish(first, manifest, success)
    second, manifest2, success2 = stage_run(any_target, [2, 2, 2])
    real_read = pq.read_table
    calls = []

    def read_while_another_run_publishes(*args, **kwargs):
        calls.append(args[0])
        table = real_read(*args, **kwargs)
        if len(calls) == 1:
            publish(second, manifest2, success2)  # lands after the reader picked the first manifest
        return table

    monkeypatch.setattr(pq, "read_table", read_while_another_run_publishes)
    table = commit.read_committed(any_target)
    assert table.column("run_id").to_pylist() == [second.run_id] * 6 and len(calls) > 3


def test_a_target_inside_or_around_another_commit_is_refused_naming_both(tmp_path):
    outer = Target(str(tmp_path / "out"))
    st, manifest, success = stage_run(outer, [2])
    publish(st, manifest, success)
    inner = Target(str(tmp_path / "out"), {"date": "d1"})
    with pytest.raises(
        commit.OutputExistsError,
        match=rf"{re.escape(inner.uri)} is inside {re.escape(outer.uri)}, which holds a commit",
    ):
        commit.check_replaceable(inner)
    deeper = Target(str(tmp_path / "out" / "sub"), {"date": "d1"})  # two levels down: still inside
    with pytest.raises(commit.OutputExistsError, match=rf"is inside {re.escape(outer.uri)}"):
        commit.check_nesting(deeper)

    around = Target(str(tmp_path / "all"))
    st, manifest, success = stage_run(Target(str(tmp_path / "all" / "team" / "daily"), {"date": "d1"}), [2])
    publish(st, manifest, success)
    committed = os.path.join(str(tmp_path), "all", "team", "daily", "date=d1")
    with pytest.raises(
        commit.OutputExistsError,
        match=rf"{re.escape(around.uri)} holds {re.escape(committed)}, a committed scoring output",
    ):
        commit.check_replaceable(around)
    commit.check_nesting(Target(str(tmp_path / "all" / "team" / "daily"), {"date": "d2"}))  # a sibling partition


def test_staging_and_quarantines_are_not_commits_around_a_target(tmp_path):
    target = Target(str(tmp_path / "out"), {"date": "d1"})
    (tmp_path / "out" / "_staging-0123456789ab-x").mkdir(parents=True)
    (tmp_path / "out" / "_staging-0123456789ab-x" / "_SUCCESS").write_text("{}")
    (tmp_path / "out" / "_quarantine").mkdir()
    commit.check_nesting(target)
    commit.check_nesting(Target(str(tmp_path / "out")))
