"""Exactly-once output commit for batch scoring: hidden staging, deterministic names, markers last.

A run writes everything into a hidden staging directory of its own (``_``-prefixed: Arrow, Spark, Ray
and DuckDB readers skip it), then publishes it to the target (``<output>[/k=v...]``):

* ``part-00000.parquet`` ... : the scored rows, under final, deterministic names.
* ``_quarantine/part-00000.parquet``: rows that failed preprocessing or prediction.
* ``_metrics.json`` (``--evaluate`` only), then ``_manifest.json`` (files, row counts, model_id, input
  files with sizes and mtimes, config hash), then ``_SUCCESS`` (counts) last.

After a commit the committed data files are exactly the non-hidden Parquet files in the target.

Local disk: the staging directory is a sibling of the target and is complete (markers included) before
it is renamed into place in one step; an existing target is swapped with ``renameat2(RENAME_EXCHANGE)``,
so readers see the old or the new partition, never a mix and never nothing. A killed run leaves only
hidden staging behind.

S3 (no rename): staging lives under ``<target>/_staging-<run>/``. Publishing deletes ``_SUCCESS``, copies
the files server-side to their final names, deletes names a previous commit had and this one has not,
and writes the markers. The copy phase is short; readers gated on ``_SUCCESS`` (``committed_files``
here) never see partial output, and a rerun rewrites the same names, so no duplicate survives.

Each staging directory holds an owner record (host, pid, process start time). A later run removes
staging whose owner is gone, but never that of a run still in progress.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmray.config import StorageConfig
from mmray.data import storage

__all__ = [
    "MANIFEST", "METRICS", "OutputExistsError", "QUARANTINE", "QUARANTINE_FILE", "SUCCESS", "Staging",
    "Target", "check_replaceable", "clean_stale_staging", "committed_files", "committed_run", "fingerprint_inputs",
    "identity_differences", "open_staging", "publish", "read_committed", "run_identity", "validate_partition",
    "write_rejected_quarantine",
]  # fmt: skip

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
QUARANTINE = "_quarantine"
METRICS = "_metrics.json"
QUARANTINE_FILE = f"{QUARANTINE}/part-00000.parquet"
RAW = "_raw"  # Ray's streaming write lands here, inside staging; never published
_OWNER = "_owner.json"
_STAGING = re.compile(r"^_staging-(?P<run>[0-9a-f]{12})(?:-(?P<name>.+))?$")
_FOREIGN_OWNER_TTL_S = 24 * 3600  # staging owned by another host is presumed dead after this long
_PARTITION_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_BAD_VALUE_CHARS = re.compile(r"[/\\=*?\[\]\x00-\x1f\x7f]")


class OutputExistsError(ValueError):
    """The target already holds a committed result from a different input, model or setting."""


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
    """Where one scoring run's output lands: ``base_uri[/k=v...]`` (partition keys in the given order)."""

    base_uri: str
    partition: dict[str, str] = field(default_factory=dict)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        validate_partition(self.partition)

    @property
    def uri(self) -> str:
        base = self.base_uri.rstrip("/") or self.base_uri
        return storage.join(base, *(f"{k}={v}" for k, v in self.partition.items()))

    def resolve(self) -> tuple[pafs.FileSystem, str]:
        return storage.resolve(self.uri, self.storage)

    def child_uri(self, name: str) -> str:
        return storage.join(self.uri, name)


# --------------------------------------------------------------------------------------------------
# Identity: what makes two runs "the same"
# --------------------------------------------------------------------------------------------------


def fingerprint_inputs(files: list[str], fs: pafs.FileSystem) -> list[dict[str, Any]]:
    """Path, size and mtime of every input file (S3: LastModified), in listing order."""
    out = []
    for info in fs.get_file_info(files):
        mtime = info.mtime.isoformat() if info.mtime else None
        out.append({"path": info.path, "size": info.size, "mtime": mtime})
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(inputs: list[dict], model_id: str, settings: dict[str, Any], partition: dict[str, str]) -> dict:
    """The identity of a (input, model, result-affecting settings, partition) combination.

    Args:
        settings: only what changes the committed result (not resources such as concurrency).
    """
    ident = {"inputs": inputs, "model_id": model_id, "config_hash": _digest(settings), "settings": settings,
             "partition": dict(partition)}  # fmt: skip
    ident["digest"] = _digest({k: ident[k] for k in ("inputs", "model_id", "config_hash", "partition")})
    return ident


def identity_differences(old: dict, new: dict) -> list[str]:
    """Human-readable reasons two identities differ (for the error that asks for ``--overwrite``)."""
    reasons = []
    if old.get("model_id") != new.get("model_id"):
        reasons.append(f"model_id {old.get('model_id')} -> {new.get('model_id')}")
    if old.get("inputs") != new.get("inputs"):
        reasons.append("input files changed (paths, sizes or mtimes)")
    if old.get("config_hash") != new.get("config_hash"):
        reasons.append(f"settings {old.get('settings')} -> {new.get('settings')}")
    return reasons or ["identity digest differs"]


