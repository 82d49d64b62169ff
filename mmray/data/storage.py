"""One place that turns a user URI (local path or ``s3://bucket/prefix``) into a pyarrow filesystem.

S3 credentials come from the standard AWS chain (environment, profile, instance role); only the
endpoint and region may come from config (``storage.s3_endpoint_url``, ``storage.s3_region``).
Credentials are never passed to pyarrow explicitly, so a pickled filesystem (shipped to Ray tasks,
stored by Ray Train) carries none; URIs or endpoints that embed credentials are refused, and every
error message this module builds goes through ``redact``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import posixpath
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from mmray.config import StorageConfig

__all__ = [
    "InvalidURIError",
    "NotAllowedError",
    "TooLargeError",
    "copy_dir_from",
    "copy_dir_to",
    "exists",
    "fetch_bytes",
    "is_s3",
    "join",
    "list_parquet_files",
    "local_dir",
    "read_bytes",
    "read_local_file",
    "read_text",
    "redact",
    "resolve",
    "write_bytes",
    "write_text",
]

_S3_ATTEMPTS = 3  # pyarrow's own retries of one S3 request (throttling, 5xx, dropped connections)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECURITY_TOKEN")
_SPACE = re.compile(r"\s")
# S3 errors that another attempt cannot fix; everything else (network, throttling, 5xx) is retried.
_PERMANENT = (
    "ACCESS_DENIED",
    "NO_SUCH_BUCKET",
    "NO_SUCH_KEY",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "Forbidden",
    "AccessDenied",
    "InvalidAccessKeyId",
    "NoSuchBucket",
)


# Query parameters whose value is a credential: OAuth and API tokens, presigned-URL signatures (S3's
# X-Amz-*, Azure SAS ``sig``), Google API ``key``. A name that ends in one of _SECRET_SUFFIXES counts too.
_SECRET_PARAMS = frozenset(
    {"access_token", "token", "signature", "sig", "key", "password", "passwd", "pwd", "secret", "apikey"}
    | {"x_amz_signature", "x_amz_credential", "x_amz_security_token", "auth", "authorization", "code"}
)
_SECRET_SUFFIXES = ("_token", "_secret", "_key", "_signature", "_password")
# ``?name=value`` / ``&name=value`` (``;`` too); a value ends where a query value or a quoted string does.
_QUERY_PARAM = re.compile(r"([?&;])([^=?&;#\s\"']{1,64})=([^&;#\s\"']+)")


def _redact_param(m: re.Match) -> str:
    name = m.group(2).lower().replace("-", "_")
    if name in _SECRET_PARAMS or name.endswith(_SECRET_SUFFIXES):
        return f"{m.group(1)}{m.group(2)}=***"
    return m.group(0)


def redact(text: str) -> str:
    """``text`` with URL user-info, token-like query parameter values (``?access_token=***``,
    ``&X-Amz-Signature=***``) and the values of AWS credential variables replaced by ``***``.

    User-info is everything between ``://`` and the LAST ``@`` before the next whitespace, whatever
    the scheme: ``s3://AKIA:ab/c+d@bucket/k`` -> ``s3://***@bucket/k``. Secrets hold ``/`` (about half
    of AWS secret keys), ``:``, ``?``, ``#`` or quotes, so the RFC authority (which ends at the first
    ``/``) cannot be trusted to find them; an ``@`` in a path (``s3://b/img@2x.png``) is over-redacted
    instead. Linear in ``len(text)``: no backtracking regex over a hostile megabyte-long value.
    """
    out, pos = [], 0
    while (scheme_end := text.find("://", pos)) != -1:
        start = scheme_end + 3
        space = _SPACE.search(text, start)
        end = space.start() if space else len(text)
        at = text.rfind("@", start, end)
        # No "@" in this run means none for a later "://" in it either: go on after the run.
        out += [text[pos:start], text[start:end]] if at == -1 else [text[pos:start], "***", text[at:end]]
        pos = end
    out.append(text[pos:])
    text = _QUERY_PARAM.sub(_redact_param, "".join(out))
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:  # a 1-3 character "secret" would redact half of every message
            text = text.replace(value, "***")
    return text


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def resolve(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """Returns ``(filesystem, path)``; the path is scheme-less for S3 (``bucket/key``).

    Raises:
        ValueError: an unsupported scheme, an S3 URI without a bucket, or one that embeds credentials.
    """
    storage = storage or StorageConfig()
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"expected a local path or s3:// URI, got {uri!r}")
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        bucket = path.split("/", 1)[0]
        if "@" in bucket or ":" in bucket:
            # pyarrow would read s3://KEY:SECRET@bucket as credentials; we refuse, and never echo them.
            raise ValueError(f"s3:// URIs must not embed credentials (use the AWS credential chain): {redact(uri)}")
        if not bucket:
            raise ValueError(f"s3:// URI without a bucket: {uri!r}")
        return _s3(*_s3_settings(storage)), path
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {redact(uri)!r} (use a local path or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(_file_path(uri)))


def _file_path(uri: str) -> str:
    """The path of a local path or ``file:///abs/path``. ``file://`` followed by anything but ``/`` is a
    host or user-info (``file://KEY:SECRET@host/x``), which would otherwise be read as a relative path
    that holds the secret: refused, and the secret is never echoed.

    Raises:
        ValueError: a ``file://`` URI with a host or user-info.
    """
    if not uri.startswith("file://"):
        return uri
    path = uri[len("file://") :]
    if not path.startswith("/"):
        host = "user-info" if "@" in path else "a host"
        raise ValueError(f"file:// URIs must be file:///absolute/path, without {host}: {redact(uri)}")
    return path


def _s3_settings(storage: StorageConfig) -> tuple[str | None, str | None, str | None]:
    """(scheme, host[:port], region) from config, else the standard AWS environment variables."""
    endpoint = storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    scheme = host = None
    if endpoint:
        if "@" in endpoint:  # user-info, with or without a scheme; no endpoint has another use for "@"
            raise ValueError(f"S3 endpoint must not embed credentials: {redact(endpoint)}")
        scheme, _, rest = endpoint.partition("://")
        scheme, host = (scheme, rest.rstrip("/")) if rest else ("https", endpoint.rstrip("/"))
    region = storage.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return scheme, host, region


@functools.lru_cache(maxsize=8)
def _s3(scheme: str | None, host: str | None, region: str | None) -> pafs.S3FileSystem:
    # One client per process and endpoint: connection pools and the credential lookup are reused
    # across the thousands of per-row image fetches an actor makes.
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_ATTEMPTS)}
    if host:
        kwargs.update(endpoint_override=host, scheme=scheme)
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage: StorageConfig | None = None, max_bytes: int | None = None) -> bytes:
    """Reads a whole object.

    Args:
        max_bytes: refuse objects larger than this (read stops at ``max_bytes + 1``), so a stray
            multi-gigabyte object cannot exhaust an actor's memory.

    Raises:
        FileNotFoundError: the object does not exist.
        TooLargeError: the object is larger than ``max_bytes``.
    """
    fs, path = resolve(uri, storage)
    with fs.open_input_stream(path) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLargeError(f"more than {max_bytes} bytes")
    return data


class TooLargeError(ValueError):
    """An object above the caller's ``max_bytes``: refused before (local) or while (S3) reading it."""


class InvalidURIError(ValueError):
    """A URI no attempt can read: an unsupported scheme, a NUL byte, embedded credentials, a ``file://``
    host. Permanent, unlike an ``OSError`` that outlived its retries."""


class NotAllowedError(PermissionError):
    """A local path that may not be read: outside the allowed roots, or not a regular file.

    The message is always the same, so that it never tells which paths exist on the node.
    """

    def __init__(self) -> None:
        super().__init__("not allowed (local paths must be regular files under data.image_uri_roots)")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_local_file(path: str, roots: tuple[str, ...], max_bytes: int | None = None) -> bytes:
    """Reads a regular file under one of ``roots`` (directories already ``os.path.realpath``-ed).

    The path is resolved (symlinks, ``..``) before the root check; the file is opened non-blocking
    (a FIFO never hangs the reader) and without following a final symlink, and its size is checked
    with ``fstat`` on the open descriptor, before a byte is read, so ``/dev/zero`` or a FIFO are
    refused without reading and a file swapped after the check is never the one read.

    Raises:
        NotAllowedError: outside ``roots``, not a regular file, or not readable (one message for all).
        FileNotFoundError: under a root but absent (paths under a root are the user's own to know).
        TooLargeError: larger than ``max_bytes``.
    """
    real = os.path.realpath(path)
    if not any(_within(real, root) for root in roots):
        raise NotAllowedError()
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise FileNotFoundError("no such file") from None
    except OSError:  # EACCES, ELOOP (a symlink swapped in), ENXIO (a socket) ...
        raise NotAllowedError() from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAllowedError()
        if max_bytes is not None and info.st_size > max_bytes:
            raise TooLargeError(f"{info.st_size} bytes, above the limit of {max_bytes}")
        limit = info.st_size if max_bytes is None else max_bytes
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):  # a file that grows stops at limit + 1
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise TooLargeError(f"file grew while read, above the limit of {limit}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def fetch_bytes(
    uri: str,
    storage: StorageConfig | None = None,
    attempts: int = 3,
    backoff_s: float = 0.25,
    max_bytes: int | None = None,
    local_roots: tuple[str, ...] | None = None,
) -> bytes:
    """``read_bytes`` with retries (exponential backoff) on transient errors.

    A missing object, a permission error or an oversized object is not retried. Error messages are
    redacted.

    Args:
        local_roots: when given, a local path (or ``file://``) is read only through
            ``read_local_file`` under these roots; ``()`` refuses every local path. For URIs that
            come from data rather than from the operator.

    Raises:
        FileNotFoundError: the object does not exist.
        NotAllowedError: a local path refused by ``local_roots``.
        TooLargeError: larger than ``max_bytes``.
        InvalidURIError: a URI that cannot name anything readable (permanent).
        OSError / ValueError: a permanent error, or a transient one that outlived ``attempts``.
    """
    if "\x00" in uri:  # no filesystem or S3 key holds one; Python and Arrow refuse it in their own ways
        raise InvalidURIError(f"NUL byte in {redact(uri)!r}")
    try:
        if local_roots is not None and not is_s3(uri) and ("://" not in uri or uri.startswith("file://")):
            return read_local_file(_file_path(uri), local_roots, max_bytes)
        resolve(uri, storage)  # the scheme, credentials and file:// host checks: no attempt changes them
    except TooLargeError:
        raise
    except ValueError as e:
        raise InvalidURIError(redact(str(e))) from None
    for attempt in range(attempts):
        try:
            return read_bytes(uri, storage, max_bytes)
        except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as e:
            raise type(e)(redact(str(e))) from None
        except OSError as e:
            message = redact(str(e))
            if attempt == attempts - 1 or not is_s3(uri) or any(p in message for p in _PERMANENT):
                raise OSError(message) from None
            time.sleep(backoff_s * 2**attempt)
    raise ValueError(f"attempts must be >= 1, got {attempts}")


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
        raise FileNotFoundError(f"no Parquet data at {redact(uri)}")
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
        raise FileNotFoundError(f"no Parquet files at {redact(uri)}")
    return sorted(files)


def copy_dir_to(local_dir: str | Path, uri: str, storage: StorageConfig | None = None) -> None:
    """Copies a local directory tree to ``uri`` (local or S3)."""
    fs, path = resolve(uri, storage)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextlib.contextmanager
def local_dir(uri: str, storage: StorageConfig | None = None) -> Iterator[str]:
    """A local directory with the contents of ``uri``: the directory itself when it is local, else a
    download (``copy_dir_from``) that is removed on exit. Never deletes a caller's own directory."""
    local = copy_dir_from(uri, storage)
    try:
        yield local
    finally:
        if is_s3(uri):
            shutil.rmtree(local, ignore_errors=True)


def copy_dir_from(uri: str, storage: StorageConfig | None = None) -> str:
    """Returns a local directory with the contents of ``uri``; local URIs are returned as-is."""
    fs, path = resolve(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no directory at {uri}")
        return path
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no directory at {redact(uri)}")
    local = tempfile.mkdtemp(prefix="mmray-")
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local
