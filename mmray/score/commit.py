"""Exactly-once output commit for batch scoring.

Protocol:
    1. Data files are written to a hidden staging location for this run (``_``-prefixed, which Arrow,
       Spark, Ray and DuckDB readers skip), together with the quarantine.
    2. They get their final, deterministic names (``part-00000.parquet`` ...).
    3. ``_manifest.json`` (files, row counts, model_id, input fingerprint, config hash) and then
       ``_SUCCESS`` (counts) are written last.

Local disk: the whole partition directory is built in a sibling staging directory and renamed into
place, so a killed run leaves nothing visible. S3 (no rename): ``_SUCCESS`` is deleted first, files are
copied to their final names, stale names are deleted, then the markers are written; a rerun rewrites
the same names, so no duplicate survives. Stale staging data from killed runs is removed by later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from mmray.config import Config, StorageConfig, config_to_dict
from mmray.data import storage

__all__ = ["Target", "commit", "committed_counts", "is_committed", "run_identity", "validate_partition"]

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
QUARANTINE = "_quarantine"
_STAGING = "_staging-"
_BAD_VALUE = re.compile(r"[/\\\x00-\x1f\x7f]")


def validate_partition(partition: dict[str, str]) -> None:
    """Refuses partition keys/values that could escape the output prefix or break paths."""
    for k, v in partition.items():
        for what, s in (("key", k), ("value", v)):
            if not s or s in (".", "..") or ".." in s or _BAD_VALUE.search(s) or "=" in s and what == "key":
                raise ValueError(f"invalid partition {what} {s!r} in {k}={v} (no '/', '..' or control characters)")


@dataclass(frozen=True)
class Target:
    """Where one scoring run's output lands: ``base_uri[/k=v...]``."""

    base_uri: str
    partition: dict[str, str] = field(default_factory=dict)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        validate_partition(self.partition)

    @property
    def uri(self) -> str:
        return storage.join(self.base_uri.rstrip("/"), *(f"{k}={v}" for k, v in self.partition.items()))

    @property
    def quarantine_uri(self) -> str:
        return storage.join(self.uri, QUARANTINE)

    def resolve(self) -> tuple[pafs.FileSystem, str]:
        return storage.resolve(self.uri, self.storage)


def run_identity(input_uri: str, files: list[str], model_id: str, cfg: Config, target: Target) -> dict[str, Any]:
    """What makes two runs 'the same': input files (size + mtime), model, scoring config, partition."""
    fs, _ = storage.resolve(input_uri, cfg.storage)
    inputs = []
    for info in fs.get_file_info(files):
        mtime = info.mtime.isoformat() if info.mtime else None
        inputs.append({"path": info.path, "size": info.size, "mtime": mtime})
    relevant = {"data": config_to_dict(cfg.data), "score": config_to_dict(cfg.score)}
    relevant["score"].pop("concurrency", None)  # resources do not change results
    relevant["score"].pop("num_gpus", None)
    relevant["score"].pop("num_cpus", None)
    config_hash = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
    ident = {"inputs": inputs, "model_id": model_id, "config_hash": config_hash, "partition": target.partition}
    ident["digest"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return ident


def _read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, OSError):
        return None


def is_committed(target: Target, identity: dict[str, Any]) -> bool:
    fs, path = target.resolve()
    success = _read_json(fs, f"{path}/{SUCCESS}")
    manifest = _read_json(fs, f"{path}/{MANIFEST}")
    return bool(success and manifest and manifest.get("identity", {}).get("digest") == identity["digest"])


def committed_counts(target: Target) -> dict[str, int]:
    fs, path = target.resolve()
    success = _read_json(fs, f"{path}/{SUCCESS}") or {}
    return {k: success[k] for k in ("rows_in", "rows_scored", "rows_quarantined") if k in success}


def _write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def _clean_stale_staging(fs: pafs.FileSystem, parent: str, prefix: str) -> None:
    try:
        entries = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return
    for e in entries:
        if os.path.basename(e.path).startswith(prefix) and e.type == pafs.FileType.Directory:
            fs.delete_dir(e.path)


def commit(
    target: Target,
    run_id: str,
    scored: ray.data.Dataset,
    quarantine,
    identity: dict[str, Any],
    counts: dict[str, int],
    rows_per_file: int,
) -> list[str]:
    """Writes ``scored`` and the quarantine table to ``target`` under the commit protocol.

    Returns:
        The committed data file names.
    """
    fs, final = target.resolve()
    local = isinstance(fs, pafs.LocalFileSystem)
    parent, name = final.rsplit("/", 1)
    stage_prefix = f"{_STAGING}{name}-" if local else _STAGING
    stage_parent = parent if local else final
    _clean_stale_staging(fs, stage_parent, stage_prefix)
    staging = f"{stage_parent}/{stage_prefix}{run_id}"
    raw = f"{staging}/{_STAGING}raw"
    scored.write_parquet(raw, filesystem=fs, min_rows_per_file=min(rows_per_file, max(1, counts["rows_scored"])),
                         max_rows_per_file=rows_per_file)  # fmt: skip
    written = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(raw, allow_not_found=True))
                     if f.type == pafs.FileType.File and f.path.endswith(".parquet"))  # fmt: skip
    names = [f"part-{i:05d}.parquet" for i in range(len(written))]
    fs.create_dir(f"{staging}/{QUARANTINE}", recursive=True)
    pq.write_table(quarantine, f"{staging}/{QUARANTINE}/part-00000.parquet", filesystem=fs)
    files = []
    for src, dst in zip(written, names):
        files.append({"name": dst, "rows": pq.read_metadata(src, filesystem=fs).num_rows})
    manifest = {"files": files, "identity": identity, "run_id": run_id, **counts}
    success = {"run_id": run_id, **counts}
    if local:
        for src, dst in zip(written, names):
            fs.move(src, f"{staging}/{dst}")
        fs.delete_dir(raw)
        _write_json(fs, f"{staging}/{MANIFEST}", manifest)
        _write_json(fs, f"{staging}/{SUCCESS}", success)
        old = f"{parent}/{stage_prefix}old-{run_id}"
        if os.path.exists(final):
            os.rename(final, old)  # readers see the old or the new partition, never a mix
        os.makedirs(parent, exist_ok=True)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        fs.delete_file(f"{final}/{SUCCESS}") if _read_json(fs, f"{final}/{SUCCESS}") is not None else None
        for src, dst in zip(written, names):
            fs.copy_file(src, f"{final}/{dst}")
        keep = set(names)
        for f in fs.get_file_info(pafs.FileSelector(final, allow_not_found=True)):
            base = os.path.basename(f.path)
            if f.type == pafs.FileType.File and base.endswith(".parquet") and base not in keep:
                fs.delete_file(f.path)  # stale names from an earlier, larger commit
        fs.delete_dir_contents(f"{final}/{QUARANTINE}", missing_dir_ok=True)
        fs.copy_file(f"{staging}/{QUARANTINE}/part-00000.parquet", f"{final}/{QUARANTINE}/part-00000.parquet")
        _write_json(fs, f"{final}/{MANIFEST}", manifest)
        _write_json(fs, f"{final}/{SUCCESS}", success)
        fs.delete_dir(staging)
    return names