# --------------------------------------------------------------------------------------------------
# Markers and readers
# --------------------------------------------------------------------------------------------------


def _read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as e:  # S3 reports a missing key as a generic OSError
        if "not found" in str(e).lower() or "nosuchkey" in str(e).lower().replace(" ", ""):
            return None
        raise


def _write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def committed_run(target: Target) -> dict | None:
    """The manifest of the committed run at ``target``, or None when nothing is committed there.

    Committed means: ``_SUCCESS`` exists and names the same run as ``_manifest.json``.
    """
    fs, path = target.resolve()
    success = _read_json(fs, f"{path}/{SUCCESS}")
    if not success:
        return None
    manifest = _read_json(fs, f"{path}/{MANIFEST}")
    if not manifest or manifest.get("run_id") != success.get("run_id"):
        return None
    return manifest


def _required_run(target: Target) -> dict:
    manifest = committed_run(target)
    if manifest is None:
        raise FileNotFoundError(f"no committed scoring output at {target.uri} (no {SUCCESS})")
    return manifest


def committed_files(target: Target) -> list[str]:
    """URIs of the committed data files, from the manifest; raises when nothing is committed.

    mmray's own readers use this instead of listing, so they never see a partial S3 publish.
    """
    return [target.child_uri(f["name"]) for f in _required_run(target)["files"]]


def read_committed(target: Target, columns: list[str] | None = None) -> pa.Table:
    """The committed rows (exactly the manifest's files) as one table."""
    manifest = _required_run(target)
    fs, path = target.resolve()
    tables = [pq.read_table(f"{path}/{f['name']}", filesystem=fs, columns=columns) for f in manifest["files"]]
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.null()) for c in columns or []})


def check_replaceable(target: Target) -> None:
    """Refuses a target that holds data mmray did not write (publishing replaces the whole directory).

    Replaceable: absent, empty, hidden entries only, or carrying one of mmray's markers (``_SUCCESS``,
    ``_manifest.json`` or ``_quarantine``, which an S3 publish copies first).
    """
    fs, final = target.resolve()
    info = fs.get_file_info(final)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise OutputExistsError(f"{target.uri} is a file; the output must be a directory")
    names = {os.path.basename(e.path) for e in fs.get_file_info(pafs.FileSelector(final))}
    foreign = sorted(n for n in names if not n.startswith(("_", ".")))
    if foreign and not names & {SUCCESS, MANIFEST, QUARANTINE}:
        raise OutputExistsError(
            f"{target.uri} holds data mmray did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); refusing to replace it: choose a new or empty output"
        )


# --------------------------------------------------------------------------------------------------
# Staging
# --------------------------------------------------------------------------------------------------


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _process_token(pid: int) -> str | None:
    """Identifies a process instance (pid + start time), so a reused pid is not mistaken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{_boot_id()}:{pid}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22: starttime


def _owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "token": _process_token(pid), "created": time.time()}


def _owner_alive(owner: dict | None) -> bool:
    if not owner:
        return False  # a dead run's leftovers (or a late write task of a killed run) without a record
    if owner.get("host") != socket.gethostname():
        return time.time() - float(owner.get("created", 0)) < _FOREIGN_OWNER_TTL_S
    pid = int(owner.get("pid", -1))
    if owner.get("token"):
        return _process_token(pid) == owner["token"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return True


@dataclass(frozen=True)
class Staging:
    """One run's hidden staging directory."""

    target: Target
    run_id: str
    fs: pafs.FileSystem
    path: str  # the staging directory (filesystem path)
    final: str  # the target directory (filesystem path)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def raw(self) -> str:
        return f"{self.path}/{RAW}"

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def write_json(self, name: str, obj: dict) -> None:
        _write_json(self.fs, self.file(name), obj)

    def discard(self) -> None:
        """Best effort: removes this run's staging (a killed run's is removed by a later run)."""
        with contextlib.suppress(OSError):
            self.fs.delete_dir(self.path)


def _staging_parent(fs: pafs.FileSystem, final: str) -> tuple[str, str | None]:
    """(directory holding a target's staging directories, target name their names end with).

    Local: siblings of the target (``_staging-<run>-<name>``), so the final step is a rename within one
    filesystem. S3: inside the target (``_staging-<run>``; no name), where listing is cheap and readers
    skip it.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        return os.path.split(final)
    return final, None


def _staging_dirs(fs: pafs.FileSystem, final: str) -> list[str]:
    """This target's staging directories (any run)."""
    parent, name = _staging_parent(fs, final)
    try:
        entries = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in entries:
        m = _STAGING.match(os.path.basename(e.path))
        if m and e.type == pafs.FileType.Directory and m.group("name") == name:
            out.append(e.path)
    return out


