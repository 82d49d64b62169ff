"""One place that turns a user URI (local path or ``s3://bucket/prefix``) into a pyarrow filesystem.

S3 credentials come from the standard AWS chain (environment, profile, instance role); only the
endpoint and region may come from config (``storage.s3_endpoint_url``, ``storage.s3_region``).
Nothing here logs or formats credentials.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from mmray.config import StorageConfig

__all__ = [
    "copy_dir_from", "copy_dir_to", "exists", "is_s3", "join", "list_parquet_files", "read_bytes",
    "read_text", "resolve", "write_bytes", "write_text",
]  # fmt: skip


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def resolve(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """Returns ``(filesystem, path)``; the path is scheme-less for S3 (``bucket/key``)."""
    storage = storage or StorageConfig()
    if is_s3(uri):
        kwargs = {}
        endpoint = storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs["endpoint_override"] = host or endpoint
            kwargs["scheme"] = scheme if host else "https"
        region = storage.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r} (use a local path or s3://)")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = resolve(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    fs, path = resolve(uri, storage)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_text(uri: str, storage: StorageConfig | None = None) -> str:
    return read_bytes(uri, storage).decode("utf-8")


def write_text(uri: str, text: str, storage: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage)


def list_parquet_files(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Expands a Parquet file, folder or glob into a sorted list of filesystem paths.

    Hidden files and folders (leading ``_`` or ``.``) are skipped, as Arrow, Spark and Ray do.

    Raises:
        FileNotFoundError: naming the URI when nothing matches.
    """
    fs, path = resolve(uri, storage)
    has_glob = any(c in path for c in "*?[")
    base = path
    if has_glob:
        base = path[: min(path.index(c) for c in "*?[" if c in path)]
        base = base.rsplit("/", 1)[0] if "/" in base else ""
    info = fs.get_file_info(base) if base else None
    if info is not None and info.type == pafs.FileType.File and not has_glob:
        return [path]
    if info is None or info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no Parquet data at {uri}")
    selector = pafs.FileSelector(base, recursive=True)
    files = []
    for f in fs.get_file_info(selector):
        if f.type != pafs.FileType.File:
            continue
        rel = f.path[len(base) :].lstrip("/")
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        if has_glob:
            if not fnmatch.fnmatch(f.path, path):
                continue
        elif not f.path.endswith(".parquet"):
            continue
        files.append(f.path)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {uri}")
    return sorted(files)


def copy_dir_to(local_dir: str | Path, uri: str, storage: StorageConfig | None = None) -> None:
    """Copies a local directory tree to ``uri`` (local or S3)."""
    fs, path = resolve(uri, storage)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def copy_dir_from(uri: str, storage: StorageConfig | None = None) -> str:
    """Returns a local directory with the contents of ``uri``; local URIs are returned as-is."""
    fs, path = resolve(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no directory at {uri}")
        return path
    local = tempfile.mkdtemp(prefix="mmray-")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        shutil.rmtree(local, ignore_errors=True)
        raise FileNotFoundError(f"no directory at {uri}")
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local
