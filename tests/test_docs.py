"""The generated reference pages match the code: docs/config.md (the config dataclasses' field
comments) and docs/cli.md (the argument parser). Run ``python docs/gen_reference.py`` to refresh them."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_reference_pages_are_current():
    proc = subprocess.run(
        [sys.executable, "docs/gen_reference.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_config_page_carries_every_key_with_its_comment():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(REPO / "docs"))
    page = gen_reference.config_page()
    assert "| `train.epochs` | `int > 0` | `3` |" in page  # the range the config checks, from its annotation
    assert "| `data.preprocess.concurrency` | `int > 0` | `1` | preprocessing actors in the pool |" in page
    assert "| `data.max_bad_fraction` | `float >= 0, <= 1` |" in page
    assert "| `data.image.max_pixels` | `int > 0 \\| None` |" in page
    # a comment on the lines above a field belongs to it
    assert "Decompression-bomb guard" in page.split("`data.image.max_pixels`", 1)[1].split("\n", 1)[0]
