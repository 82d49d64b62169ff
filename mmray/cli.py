"""The ``mmray`` command: thin argument parsing around the library.

Examples:
    mmray make-data work/data --rows 2000
    mmray train --config configs/demo.yaml data.train=work/data/train data.val=work/data/val
    mmray pretrain --config configs/recipe.yaml model.align.weight=1 data.train=... data.val=...
    mmray score --checkpoint runs/<name>/checkpoint_... --input work/data/test --output work/preds
    mmray embed --checkpoint runs/<name>/checkpoint_... --input work/data/test --output work/vectors
    mmray tune --config configs/demo.yaml --space configs/tune/space.yaml --num-samples 8 data.train=... data.val=...
    mmray ablate --checkpoint runs/<name>/checkpoint_... --input work/data/test
    mmray ablate --retrieval --checkpoint runs/<name>/checkpoint_... --input work/data/test
    mmray nightly --date yesterday --tz Europe/Berlin score.input=s3://b/events score.output=s3://b/preds
    mmray nightly --from 2024-05-01 --to 2024-05-31 score.input=s3://b/events score.output=s3://b/preds
    mmray demo --workdir work/demo
    mmray validate-data work/data/train --config configs/demo.yaml
    mmray report runs/<name>
    mmray version

Each command prints its result as one JSON object on the LAST line of stdout (validate-data: a table, or
JSON with --json); its progress goes to
stderr, and Ray's own output only with ``--verbose`` (or ``MMRAY_VERBOSE=1``). Errors in user input
(config, schema, missing data, too many bad rows) exit with status 2 and a message naming the culprit;
any other error exits with 1, naming its type and the mmray code that raised it. ``--debug`` (or
``MMRAY_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

__all__ = ["main"]


def _emit(obj: dict[str, Any]) -> None:
    """The final JSON line; the Ray this command connected is released first so no log line can follow
    it (a Ray that was running before the command, in the calling process, is left running)."""
    if "mmray.runtime" in sys.modules:  # imported by every command that uses Ray
        sys.modules["mmray.runtime"].release_ray()
    from mmray.console import json_line

    sys.stdout.flush()
    print(json_line(obj), flush=True)


def _partition(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise ValueError(f"--partition {v!r}: expected KEY=VALUE")
        k, val = v.split("=", 1)
        if k in out:
            raise ValueError(f"--partition {v!r}: key {k!r} given twice")
        out[k] = val
    return out


def _config(args: argparse.Namespace):
    """Loads the config and logs it, redacted, to stderr: a job's log says what it ran with. The keys that
    differ from the defaults (the file's and the overrides'), or with ``--verbose`` every resolved key;
    a whole config was one ~2,500-character line, training keys included, on every ``mmray score``."""
    from mmray.config import Config, config_to_dict, flatten, load_config, set_dotted
    from mmray.console import verbose
    from mmray.data.storage import redact

    cfg = load_config(args.config, args.overrides)
    resolved = config_to_dict(cfg)
    if not verbose():
        defaults = flatten(config_to_dict(Config()))
        resolved = {}
        for key, value in flatten(config_to_dict(cfg)).items():
            if defaults.get(key, object()) != value:
                set_dotted(resolved, key, value)
    shown = json.dumps(resolved, ensure_ascii=False, sort_keys=True, default=str)
    what = "config" if verbose() else "config (non-default keys; --verbose for all)"
    print(f"mmray {args.command}: {what} {redact(shown)}", file=sys.stderr, flush=True)
    return cfg


def cmd_make_data(args: argparse.Namespace) -> None:
    from mmray.data.benchmarks import make_task_dataset
    from mmray.data.synthetic import make_dataset

    if args.task == "demo":
        splits = make_dataset(args.out_dir, rows=args.rows, seed=args.seed)
    else:
        splits = make_task_dataset(args.task, args.out_dir, rows=args.rows, seed=args.seed, lang=args.lang)
    _emit({"task": args.task, "splits": splits})


def cmd_train(args: argparse.Namespace) -> None:
    from mmray.train.launcher import run_training

    _emit(run_training(_config(args), address=args.address))  # Ray starts once the run's checks pass


def cmd_pretrain(args: argparse.Namespace) -> None:
    from mmray.train.launcher import run_pretraining

    _emit(run_pretraining(_config(args), address=args.address))


def cmd_tune(args: argparse.Namespace) -> None:
    from mmray.config import load_config
    from mmray.train.tune import TuneSettings, load_space, run_tune

    cfg = load_config(args.config, args.overrides)
    settings = TuneSettings(
        num_samples=args.num_samples,
        metric=args.metric,
        mode=args.mode,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent,
        name=args.name,
    )
    _emit(run_tune(cfg, load_space(args.space), settings, address=args.address))


def cmd_score(args: argparse.Namespace) -> None:
    """``score`` and ``embed`` (``args.row_kind``: predictions or embeddings) are one job."""
    from mmray.score.job import run_scoring

    cfg = _config(args)
    partition = _partition(args.partition)
    # Ray is started only when there is work: an "already scored" rerun returns in a second.
    _emit(
        run_scoring(
            cfg,
            args.checkpoint,
            args.input,
            args.output,
            partition,
            overwrite=args.overwrite,
            evaluate=args.evaluate,
            address=args.address,
            retry_quarantined=args.retry_quarantined,
            row_kind=args.row_kind,
        )
    )


def cmd_nightly(args: argparse.Namespace) -> None:
    from mmray.score.nightly import NightlyError, run_backfill, run_nightly

    if (args.date_from is None) != (args.date_to is None):
        raise NightlyError("a backfill needs both --from and --to")
    if args.date_from is not None and args.date is not None:
        raise NightlyError("give either --date or --from/--to, not both")
    cfg = _config(args)
    where = {
        "checkpoint": args.checkpoint,
        "input_root": args.input,
        "output_root": args.output,
        "overwrite": args.overwrite,
        "address": args.address,
        "tz": args.tz,
    }
    if args.date_from is None:
        _emit(run_nightly(cfg, args.date, **where))
        return
    result = run_backfill(cfg, args.date_from, args.date_to, **where)
    _emit(result)
    if result["failed"]:
        raise NightlyError(
            f"backfill: {len(result['failed'])} of {len(result['partitions'])} dates failed: "
            f"{', '.join(result['failed'])} (the others are committed; rerun to retry)"
        )


def cmd_ablate(args: argparse.Namespace) -> None:
    from mmray.config import load_config
    from mmray.runtime import init_ray
    from mmray.score.ablation import run_ablation
    from mmray.score.retrieval import run_retrieval

    cfg = load_config(args.config, args.overrides)
    if (args.same_caption or args.key_column) and not args.retrieval:
        raise ValueError("--same-caption and --key-column are settings of --retrieval")
    init_ray(args.address)
    if args.retrieval:
        _emit(run_retrieval(cfg, args.checkpoint, args.input, args.same_caption, args.key_column))
        return
    _emit(run_ablation(cfg, args.checkpoint, args.input))


def cmd_demo(args: argparse.Namespace) -> None:
    from mmray.demo import run_demo

    _emit(run_demo(args.workdir, args.config, args.overrides, rows=args.rows, address=args.address))


def cmd_report(args: argparse.Namespace) -> None:
    from mmray.config import load_config
    from mmray.report import write_report
    from mmray.runtime import init_ray

    cfg = load_config(args.config, args.overrides)
    if not args.no_evaluate:
        init_ray(args.address)
    result = write_report(args.run_dir, cfg, evaluate=not args.no_evaluate)
    print(f"mmray report: wrote {result['report']}", file=sys.stderr, flush=True)
    _emit(result)


def cmd_validate_data(args: argparse.Namespace) -> int:
    from mmray.config import load_config
    from mmray.console import json_line, printable
    from mmray.validate import CannotReadError, format_report, validate_data

    cfg = load_config(args.config, args.overrides)
    try:
        report = validate_data(args.uri, cfg, labeled=not args.unlabeled, max_rows=args.max_rows)
    except CannotReadError as e:  # names a file found in the data, and quotes Arrow on its bytes
        print(f"mmray validate-data: error: {printable(str(e))}", file=sys.stderr)
        return 2
    print(json_line(report) if args.json else format_report(report), flush=True)
    return 0 if report["ok"] else 1


def cmd_version(args: argparse.Namespace) -> None:
    from mmray.console import versions

    found = versions()
    for name, value in found.items():
        print(f"{name:<7} {value}")
    _emit(found)


class _IntermixedParser(argparse.ArgumentParser):
    """A command's parser: options and positionals in any order (``validate-data URI --json k=v``).
    Plain argparse ends a ``nargs="*"`` positional (the overrides) at the first option after it and
    calls whatever follows that option 'unrecognized'; the intermixed parse takes options first."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # the subcommand action calls this
        if self._intermixing:  # parse_known_intermixed_args's own two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmray", description="Train and batch-score text+image fusion models on Ray.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show Ray's own output too (or MMRAY_VERBOSE=1)")
    common.add_argument("--debug", action="store_true", help="print the full traceback of an error (or MMRAY_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)
    listed: list[str] = []  # the command list, without the deprecated aliases

    def command(name: str, help: str) -> argparse.ArgumentParser:  # every command takes --verbose / --debug
        listed.append(name)
        return sub.add_parser(name, help=help, parents=[common])

    def with_config(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument("--config", required=required, help="YAML config file")
        sp.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or embedded local Ray)")
        sp.add_argument("overrides", nargs="*", help="dotted.key=value overrides")

    def committed_output(sp: argparse.ArgumentParser) -> None:  # score and embed: one job, one commit
        sp.add_argument("--checkpoint", required=True)
        sp.add_argument("--input", required=True)
        sp.add_argument("--output", required=True)
        sp.add_argument("--partition", action="append", default=[], metavar="KEY=VALUE")
        sp.add_argument("--overwrite", action="store_true", help="replace an already committed output (atomically)")

    sp = command("make-data", help="write a synthetic text-image Parquet dataset")
    sp.add_argument("out_dir")
    sp.add_argument("--rows", type=int, default=2000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--task",
        default="demo",
        choices=["demo", "classify", "sum", "match", "lazy", "missing"],
        help="demo: the quick-start set; the others are the quality benchmark's tasks (mmray.data.benchmarks)",
    )
    sp.add_argument(
        "--lang",
        default="mixed",
        choices=["mixed", "en", "zh"],
        help="captions of the benchmark tasks (not demo): half English, half Chinese, or all one",
    )
    sp.set_defaults(fn=cmd_make_data)

    sp = command("train", help="train a fusion model with Ray Train")
    with_config(sp, required=True)
    sp.set_defaults(fn=cmd_train)

    sp = command(
        "pretrain",
        help="align the encoders on captioned Parquet (id, text, image; no labels) with model.align; "
        "start a supervised run from it with model.init_from",
    )
    with_config(sp, required=True)
    sp.set_defaults(fn=cmd_pretrain)

    sp = command("tune", help="Ray Tune sweep (ASHA) over training; writes results.parquet and best_config.yaml")
    sp.add_argument("--space", required=True, help="YAML: dotted.key: {choice|uniform|loguniform|randint: ...}")
    sp.add_argument("--num-samples", type=int, default=8, help="trials to run (default 8)")
    sp.add_argument("--metric", default="val_loss", help="epoch metric to optimise (default val_loss)")
    sp.add_argument("--mode", choices=["min", "max"], default=None, help="default: min for losses, else max")
    sp.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial (default 1)")
    sp.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA keeps the best 1/N per rung (default 2)")
    sp.add_argument("--max-concurrent", type=int, default=None, help="default: as many trials as the cluster holds")
    sp.add_argument("--name", default=None, help="sweep directory under train.storage_path (default: a fresh name)")
    with_config(sp, required=True)
    sp.set_defaults(fn=cmd_tune)

    sp = command("score", help="batch-score Parquet with a checkpoint")
    committed_output(sp)
    sp.add_argument("--evaluate", action="store_true", help="the input has labels: also write _metrics.json")
    sp.add_argument(
        "--retry-quarantined",
        action="store_true",
        help="score again the committed rows quarantined for transient image-fetch errors (new commit)",
    )
    with_config(sp, required=False)
    sp.set_defaults(fn=cmd_score, row_kind="predictions")

    sp = command(
        "embed",
        help="write each row's fused vector and per-modality pooled vectors to Parquet (committed once, as score)",
    )
    committed_output(sp)
    with_config(sp, required=False)
    sp.set_defaults(fn=cmd_score, row_kind="embeddings", evaluate=False, retry_quarantined=False)

    sp = command("nightly", help="score date=YYYY-MM-DD partitions: one date, or a --from/--to backfill")
    sp.add_argument("--date", default=None, help="YYYY-MM-DD or 'yesterday' (default) in --tz")
    sp.add_argument("--from", dest="date_from", default=None, metavar="DATE", help="backfill: first date")
    sp.add_argument("--to", dest="date_to", default=None, metavar="DATE", help="backfill: last date (included)")
    sp.add_argument("--tz", default="UTC", help="IANA time zone that 'yesterday' is in (default UTC)")
    sp.add_argument(
        "--checkpoint", default=None, help="default: score.checkpoint, else <train.storage_path>/latest.json"
    )
    sp.add_argument("--input", default=None, help="root holding date=... partitions (default: score.input)")
    sp.add_argument("--output", default=None, help="output root (default: score.output)")
    sp.add_argument("--overwrite", action="store_true", help="replace committed partitions (a backfill rescores them)")
    with_config(sp, required=False)
    sp.set_defaults(fn=cmd_nightly)

    def ablate_arguments(sp: argparse.ArgumentParser) -> None:  # ablate's, and its deprecated alias's
        sp.add_argument("--checkpoint", required=True)
        sp.add_argument("--input", required=True)
        sp.add_argument(
            "--retrieval",
            action="store_true",
            help="instead: text->image and image->text Recall@1/5/10 in the aligned space (model.align)",
        )
        sp.add_argument(
            "--same-caption",
            action="store_true",
            help="--retrieval: every image of an identical caption is correct for it (generated data)",
        )
        sp.add_argument(
            "--key-column",
            default=None,
            help="--retrieval: every image whose row has the caption's value in this column is correct for it "
            "(e.g. the attributes an image shows: mmray make-data --task match writes 'attributes')",
        )
        with_config(sp, required=False)

    sp = command("ablate", help="metrics of a checkpoint on labelled Parquet: full, text masked, image masked")
    ablate_arguments(sp)
    sp.set_defaults(fn=cmd_ablate)
    # ablate's old name, for one release: no help=, so not in the command list; main warns when it runs
    sp = sub.add_parser(
        "evaluate",
        parents=[common],
        description="deprecated alias of mmray ablate (the alias goes in the next release)",
    )
    ablate_arguments(sp)
    sp.set_defaults(fn=cmd_ablate, renamed_to="ablate")

    sp = command("demo", help="make-data -> train -> score on an embedded Ray")
    sp.add_argument("--workdir", default="work/demo")
    sp.add_argument("--rows", type=int, default=2000)
    with_config(sp, required=False)
    sp.set_defaults(fn=cmd_demo)

    sp = command(
        "validate-data",
        help="check a Parquet dataset as train/score would read it (exit 0 ok, 1 problems, 2 unreadable)",
    )
    sp.add_argument("uri", help="Parquet file, folder or glob; local path or s3://")
    sp.add_argument("--unlabeled", action="store_true", help="data to score: label columns are not required")
    sp.add_argument("--max-rows", type=int, default=None, help="check at most this many rows (default: all)")
    sp.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    sp.add_argument("--config", default=None, help="YAML config file (columns, tokenizer, limits)")
    sp.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    sp.set_defaults(fn=cmd_validate_data)

    sp = command(
        "report",
        help="RUN_DIR/report.html: curves, confusion, per-class scores, ablation, calibration, data, config, lineage",
    )
    sp.add_argument("run_dir", help="a run directory (train.storage_path/train.name), local or s3://")
    sp.add_argument(
        "--no-evaluate",
        action="store_true",
        help="skip the evaluation on the validation split (no Ray; no confusion/ablation/calibration)",
    )
    with_config(sp, required=False)
    sp.set_defaults(fn=cmd_report)

    sp = command("version", help="versions of mmray (and its git sha in a checkout), Ray, torch; CUDA")
    sp.set_defaults(fn=cmd_version)
    sub.metavar = "{" + ",".join(listed) + "}"  # argparse's default would name the deprecated alias too
    return p


def main(argv: list[str] | None = None) -> int:
    from mmray.config import ConfigError
    from mmray.console import describe_error, say, set_verbose, verbose
    from mmray.data.labels import LabelError
    from mmray.data.pipeline import DataQualityError
    from mmray.data.schema import SchemaError

    args = build_parser().parse_args(argv)
    set_verbose(args.verbose or verbose())
    if renamed_to := getattr(args, "renamed_to", None):
        say(f"deprecated, use mmray {renamed_to} (the alias goes in the next release)", args.command)
    debug = args.debug or bool(os.environ.get("MMRAY_DEBUG"))
    try:
        code = args.fn(args)
    except (ConfigError, SchemaError, LabelError, DataQualityError, FileNotFoundError, ValueError) as e:
        if debug:
            traceback.print_exc()
        print(f"mmray {args.command}: error: {describe_error(e, expected=True)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug or an environment failure: its type and where, not a wall of traceback
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug prints the traceback)"
        print(f"mmray {args.command}: error: {describe_error(e, expected=False)}{hint}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
