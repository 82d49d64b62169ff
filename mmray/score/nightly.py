"""Nightly scoring: one date partition of the input into the same date partition of the output.

    <score.input>/date=YYYY-MM-DD/*.parquet  ->  <score.output>/date=YYYY-MM-DD/part-*.parquet

The checkpoint is ``score.checkpoint`` or, when unset, the one the ``latest.json`` pointer names
(training writes it to ``train.storage_path``). The commit protocol makes reruns safe: a partition
already committed from the same input and model is "already scored" (a no-op); one committed from
a different input or model is replaced only with ``overwrite``. A missing or empty input partition
is an error, never an empty commit: upstream most likely has not delivered yet.

"Yesterday" is a calendar date, so it depends on a time zone: a job scheduled at 02:00 in
Europe/Berlin must score the Berlin day that just ended, which is not UTC's yesterday for an hour
or two. The zone is always explicit (``tz``, default UTC), the same one the scheduler uses.

A backfill (``run_backfill``) scores every date of a range whose partition is not committed yet and
leaves committed ones alone, with one checkpoint and one Ray connection for the whole range.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import zoneinfo
from typing import Any

import pyarrow.parquet as pq

from mmray.config import Config
from mmray.data import storage
from mmray.data.pipeline import DataQualityError
from mmray.runs import LATEST_POINTER, storage_root
from mmray.score import commit
from mmray.score.job import run_scoring

__all__ = [
    "MAX_BACKFILL_DAYS",
    "PARTITION_KEY",
    "NightlyError",
    "date_range",
    "input_partition",
    "latest_checkpoint",
    "parse_date",
    "resolve_date",
    "run_backfill",
    "run_nightly",
    "time_zone",
    "yesterday",
]

PARTITION_KEY = "date"
YESTERDAY = "yesterday"
MAX_BACKFILL_DAYS = 3660  # ten years: a longer range is almost certainly a typo in a year
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class NightlyError(ValueError):
    """A bad date, range or time zone; the input partition is missing or empty; nothing is configured."""


def _log(message: str) -> None:
    print(f"mmray nightly: {message}", file=sys.stderr, flush=True)


def parse_date(text: str, flag: str = "--date") -> str:
    """Validates ``YYYY-MM-DD`` (a real calendar date) and returns it unchanged."""
    if not _DATE.match(text):
        raise NightlyError(f"{flag} {text!r}: expected YYYY-MM-DD or {YESTERDAY!r}")
    try:
        dt.date.fromisoformat(text)
    except ValueError as e:
        raise NightlyError(f"{flag} {text!r}: {e}") from None
    return text


def time_zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name`` (``UTC``, ``Europe/Berlin``, ...), or a NightlyError naming ``--tz``."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise NightlyError(
            f"--tz {name!r}: unknown time zone (use an IANA name such as UTC or Europe/Berlin)"
        ) from None


def yesterday(tz: str = "UTC", now: dt.datetime | None = None) -> str:
    """The calendar day before ``now`` (default: the current time) as seen in time zone ``tz``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return (now.astimezone(time_zone(tz)).date() - dt.timedelta(days=1)).isoformat()


def resolve_date(text: str | None, tz: str = "UTC", now: dt.datetime | None = None, flag: str = "--date") -> str:
    """``YYYY-MM-DD`` unchanged (validated); ``yesterday`` or None: yesterday in ``tz``."""
    time_zone(tz)  # a bad --tz is an error even when the date is explicit
    if text is None or text == YESTERDAY:
        return yesterday(tz, now)
    return parse_date(text, flag)


def date_range(start: str, end: str) -> list[str]:
    """Every date from ``start`` to ``end``, both included, oldest first."""
    first, last = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    if last < first:
        raise NightlyError(f"--from {start} is after --to {end}")
    days = (last - first).days + 1
    if days > MAX_BACKFILL_DAYS:
        raise NightlyError(f"--from {start} --to {end}: {days} days, more than {MAX_BACKFILL_DAYS}")
    return [(first + dt.timedelta(days=i)).isoformat() for i in range(days)]


