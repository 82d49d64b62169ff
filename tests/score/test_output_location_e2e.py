"""Output locations that would lose or mix data, through the real ``mmray score`` CLI: a commit inside or
around another commit, and an output inside the input (or around it). Each is refused with exit 2 and
one line naming both locations, before Ray starts, and what was committed stays as it was."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest

from tests.helpers import run_cli, run_cli_here
from tests.score.conftest import write_input

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    return write_input(tmp_path_factory.mktemp("nested") / "in", rows=40, seed=11, prefix="n")


def score(trained: dict, source: str, output: str, *extra: str, ray_address: str, check: bool = True):
    """A new ``mmray score`` process: one that is refused must say so before it joins Ray."""
    args = ["score", "--checkpoint", trained["checkpoint"], "--input", source, "--output", output, *extra]
    return run_cli(args, ray_address, check=check)


def commit_here(trained: dict, source: str, output: str, *extra: str) -> dict:
    """The committed output the refusals are tried against, scored by the CLI in this process."""
    args = ["score", "--checkpoint", trained["checkpoint"], "--input", source, "--output", output, *extra]
    return run_cli_here(args).json


def refused(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # mmray says when it joins or starts Ray (runtime.init_ray); neither line may come before a refusal.
    assert "joined the Ray cluster" not in proc.stderr and "started a local Ray instance" not in proc.stderr
    return proc.stderr


def test_overwriting_an_output_that_holds_a_committed_partition_is_refused_and_the_partition_survives(
    trained, source, ray_address, tmp_path
):
    out = tmp_path / "out"
    commit_here(trained, source["path"], str(out), "--partition", "date=2024-01-01")
    success = (out / "date=2024-01-01" / "_SUCCESS").read_text()

    for extra in ([], ["--overwrite"]):
        err = refused(score(trained, source["path"], str(out), *extra, ray_address=ray_address, check=False))
        assert f"{out} holds {out / 'date=2024-01-01'}, a committed scoring output" in err
    assert (out / "date=2024-01-01" / "_SUCCESS").read_text() == success
    assert not (out / "_SUCCESS").exists()
    rows = pads.dataset(str(out), format="parquet", partitioning="hive").to_table(columns=["id"])
    assert sorted(rows["id"].to_pylist()) == sorted(source["ids"])  # every id once, under the partition only


def test_a_partition_inside_a_committed_output_is_refused(trained, source, ray_address, tmp_path):
    out = tmp_path / "out"
    first = commit_here(trained, source["path"], str(out))
    err = refused(
        score(trained, source["path"], str(out), "--partition", "date=2024-01-01", ray_address=ray_address, check=False)
    )
    assert f"{out / 'date=2024-01-01'} is inside {out}, which holds a committed scoring output" in err
    assert not (out / "date=2024-01-01").exists()
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == first["run_id"]


@pytest.mark.parametrize(("output", "message"), [("in/preds", "is inside the input"), ("..", "is inside the output")])
def test_an_output_inside_the_input_or_around_it_is_refused_before_any_work(
    trained, source, ray_address, output, message
):
    from pathlib import Path

    inp = Path(source["path"])
    target = (inp.parent / output).resolve() if output == ".." else inp / "preds"
    err = refused(score(trained, str(inp), str(target), ray_address=ray_address, check=False))
    assert message in err and str(inp) in err and str(target) in err
    assert not (inp / "preds").exists()


@pytest.mark.parametrize(
    ("output", "extra", "message"),
    [
        ("afile", [], "afile is a file; the output must be a directory"),
        ("afile/preds", [], "is inside"),
        ("link", ["--overwrite"], "link is a symbolic link; give the directory it points to"),
        ("/proc", ["--overwrite"], "/proc is a mount point, which publishing cannot swap"),
    ],
)
def test_an_output_publishing_could_never_replace_is_refused_before_any_work(
    trained, source, ray_address, tmp_path, output, extra, message
):
    """Each failed only at publish, after all the scoring (NotADirectoryError, EBUSY), or swapped the link."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "committed").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "committed")
    target = output if output.startswith("/") else str(tmp_path / output)
    err = refused(score(trained, source["path"], target, *extra, ray_address=ray_address, check=False))
    assert message in err.strip().splitlines()[-1], err  # one error line
    assert (tmp_path / "afile").read_text() == "x" and (tmp_path / "link").is_symlink()
