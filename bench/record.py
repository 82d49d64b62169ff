"""One dated section appended to bench/RESULTS.md: the heading every benchmark writes, in one place.

The heading carries what a number depends on: the UTC date, the machine (CPUs, RAM, GPU, Python) and the
git sha (``+dirty`` when ``mmray/`` or ``configs/`` differ from it), then the benchmark's own settings.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_feature_cache import gpu  # noqa: E402
from quality import REPO, machine  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"


def append_section(title: str, settings: str, body: str) -> None:
    """Appends ``### TITLE DATE (MACHINE; SETTINGS)`` and ``body`` (a table, a verdict) to RESULTS.md."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = machine().replace("no GPU", gpu())
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(f"\n### {title} {stamp} ({where}; {settings})\n\n{body}\n")