def latest_checkpoint(cfg: Config) -> str:
    """``score.checkpoint`` if set, else the checkpoint in ``<train.storage_path>/latest.json``.

    The storage root is resolved exactly as the training launcher resolves it when it writes the
    pointer (``~`` expanded, relative paths made absolute), so both agree on where it is.
    """
    if cfg.score.checkpoint:
        return cfg.score.checkpoint
    pointer = storage.join(storage_root(cfg), LATEST_POINTER)
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


def _roots(cfg: Config, input_root: str | None, output_root: str | None) -> tuple[str, str]:
    input_root = input_root or cfg.score.input
    output_root = output_root or cfg.score.output
    if not input_root or not output_root:
        raise NightlyError("set the input and output roots (--input/--output or score.input/score.output)")
    return input_root, output_root


def run_nightly(
    cfg: Config,
    date: str | None = None,
    checkpoint: str | None = None,
    input_root: str | None = None,
    output_root: str | None = None,
    overwrite: bool = False,
    address: str | None = None,
    tz: str = "UTC",
) -> dict[str, Any]:
    """Scores one date partition; arguments left None come from ``score.*`` (and ``latest.json``).

    Args:
        date: ``YYYY-MM-DD``, or ``yesterday``/None for yesterday in ``tz``.

    Returns:
        ``run_scoring``'s result plus ``date``, ``input`` and ``checkpoint``.
    """
    date = resolve_date(date, tz)
    input_root, output_root = _roots(cfg, input_root, output_root)
    source = input_partition(input_root, date)
    _check_input(source, cfg)
    checkpoint = checkpoint or latest_checkpoint(cfg)
    result = run_scoring(
        cfg, checkpoint, source, output_root, {PARTITION_KEY: date}, overwrite=overwrite, address=address
    )
    return {**result, "date": date, "input": source, "checkpoint": checkpoint}


def run_backfill(
    cfg: Config,
    start: str,
    end: str,
    checkpoint: str | None = None,
    input_root: str | None = None,
    output_root: str | None = None,
    overwrite: bool = False,
    address: str | None = None,
    tz: str = "UTC",
) -> dict[str, Any]:
    """Scores each date from ``start`` to ``end`` (both included) whose partition is not committed.

    Committed partitions are skipped after one read of their ``_SUCCESS`` and manifest, whatever
    model wrote them (``overwrite`` rescores them too). One checkpoint is resolved up front, so a
    ``latest.json`` that moves during the backfill cannot mix models, and every date reuses the one
    Ray connection the first scored date opens. A date that fails (input missing or empty, too many
    bad rows) is reported and the others still run; the caller decides the exit status.

    Returns:
        ``{"from", "to", "output", "checkpoint", "committed", "skipped", "failed", "partitions"}``:
        the first three lists hold dates; ``partitions`` holds each date's result (or ``error``).
    """
    start, end = resolve_date(start, tz, flag="--from"), resolve_date(end, tz, flag="--to")
    dates = date_range(start, end)
    input_root, output_root = _roots(cfg, input_root, output_root)
    checkpoint = checkpoint or latest_checkpoint(cfg)
    partitions: list[dict[str, Any]] = []
    for date in dates:
        target = commit.Target(output_root, {PARTITION_KEY: date}, cfg.storage)
        done = None if overwrite else commit.committed_run(target)
        if done is not None:
            _log(f"{date}: already committed (run {done['run_id']}); skipped")
            partitions.append({"date": date, "status": "skipped", "output": target.uri, "run_id": done["run_id"]})
            continue
        try:
            result = run_nightly(cfg, date, checkpoint, input_root, output_root, overwrite, address, tz)
        except (ValueError, DataQualityError) as e:  # this date's input or data; the others may be fine
            _log(f"{date}: failed: {e}")
            partitions.append({"date": date, "status": "failed", "output": target.uri, "error": str(e)})
            continue
        partitions.append(result)
    by_status = {s: [p["date"] for p in partitions if p["status"] == s] for s in ("committed", "skipped", "failed")}
    by_status["committed"] += [p["date"] for p in partitions if p["status"] == "already scored"]
    return {
        "from": start,
        "to": end,
        "output": output_root,
        "checkpoint": checkpoint,
        **by_status,
        "partitions": partitions,
    }
