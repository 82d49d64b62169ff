"""What mmray prints, and what Ray may print.

mmray owns the terminal: a start line, one line per epoch (from rank 0's ``history.jsonl`` record),
scoring progress at a bounded rate, and a summary. Ray's own output (Ray Data's progress bars and
execution logs, Ray Train's per-report lines, INFO logs, worker stdout forwarded to the driver) is
off unless ``--verbose`` or ``MMRAY_VERBOSE=1``. It is switched off through Ray's documented settings,
never by filtering text: ``ray.init(log_to_driver=, logging_level=)``, ``DataContext.enable_progress_bars``
and ``print_on_execution_start``, the ``ray.data`` logger's level, and Ray Train's
``RunConfig(logging_config=LoggingConfig(log_level=))``. Errors are never hidden: a failure in a worker
reaches the driver as an exception, which ``describe_error`` names.

Progress goes to stderr (stdout ends with the command's JSON line). On a terminal a line is rewritten
in place; elsewhere (CI, ``ray job logs``) plain lines come at most every ``MMRAY_PROGRESS_INTERVAL``
seconds (default 10).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "VERBOSE_ENV",
    "Ticker",
    "describe_error",
    "doing",
    "epoch_line",
    "format_count",
    "format_duration",
    "json_line",
    "printable",
    "progress_interval",
    "quiet_ray_data",
    "ray_init_options",
    "say",
    "set_verbose",
    "show",
    "train_log_level",
    "verbose",
    "versions",
]

VERBOSE_ENV = "MMRAY_VERBOSE"
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def verbose() -> bool:
    """True when Ray's own output is wanted (``--verbose`` or ``MMRAY_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """Sets the verbosity for this process and the processes it starts (through the environment)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def say(message: str, command: str | None = None) -> None:
    """One line of mmray's own output, on stderr: ``mmray <command>: <message>``."""
    print(f"mmray {command}: {message}" if command else f"mmray: {message}", file=sys.stderr, flush=True)


def show(text: str) -> None:
    """A command's human-readable result (a table, a report), on stdout before its JSON line; progress
    and warnings go to stderr through ``say``."""
    print(text, flush=True)


# What a terminal acts on instead of showing: C0 controls (ESC, CR, newline ...), DEL, C1 controls (0x9b
# is a one-byte ESC [), the Unicode line and paragraph separators, and the bidi marks, embeddings,
# overrides and isolates that reorder what follows them on the line.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` as one inert terminal line: each character in ``_UNPRINTABLE`` as its ``repr`` escape
    (``\\x1b``, ``\\n``, ``\\u202e``), so a string from data (an id, a path, a label) can neither move
    the cursor nor start a line that looks like mmray's own. Everything else, CJK included, is kept."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)


def json_line(obj: Any) -> str:
    """``obj`` as one line of JSON that every reader keeps on one line: ``json.dumps`` escapes C0
    controls but leaves C1 controls, U+2028/9 (line breaks to ``str.splitlines``) and bidi controls
    raw; here they become ``\\uXXXX`` escapes too (only strings can hold them: same value, valid JSON)."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def ray_init_options() -> dict[str, Any]:
    """``ray.init`` settings: workers' output reaches the driver, and Ray logs INFO, only when verbose."""
    loud = verbose()
    return {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING}


