"""Nightly scoring: one date partition of the input into the same date partition of the output.

    <score.input>/date=YYYY-MM-DD/*.parquet  ->  <score.output>/date=YYYY-MM-DD/part-*.parquet

The checkpoint is ``score.checkpoint`` or, when unset, the one the ``latest.json`` pointer names
(training writes it to ``train.storage_path``). The commit protocol makes reruns safe: a partition
already committed from the same input and model is "already scored" (a no-op); one committed from
a different input or model is replaced only with ``overwrite``. A missing or empty input partition
is an error, never an empty commit: upstream most likely has not delivered yet.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pyarrow.parquet as pq

from mmray.config import Config
from mmray.data import storage
from mmray.score.job import run_scoring

__all__ = ["PARTITION_KEY", "NightlyError", "input_partition", "latest_checkpoint", "parse_date", "run_nightly",
           "yesterday_utc"]  # fmt: skip

PARTITION_KEY = "date"
LATEST_POINTER = "latest.json"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class NightlyError(ValueError):
    """The input partition is missing or empty, or no checkpoint/input/output is configured."""


def parse_date(text: str) -> str:
    """Validates ``YYYY-MM-DD`` (a real calendar date) and returns it unchanged."""
    if not _DATE.match(text):
        raise NightlyError(f"--date {text!r}: expected YYYY-MM-DD")
    try:
        dt.date.fromisoformat(text)
    except ValueError as e:
        raise NightlyError(f"--date {text!r}: {e}") from None
    return text


def yesterday_utc(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return (now.astimezone(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()


def latest_checkpoint(cfg: Config) -> str:
    """``score.checkpoint`` if set, else the checkpoint in ``<train.storage_path>/latest.json``."""
    if cfg.score.checkpoint:
        return cfg.score.checkpoint
    root = cfg.train.storage_path
    pointer = storage.join(root.rstrip("/") if storage.is_s3(root) else root, LATEST_POINTER)
    try:
        latest = json.loads(storage.read_text(pointer, cfg.storage))
    except FileNotFoundError:
        raise NightlyError(
            f"no checkpoint: score.checkpoint is unset and there is no {pointer} (train a model first)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise NightlyError(f"cannot read the latest-checkpoint pointer {pointer}: {e}") from None
    if not isinstance(latest, dict) or not latest.get("checkpoint"):
        raise NightlyError(f"{pointer} names no checkpoint")
    return latest["checkpoint"]


def input_partition(root: str, date: str) -> str:
    return storage.join(root.rstrip("/"), f"{PARTITION_KEY}={date}")


def _check_input(uri: str, cfg: Config) -> None:
    """A clear error when the input partition is missing or empty.

    Reads footers only until a file with rows turns up: ``run_scoring`` lists and counts the input again.
    """
    if not storage.exists(uri, cfg.storage):
        raise NightlyError(f"input partition {uri} does not exist (has upstream delivered this date?)")
    try:
        files = storage.list_parquet_files(uri, cfg.storage)
    except FileNotFoundError:
        raise NightlyError(f"input partition {uri} is empty: no Parquet files") from None
    fs, _ = storage.resolve(uri, cfg.storage)
    if not any(pq.read_metadata(f, filesystem=fs).num_rows for f in files):
        raise NightlyError(f"input partition {uri} is empty: 0 rows in {len(files)} Parquet file(s)")


def run_nightly(
    cfg: Config,
    date: str | None = None,
    checkpoint: str | None = None,
    input_root: str | None = None,
    output_root: str | None = None,
    overwrite: bool = False,
    address: str | None = None,
) -> dict[str, Any]:
    """Scores one date partition; arguments left None come from ``score.*`` (and ``latest.json``).

    Returns:
        ``run_scoring``'s result plus ``date``, ``input`` and ``checkpoint``.
    """
    date = parse_date(date) if date else yesterday_utc()
    input_root = input_root or cfg.score.input
    output_root = output_root or cfg.score.output
    if not input_root or not output_root:
        raise NightlyError("set the input and output roots (--input/--output or score.input/score.output)")
    source = input_partition(input_root, date)
    _check_input(source, cfg)
    checkpoint = checkpoint or latest_checkpoint(cfg)
    result = run_scoring(cfg, checkpoint, source, output_root, {PARTITION_KEY: date}, overwrite=overwrite,
                         address=address)  # fmt: skip
    return {**result, "date": date, "input": source, "checkpoint": checkpoint}
