"""Where training runs live: one layout that training writes and scoring reads.

``<train.storage_path>/<train.name>/`` is one run (checkpoints, history, quarantine), and
``<train.storage_path>/latest.json`` names the best checkpoint of the run that finished last: the one
``mmray nightly`` scores when ``score.checkpoint`` is unset. Both sides resolve the root here, so they
agree on where the pointer is (``~`` expanded, relative paths made absolute). No Ray: scoring and
the tests import this without starting anything.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid

from mmray.config import Config
from mmray.data import storage

__all__ = ["LATEST_POINTER", "fresh_run_name", "result_uri", "storage_root"]

LATEST_POINTER = "latest.json"  # in the storage root: {"run_dir", "checkpoint", "finished_at"}


def fresh_run_name() -> str:
    """A unique ``train.name`` for a run that did not set one (sortable by start time, UTC)."""
    return f"mmray-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def storage_root(cfg: Config) -> str:
    """``train.storage_path`` as the URI every run and the ``latest.json`` pointer live under."""
    path = cfg.train.storage_path
    return path.rstrip("/") if storage.is_s3(path) else os.path.abspath(os.path.expanduser(path))


def result_uri(path: str, root: str) -> str:
    """Ray reports scheme-less S3 paths; give users back a URI they can pass to ``mmray score``."""
    return f"s3://{path}" if storage.is_s3(root) and not path.startswith("s3://") else path