def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-execution log lines, on only when verbose. The ``DataContext``
    travels with each dataset to the actors that execute it (Train's split coordinators too)."""
    import ray.data

    loud = verbose()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = loud
    ctx.enable_operator_progress_bars = loud
    ctx.print_on_execution_start = loud
    logging.getLogger("ray.data").setLevel(logging.INFO if loud else logging.WARNING)
    # This logger's only warning is "Progress bars disabled": the choice made just above.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if loud else logging.ERROR)


def train_log_level() -> str:
    """Ray Train's ``LoggingConfig.log_level`` (its controller's and workers' ``ray.train`` logs)."""
    return "INFO" if verbose() else "WARNING"


def progress_interval() -> float:
    """Seconds between progress lines: 1 on a terminal (rewritten in place), else
    ``MMRAY_PROGRESS_INTERVAL`` (default 10)."""
    if sys.stderr.isatty():
        return 1.0
    return float(os.environ.get("MMRAY_PROGRESS_INTERVAL", "10"))


def format_duration(seconds: float) -> str:
    """``0:42``, ``12:05``, ``1:02:03``."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_count(n: float) -> str:
    return f"{int(round(n)):,}"


def bar(fraction: float, width: int = 24) -> str:
    """A text progress bar for terminal lines: ``[#########---------------]`` (clamped to 0..1)."""
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return f"[{'#' * filled}{'-' * (width - filled)}]"


# Shown after the losses when present, in this order: the metrics users read first.
_HEADLINE = ("accuracy", "macro_f1", "auroc", "mae")


def epoch_line(record: dict[str, Any], epochs: int, eta_s: float | None) -> str:
    """``epoch 3/15  train_loss 0.41  val_loss 0.38  val_accuracy 0.912  1,850 rows/s  ETA 0:42``."""
    parts = [f"epoch {record['epoch'] + 1}/{epochs}"]
    parts += [f"{k} {record[k]:.4g}" for k in ("train_loss", "val_loss") if k in record]
    parts += [f"val_{k} {record[f'val_{k}']:.3f}" for k in _HEADLINE if f"val_{k}" in record]
    if record.get("rows_per_s"):
        parts.append(f"{format_count(record['rows_per_s'])} rows/s")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


class Ticker:
    """Calls ``poll()`` every ``interval_s`` seconds on a daemon thread while the ``with`` block runs,
    and once more when it ends, so the last state is always reported. ``poll`` prints what it wants;
    an exception in it stops the ticking (progress must never fail a job) and is shown when verbose."""

    def __init__(self, poll: Callable[[], None], interval_s: float):
        self.poll, self.interval_s = poll, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmray-progress", daemon=True)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self._safe_poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._safe_poll():
                return

    def _safe_poll(self) -> bool:
        try:
            self.poll()
            return True
        except Exception as e:  # progress is best effort; the job's own errors surface elsewhere
            if verbose():
                print(f"mmray: progress display failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return False


@contextlib.contextmanager
def doing(operation: str, path: str) -> Iterator[None]:
    """Names the object of an ``OSError`` raised inside the block that names none (``[Errno 2] No such
    file or directory`` alone): ``describe_error`` then says ``<operation> <path>: <strerror>``. Errors
    that carry their own message (``FileNotFoundError("train.resume_from: ...")``) are left alone."""
    try:
        yield
    except OSError as e:
        if e.strerror and not e.filename and not hasattr(e, "mmray_operation"):
            e.mmray_operation = f"{operation} {path}"  # type: ignore[attr-defined]
        raise


def _mmray_frame(exc: BaseException) -> str | None:
    """``mmray/x.py:12 in f``: the innermost frame of mmray code in the traceback."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(_PACKAGE_DIR) and not frame.filename.endswith(("cli.py", "console.py")):
            found = frame
    if found is None:
        return None
    rel = os.path.relpath(found.filename, os.path.dirname(_PACKAGE_DIR))
    return f"{rel}:{found.lineno} in {found.name}"


def describe_error(exc: BaseException, expected: bool) -> str:
    """One line that names the object: ``expected`` errors (bad input) are their message; an ``OSError``
    gets the operation and path; anything else gets its type and the mmray frame that raised it."""
    message = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename or getattr(exc, "mmray_operation", None) or _cwd_hint()
        message = f"{where}: {exc.strerror}" if where else message
        if exc.filename2:
            message += f" (and {exc.filename2})"
    if expected:
        return message
    frame = _mmray_frame(exc)
    return f"{type(exc).__name__}: {message}" + (f" (raised at {frame})" if frame else "")


def _cwd_hint() -> str | None:
    """An OSError with no filename at all: the working directory itself may be gone (e.g. a Ray
    runtime-env working_dir removed under a running job)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return "the working directory (it no longer exists)"
    return None


def versions() -> dict[str, str]:
    """mmray (with the git sha when run from a checkout), Ray, torch and whether CUDA is available."""
    import importlib.metadata
    import subprocess

    import ray
    import torch

    try:
        mmray = importlib.metadata.version("mmray")
    except importlib.metadata.PackageNotFoundError:
        mmray = "unknown (not installed)"
    checkout = os.path.dirname(_PACKAGE_DIR)
    if os.path.exists(os.path.join(checkout, ".git")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            sha = subprocess.run(
                ["git", "-C", checkout, "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", checkout, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            mmray += f" (git {sha}{', modified' if dirty else ''})"
    cuda = f"yes, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "no"
    return {
        "mmray": mmray,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "cuda": cuda,
        "python": sys.version.split()[0],
    }
