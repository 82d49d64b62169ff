"""mmray's own output: epoch lines, durations, Ray's settings per verbosity, errors that name their
object, ``mmray version``. No Ray is started here."""

from __future__ import annotations

import errno
import json
import logging
import time

import pyarrow as pa
import pytest

from mmray import cli, console


def test_epoch_line_reads_like_the_issue_asks():
    record = {
        "epoch": 2,
        "train_loss": 0.41,
        "val_loss": 0.38,
        "val_accuracy": 0.9123,
        "val_rows": 300.0,
        "rows_per_s": 1850.4,
        "val_label/accuracy": 0.9123,
    }
    assert console.epoch_line(record, 15, 42.0) == (
        "epoch 3/15  train_loss 0.41  val_loss 0.38  val_accuracy 0.912  1,850 rows/s  ETA 0:42"
    )
    assert console.epoch_line({"epoch": 0}, 1, None) == "epoch 1/1"  # a record of a finished run


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (42.4, "0:42"), (725, "12:05"), (3723, "1:02:03")])
def test_format_duration(seconds, text):
    assert console.format_duration(seconds) == text


@pytest.mark.parametrize(
    "fraction, text",
    [(0.0, "[----]"), (0.5, "[##--]"), (0.74, "[###-]"), (1.0, "[####]"), (1.7, "[####]"), (-1, "[----]")],
)
def test_bar(fraction, text):
    assert console.bar(fraction, width=4) == text


@pytest.mark.parametrize(
    "text, shown",
    [
        ("x\x1b[2J\nresult OK", "x\\x1b[2J\\nresult OK"),  # ESC and newline: no forged line, no clear screen
        ("a\rb\tc\x00d\x7f", "a\\rb\\tc\\x00d\\x7f"),
        ("csi\x9b31m", "csi\\x9b31m"),  # C1: a one-byte ESC [
        ("l\u2028p\u2029", "l\\u2028p\\u2029"),  # Unicode line and paragraph separators
        ("gpj.\u202eexe", "gpj.\\u202eexe"),  # a bidi override would show "exe.jpg"
        ("\u2066iso\u2069\u200e", "\\u2066iso\\u2069\\u200e"),
        ("猫 café id-7", "猫 café id-7"),  # printable text, any script, is kept
    ],
)
def test_printable_escapes_what_a_terminal_would_act_on(text, shown):
    assert console.printable(text) == shown


def test_verbosity_switches_rays_documented_settings(monkeypatch):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start)
    try:
        for on in (False, True):
            console.set_verbose(on)
            assert console.ray_init_options() == {
                "log_to_driver": on,
                "logging_level": logging.INFO if on else logging.WARNING,
            }
            console.quiet_ray_data()
            flags = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start)
            assert flags == (on,) * 3
            assert logging.getLogger("ray.data").level == (logging.INFO if on else logging.WARNING)
            assert console.train_log_level() == ("INFO" if on else "WARNING")
    finally:
        monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start = saved


def test_an_oserror_without_a_filename_gets_the_operation_and_path():
    with pytest.raises(OSError) as info, console.doing("reading the checkpoint", "/runs/x/checkpoint_0001"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")  # as a runtime-env wipe leaves it
    assert console.describe_error(info.value, expected=True) == (
        "reading the checkpoint /runs/x/checkpoint_0001: No such file or directory"
    )
    named = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/train")
    assert console.describe_error(named, expected=True) == "/data/train: No such file or directory"


def test_an_unexpected_error_names_its_type_and_the_mmray_frame_that_raised_it():
    from mmray.data.schema import check_columns

    with pytest.raises(KeyError) as info:
        check_columns(pa.schema([("id", pa.string())]), {"id": "no-such-kind"}, "f.parquet")
    text = console.describe_error(info.value, expected=False)
    assert text.startswith("KeyError: 'no-such-kind' (raised at mmray/data/schema.py:")
    assert text.endswith(" in check_columns)")


def test_the_cli_prints_one_line_for_an_unexpected_error_and_the_traceback_with_debug(monkeypatch, capsys):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")

    def broken(args):
        from mmray.data.schema import check_columns

        check_columns(pa.schema([("id", pa.string())]), {"id": "no-such-kind"}, "f.parquet")

    monkeypatch.setattr(cli, "cmd_version", broken)
    assert cli.main(["version"]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip().splitlines() == [f"mmray version: error: {err.split('error: ', 1)[1].strip()}"]
        and "KeyError" in err
        and "mmray/data/schema.py" in err
        and "--debug" in err
    )
    assert cli.main(["version", "--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_version_names_mmray_ray_torch_and_cuda(monkeypatch, capsys):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert cli.main(["version"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    found = json.loads(out[-1])
    assert {"mmray", "ray", "torch", "cuda", "python"} <= set(found)
    assert "git " in found["mmray"]  # the tests run from a checkout
    assert out[1].split() == ["ray", found["ray"]]


def test_ticker_reports_the_last_state_when_the_block_ends():
    seen = []
    with console.Ticker(lambda: seen.append(time.monotonic()), interval_s=0.05):
        time.sleep(0.2)
    assert len(seen) >= 3  # ticks, plus the final poll


def test_a_failing_progress_poll_never_fails_the_job():
    def boom():
        raise RuntimeError("storage hiccup")

    with console.Ticker(boom, interval_s=0.01):
        time.sleep(0.05)


def test_an_oserror_with_its_own_message_is_left_alone():
    with pytest.raises(FileNotFoundError) as info, console.doing("preparing", "/runs/x"):
        raise FileNotFoundError("train.resume_from: /ckpt is not an mmray checkpoint (no mmray.json)")
    assert console.describe_error(info.value, expected=True) == str(info.value)


def test_a_command_run_in_process_leaves_the_callers_ray_running(ray_session, capsys):
    """``cli.main`` in a process whose Ray was up before (a notebook, this test session) must not shut it
    down when it prints its result: only a Ray the command itself connected is released."""
    from mmray import runtime

    runtime.init_ray()  # already initialised: a no-op that must not claim the caller's Ray
    assert cli.main(["version"]) == 0
    assert ray_session.is_initialized()
    assert ray_session.get(ray_session.put(7)) == 7  # and still usable
    capsys.readouterr()
