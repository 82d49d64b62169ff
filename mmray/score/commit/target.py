"""The output location of one scoring run, the names the commit gives files in and beside it, and its lease.

Every other part of the commit builds paths from here, so a hidden name (``_staging-*``, ``_lease``,
``_old-*``) is spelled once and the local and S3 layouts differ in one function (``companion``).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from mmray.config import StorageConfig
from mmray.data import storage
from mmray.score import lease as leases
from mmray.score.lease import Lease

__all__ = [
    "LEASE",
    "MANIFEST",
    "MARKERS",
    "METRICS",
    "OLD",
    "OWNER",
    "QUARANTINE",
    "QUARANTINE_FILE",
    "RAW",
    "STAGING",
    "SUCCESS",
    "ConcurrentCommitError",
    "OutputExistsError",
    "Target",
    "check_apart",
    "check_location",
    "companion",
    "companion_home",
    "lease",
    "validate_partition",
]

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
QUARANTINE = "_quarantine"
METRICS = "_metrics.json"
QUARANTINE_FILE = f"{QUARANTINE}/part-00000.parquet"
RAW = "_raw"  # Ray's streaming write lands here, inside staging; never published
OWNER = "_owner.json"
LEASE = "_lease"  # S3: <target>/_lease; local: <parent>/_lease-<name>
STAGING = re.compile(r"^_staging-(?P<run>[0-9a-f]{12})(?:-(?P<name>.+))?$")
OLD = re.compile(r"^_old-(?P<run>[0-9a-f]{12})-(?P<name>.+)$")  # the previous partition in a two-rename swap
MARKERS = {SUCCESS, MANIFEST, QUARANTINE}  # any of these: the directory is an mmray commit (or a rejected run's)
_PARTITION_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_BAD_VALUE_CHARS = re.compile(r"[/\\=*?\[\]\x00-\x1f\x7f]")


class OutputExistsError(ValueError):
    """The target already holds a committed result from a different input, model or setting."""


class ConcurrentCommitError(ValueError):
    """Another run committed to the target while this one was scoring (its lease was broken)."""


def validate_partition(partition: dict[str, str]) -> None:
    """Refuses partition keys/values that could escape the output prefix, hide it, or break paths.

    Keys are identifiers (a leading ``_`` or ``.`` would make the partition invisible to readers);
    values may not contain ``/``, ``\\``, ``..``, ``=``, glob characters or control characters.
    """
    for key, value in partition.items():
        if not isinstance(key, str) or not _PARTITION_KEY.match(key):
            raise ValueError(f"invalid partition key {key!r}: letters, digits and '_', starting with a letter")
        if not isinstance(value, str) or not value:
            raise ValueError(f"invalid partition value {value!r} for key {key!r}: must be a non-empty string")
        bad = _BAD_VALUE_CHARS.search(value)
        if bad or ".." in value:
            what = repr(bad.group()) if bad else "'..'"
            raise ValueError(
                f"invalid partition value {value!r} for key {key!r}: contains {what} "
                "(no '/', '\\', '..', '=', glob or control characters)"
            )
        if len(f"{key}={value}".encode()) > 255:
            raise ValueError(f"invalid partition {key}={value!r}: longer than 255 bytes")


@dataclass(frozen=True)
class Target:
    """Where one scoring run's output lands: ``base_uri[/k=v...]``, partition keys sorted (``b=2/a=1``
    and ``a=1/b=2`` are one target, so one lease and one identity)."""

    base_uri: str
    partition: dict[str, str] = field(default_factory=dict)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        validate_partition(self.partition)
        object.__setattr__(self, "partition", dict(sorted(self.partition.items())))

    @property
    def uri(self) -> str:
        base = self.base_uri.rstrip("/") or self.base_uri
        return storage.join(base, *(f"{k}={v}" for k, v in self.partition.items()))

    def resolve(self) -> tuple[pafs.FileSystem, str]:
        return storage.resolve(self.uri, self.storage)

    def child_uri(self, name: str) -> str:
        return storage.join(self.uri, name)


def _location(uri: str, store: StorageConfig) -> tuple[str, tuple[str, ...]]:
    """(filesystem kind, path components) of ``uri``; local paths with symlinks resolved, so two spellings
    of one directory compare equal."""
    fs, path = storage.resolve(uri, store)
    if isinstance(fs, pafs.LocalFileSystem):
        return "local", tuple(p for p in os.path.realpath(path).split("/") if p)
    return "s3", tuple(p for p in path.split("/") if p)


def check_apart(target: Target, input_uri: str) -> None:
    """Refuses an output inside the input, an input inside the output, or one location for both.

    Output inside the input commits once, and then every rerun reads the committed Parquet files as
    input (and fails on their schema, or scores its own predictions); input inside the output would be
    replaced by the publish that the scoring fed. Checked before any work, on the paths as resolved.

    Raises:
        ValueError: naming both locations.
    """
    out_kind, out = _location(target.uri, target.storage)
    in_kind, inp = _location(input_uri, target.storage)
    if out_kind != in_kind:
        return
    shown_out, shown_in = storage.redact(target.uri), storage.redact(input_uri)
    if out == inp:
        raise ValueError(f"--output {shown_out} is the input {shown_in}: choose an output outside the input")
    if out[: len(inp)] == inp:
        raise ValueError(
            f"--output {shown_out} is inside the input {shown_in}: a rerun would read the committed output "
            "as input; choose an output outside the input"
        )
    if inp[: len(out)] == out:
        raise ValueError(
            f"--input {shown_in} is inside the output {shown_out}: publishing would replace the input; "
            "choose an output outside the input"
        )


def check_location(target: Target) -> None:
    """Refuses a local output that publishing could never replace, before any work: a file, a path
    through a file, a symbolic link (the swap would replace the link, not what it points to, and an
    ``--overwrite`` would leave the committed folder it names in place) or a mount point (a rename
    cannot move it: ``Device or resource busy``, after all the scoring). S3 has none of these.

    Raises:
        OutputExistsError: naming the output and what it is.
    """
    fs, final = target.resolve()
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    shown = storage.redact(target.uri)
    parts = final.split("/")
    for n in range(2, len(parts) + 1):
        here = "/".join(parts[:n])
        if here == final and os.path.islink(here):  # a linked parent is fine: staging sits beside the target
            raise OutputExistsError(
                f"{shown}: {here} is a symbolic link; give the directory it points to ({os.path.realpath(here)})"
            )
        if not os.path.exists(here):
            return
        if not os.path.isdir(here):
            what = "is a file" if here == final else f"is inside {here}, which is a file"
            raise OutputExistsError(f"{shown} {what}; the output must be a directory")
    if os.path.ismount(final):
        raise OutputExistsError(
            f"{shown} is a mount point, which publishing cannot swap (it renames the output into place); "
            "choose a directory inside it"
        )


def companion_home(fs: pafs.FileSystem, final: str) -> tuple[str, str | None]:
    """(directory holding a target's lease and staging directories, target name their names end with).

    Local: siblings of the target (``_staging-<run>-<name>``), so the final step is a rename within one
    filesystem. S3: inside the target (``_staging-<run>``; no name), where listing is cheap and readers
    skip it.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        return os.path.split(final)
    return final, None


def companion(fs: pafs.FileSystem, final: str, prefix: str) -> str:
    """The path of the target's hidden ``prefix`` entry: ``<parent>/<prefix>-<name>`` locally,
    ``<target>/<prefix>`` on S3."""
    parent, name = companion_home(fs, final)
    return f"{parent}/{prefix}" + (f"-{name}" if name is not None else "")


@contextlib.contextmanager
def lease(target: Target, ttl_s: float = leases.DEFAULT_TTL_S) -> Iterator[Lease]:
    """Holds ``target``'s lease (local: ``<parent>/_lease-<name>``; S3: ``<target>/_lease``).

    Raises:
        LeaseHeldError: another live run holds it; the message names that run.
    """
    fs, final = target.resolve()
    where = companion(fs, final, LEASE)
    uri = where if isinstance(fs, pafs.LocalFileSystem) else f"s3://{where}"
    with leases.acquire(uri, target.storage, storage.redact(target.uri), ttl_s) as held:
        yield held
