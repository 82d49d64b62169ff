"""Targets: partition values that become safe Hive paths, or are refused before any path is built."""

from __future__ import annotations

import os

import pytest

from mmray.score import commit
from mmray.score.commit import Target


@pytest.mark.parametrize(
    "partition", [{"date": "2024-05-01"}, {"region": "eu_west-1", "hour": "07"}, {"d": "2024-05-01T00:00"}]
)
def test_valid_partitions_become_hive_paths_with_sorted_keys(tmp_path, partition):
    target = Target(str(tmp_path / "out"), partition)
    assert target.uri == os.path.join(tmp_path, "out", *(f"{k}={partition[k]}" for k in sorted(partition)))


def test_partition_key_order_is_one_target_and_one_identity(tmp_path):
    ab, ba = Target(str(tmp_path / "out"), {"a": "1", "b": "2"}), Target(str(tmp_path / "out"), {"b": "2", "a": "1"})
    assert ab.uri == ba.uri == os.path.join(tmp_path, "out", "a=1", "b=2")
    assert commit.run_identity([], "m", {}, ab.partition) == commit.run_identity([], "m", {}, {"b": "2", "a": "1"})


BAD_VALUES = {  # partition value -> what the error names
    "../../etc": "'/'",
    "..": "'..'",
    "a..b": "'..'",
    "2024/05": "'/'",
    "a\\b": "'\\\\'",
    "x\ny": "'\\n'",
    "x\x00": "'\\x00'",
    "a=b": "'='",
    "2024-*": "'*'",
    "": "non-empty",
}
BAD_KEYS = ("_date", "da/te", "")


@pytest.mark.parametrize(
    "partition, fragment",
    [*(({"date": v}, f) for v, f in BAD_VALUES.items()), *(({k: "1"}, "invalid partition key") for k in BAD_KEYS)],
)
def test_invalid_partitions_are_refused_before_any_path_is_built(partition, fragment):
    with pytest.raises(ValueError) as e:
        Target("/tmp/never-created", partition)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("inp", "out", "message"),
    [
        ("in", "in/preds", r"--output .*in/preds is inside the input .*in: a rerun would read"),
        ("in/part", "in", r"--input .*in/part is inside the output .*in: publishing would replace the input"),
        ("in", "in", r"--output .*in is the input"),
        ("in", "link/preds", r"--output .*link/preds is inside the input"),  # one directory, two spellings
    ],
)
def test_an_output_inside_the_input_or_around_it_is_refused(tmp_path, inp, out, message):
    (tmp_path / "in" / "part").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "in")
    with pytest.raises(ValueError, match=message):
        commit.check_apart(Target(str(tmp_path / out)), str(tmp_path / inp))


def test_outputs_beside_the_input_are_apart(tmp_path):
    commit.check_apart(Target(str(tmp_path / "input-preds")), str(tmp_path / "input"))  # a prefix, not a parent
    commit.check_apart(Target(str(tmp_path / "preds"), {"date": "d1"}), str(tmp_path / "in" / "a.parquet"))
    commit.check_apart(Target("s3://bucket/in/preds"), str(tmp_path / "in"))  # another filesystem
    with pytest.raises(ValueError, match="is inside the input s3://bucket/in"):
        commit.check_apart(Target("s3://bucket/in/preds"), "s3://bucket/in/")


def test_outputs_publishing_could_never_replace_are_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(commit.OutputExistsError, match=r"afile is a file; the output must be a directory"):
        commit.check_location(Target(str(tmp_path / "afile")))
    with pytest.raises(commit.OutputExistsError, match=r"afile/out/date=d1 is inside .*afile, which is a file"):
        commit.check_location(Target(str(tmp_path / "afile" / "out"), {"date": "d1"}))
    (tmp_path / "committed").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "committed")
    with pytest.raises(commit.OutputExistsError, match=r"link is a symbolic link; give the directory it points to"):
        commit.check_location(Target(str(tmp_path / "link")))
    with pytest.raises(commit.OutputExistsError, match=r"/proc is a mount point"):
        commit.check_location(Target("/proc"))
    commit.check_location(Target(str(tmp_path / "link"), {"date": "d1"}))  # inside a linked directory: fine
    commit.check_location(Target(str(tmp_path / "new" / "out")))  # absent: fine
    commit.check_location(Target("s3://bucket/out"))