def clean_stale_staging(target: Target) -> list[str]:
    """Removes staging directories of runs that are no longer running; returns what it removed."""
    fs, final = target.resolve()
    removed = []
    for path in _staging_dirs(fs, final):
        if _owner_alive(_read_json(fs, f"{path}/{_OWNER}")):
            continue
        with contextlib.suppress(FileNotFoundError):
            fs.delete_dir(path)
        removed.append(path)
    return removed


def open_staging(target: Target, run_id: str) -> Staging:
    """Cleans stale staging, then creates this run's staging directory with its owner record."""
    if not re.fullmatch(r"[0-9a-f]{12}", run_id):
        raise ValueError(f"run_id must be 12 hex digits, got {run_id!r}")
    clean_stale_staging(target)
    fs, final = target.resolve()
    parent, name = _staging_parent(fs, final)
    path = f"{parent}/_staging-{run_id}" + (f"-{name}" if name is not None else "")
    fs.create_dir(path, recursive=True)
    _write_json(fs, f"{path}/{_OWNER}", _owner_record())
    return Staging(target, run_id, fs, path, final)


# --------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------


def publish(st: Staging, manifest: dict, success: dict) -> None:
    """Moves a complete staging directory to the target; ``_manifest.json`` then ``_SUCCESS`` land last.

    The staging directory must hold the data files named in ``manifest["files"]``, the quarantine file
    and (optionally) ``_metrics.json``; its ``_raw/`` directory is dropped.
    """
    if manifest.get("run_id") != st.run_id or success.get("run_id") != st.run_id:
        raise ValueError("manifest and _SUCCESS must name this staging's run_id")
    if st.fs.get_file_info(st.raw).type == pafs.FileType.Directory:
        st.fs.delete_dir(st.raw)
    if st.local:
        _publish_local(st, manifest, success)
    else:
        _publish_copy(st, manifest, success)


def _publish_local(st: Staging, manifest: dict, success: dict) -> None:
    st.fs.delete_file(st.file(_OWNER))
    st.write_json(MANIFEST, manifest)
    st.write_json(SUCCESS, success)
    _fsync_tree(st.path)
    _rename_into_place(st.path, st.final)


def _publish_copy(st: Staging, manifest: dict, success: dict) -> None:
    fs, final = st.fs, st.final
    names = [f["name"] for f in manifest["files"]]
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(f"{final}/{SUCCESS}")  # readers gated on _SUCCESS wait from here on
    fs.delete_dir_contents(f"{final}/{QUARANTINE}", missing_dir_ok=True)
    fs.copy_file(st.file(QUARANTINE_FILE), f"{final}/{QUARANTINE_FILE}")  # first: marks the target as ours
    for name in names:
        fs.copy_file(st.file(name), f"{final}/{name}")
    keep = set(names)
    for info in fs.get_file_info(pafs.FileSelector(final, allow_not_found=True)):
        base = os.path.basename(info.path)
        if info.type == pafs.FileType.File and not base.startswith(("_", ".")) and base not in keep:
            fs.delete_file(info.path)  # a name an earlier, larger commit had: no duplicate survives
    if fs.get_file_info(st.file(METRICS)).type == pafs.FileType.File:
        fs.copy_file(st.file(METRICS), f"{final}/{METRICS}")
    else:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(f"{final}/{METRICS}")
    _write_json(fs, f"{final}/{MANIFEST}", manifest)
    _write_json(fs, f"{final}/{SUCCESS}", success)
    st.discard()


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux ``renameat2``); False where the call is unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _rename_into_place(staging: str, final: str) -> None:
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    try:
        os.rename(staging, final)  # atomic; succeeds when the target is absent (or an empty directory)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if _exchange(staging, final):
            shutil.rmtree(staging)  # it now holds the previous partition
        else:
            # No atomic swap here: a short window without the partition (documented fallback).
            old = f"{staging}-old"
            os.rename(final, old)
            os.rename(staging, final)
            shutil.rmtree(old)
    _fsync(parent)


def _fsync(path: str) -> None:
    """Best effort: flushes one file or directory entry list to disk."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: str) -> None:
    """Flushes staged files before the rename makes them visible (a crash must not expose torn files)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def write_rejected_quarantine(target: Target, table: pa.Table, run_id: str) -> str:
    """Writes the quarantine of a run that is NOT committed (too many bad rows); returns its URI.

    Where nothing is committed, it goes to the usual ``_quarantine/part-00000.parquet``; next to a
    committed result it goes to ``_quarantine/_rejected-<run>.parquet``, leaving the committed
    quarantine (which matches the committed data) alone.
    """
    name = QUARANTINE_FILE if committed_run(target) is None else f"{QUARANTINE}/_rejected-{run_id}.parquet"
    fs, final = target.resolve()
    fs.create_dir(f"{final}/{QUARANTINE}", recursive=True)
    tmp = f"{final}/{QUARANTINE}/.tmp-{run_id}.parquet"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, f"{final}/{name}")  # local: atomic rename; S3: copy + delete of one small object
    return target.child_uri(name)
