"""What makes two scoring runs "the same": input content, model, result-affecting settings, partition.

A rerun with the same identity is a no-op and a different one needs ``--overwrite``, so the identity
must change with the input's content (not its mtime) and must not change with resources such as
concurrency.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow.fs as pafs

from mmray.config import StorageConfig
from mmray.score import lease as leases

__all__ = ["fingerprint_inputs", "identity_differences", "run_identity"]


def _footer_digest(path: str) -> str:
    """SHA-256 of a Parquet file's footer (schema, row groups, offsets, sizes, statistics) and its last 8
    bytes: a few KB read, and it changes with the content. Not Parquet: the whole file's hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size >= 12:
            f.seek(size - 8)
            tail = f.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] == b"PAR1" and length + 8 <= size:
                f.seek(size - 8 - length)
                digest.update(f.read(length + 8))
                return "footer-sha256:" + digest.hexdigest()
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def fingerprint_inputs(files: list[str], fs: pafs.FileSystem, store: StorageConfig | None = None) -> list[dict]:
    """Path, size and a content fingerprint of every input file, in listing order.

    The fingerprint is the S3 ETag, or locally a hash of the Parquet footer: new content with the same
    size and a preserved mtime (``cp -p``, ``rsync -a``) changes it; touching a file does not.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        client = leases.s3_client(store or StorageConfig())
        heads = [client.head_object(Bucket=p.split("/", 1)[0], Key=p.split("/", 1)[1]) for p in files]
        return [
            {"path": p, "size": h["ContentLength"], "content": "etag:" + h["ETag"].strip('"')}
            for p, h in zip(files, heads)
        ]
    return [{"path": p, "size": os.path.getsize(p), "content": _footer_digest(p)} for p in files]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(inputs: list[dict], model_id: str, settings: dict[str, Any], partition: dict[str, str]) -> dict:
    """The identity of a (input, model, result-affecting settings, partition) combination.

    Args:
        settings: only what changes the committed result (not resources such as concurrency).
    """
    ident = {
        "inputs": inputs,
        "model_id": model_id,
        "config_hash": _digest(settings),
        "settings": settings,
        "partition": dict(sorted(partition.items())),
    }
    ident["digest"] = _digest({k: ident[k] for k in ("inputs", "model_id", "config_hash", "partition")})
    return ident


def identity_differences(old: dict, new: dict) -> list[str]:
    """Human-readable reasons two identities differ (for the error that asks for ``--overwrite``)."""
    reasons = []
    if old.get("model_id") != new.get("model_id"):
        reasons.append(f"model_id {old.get('model_id')} -> {new.get('model_id')}")
    if old.get("inputs") != new.get("inputs"):
        reasons.append("input files changed (paths, sizes or content)")
    if old.get("config_hash") != new.get("config_hash"):
        reasons.append(f"settings {old.get('settings')} -> {new.get('settings')}")
    return reasons or ["identity digest differs"]
