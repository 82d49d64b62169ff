"""The ``mmray`` argument parser: every command takes its options and its ``key=value`` overrides in
any order. Parsing only; the commands themselves are tested through the real CLI elsewhere."""

from __future__ import annotations

import pytest

from mmray.cli import build_parser


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["validate-data", "d", "--json", "a=1", "--max-rows", "3", "b=2"], {"uri": "d", "json": True, "max_rows": 3}),
        (["train", "a=1", "--config", "c.yaml", "b=2", "--verbose"], {"config": "c.yaml", "verbose": True}),
        (["tune", "a=1", "--space", "s.yaml", "b=2", "--config", "c.yaml"], {"space": "s.yaml"}),
        (
            ["score", "--checkpoint", "ck", "a=1", "--input", "i", "--output", "o", "--partition", "d=x", "b=2"],
            {"checkpoint": "ck", "partition": ["d=x"]},
        ),
        (["embed", "a=1", "--checkpoint", "ck", "--input", "i", "b=2", "--output", "o"], {"output": "o"}),
        (["nightly", "a=1", "--date", "yesterday", "b=2", "--overwrite"], {"date": "yesterday", "overwrite": True}),
        (["ablate", "a=1", "--checkpoint", "ck", "b=2", "--input", "i"], {"input": "i"}),
        (["evaluate", "a=1", "--checkpoint", "ck", "b=2", "--input", "i"], {"input": "i"}),  # ablate's old name
        (["demo", "a=1", "--rows", "5", "b=2"], {"rows": 5}),
        (["report", "run", "a=1", "--no-evaluate", "b=2"], {"run_dir": "run", "no_evaluate": True}),
    ],
)
def test_options_and_overrides_come_in_any_order(argv, expected):
    args = build_parser().parse_args(argv)
    assert args.overrides == ["a=1", "b=2"]
    assert {k: getattr(args, k) for k in expected} == expected


def test_evaluate_is_ablate_under_its_old_name_unlisted_and_warned_about(capsys):
    from mmray import cli

    parser = build_parser()
    listing = parser.format_help()
    assert "ablate" in listing and "evaluate" not in listing  # the deprecated alias is not offered
    argv = ["--checkpoint", "ck", "--input", "i", "--same-caption", "score.batch_size=4"]
    old, new = parser.parse_args(["evaluate", *argv]), parser.parse_args(["ablate", *argv])
    assert old.fn is new.fn is cli.cmd_ablate
    assert {**vars(old), "command": "ablate", "renamed_to": None} == {**vars(new), "renamed_to": None}
    # The real ablate, stopped by its own argument check before any Ray starts.
    assert cli.main(["ablate", *argv]) == 2
    refused = "error: --same-caption and --key-column are settings of --retrieval"
    assert capsys.readouterr().err == f"mmray ablate: {refused}\n"
    assert cli.main(["evaluate", *argv]) == 2
    assert capsys.readouterr().err == (
        "mmray evaluate: deprecated, use mmray ablate (the alias goes in the next release)\n"
        f"mmray evaluate: {refused}\n"
    )


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["validate-data", "d", "--bogus", "a=1"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_the_config_line_shows_the_keys_that_differ_from_the_defaults_and_all_with_verbose(capsys, tmp_path):
    import argparse
    import json

    from mmray import cli
    from mmray.console import set_verbose

    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 7}\nscore: {batch_size: 128}\n")  # 128 is score.batch_size's default
    args = argparse.Namespace(command="score", config=str(path), overrides=["data.val=s3://k:secret@b/v"])
    set_verbose(False)
    cli._config(args)
    line = capsys.readouterr().err.strip()
    prefix = "mmray score: config (non-default keys; --verbose for all) "
    assert line.startswith(prefix) and "secret" not in line
    assert json.loads(line[len(prefix) :]) == {"train": {"epochs": 7}, "data": {"val": "s3://***@b/v"}}
    set_verbose(True)
    try:
        cli._config(args)
    finally:
        set_verbose(False)
    full = json.loads(capsys.readouterr().err.strip()[len("mmray score: config ") :])
    assert full["train"]["epochs"] == 7 and full["score"]["batch_size"] == 128 and "model" in full
