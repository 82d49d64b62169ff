"""Exactly-once output commit for batch scoring: hidden staging, deterministic names, markers last.

A run writes everything into a hidden staging directory of its own (``_``-prefixed: Arrow, Spark, Ray
and DuckDB readers skip it), then publishes it to the target (``<output>[/k=v...]``):

* ``part-00000.parquet`` ... : the scored rows, under final, deterministic names.
* ``_quarantine/part-00000.parquet``: rows that failed preprocessing or prediction.
* ``_metrics.json`` (``--evaluate`` only), then ``_manifest.json`` (files, row counts, model_id, input
  files with sizes and content fingerprints, config hash), then ``_SUCCESS`` (counts) last.

After a commit the committed data files are exactly the non-hidden Parquet files in the target.

Local disk: the staging directory is a sibling of the target and is complete (markers included) before
it is renamed into place in one step; an existing target is swapped with ``renameat2(RENAME_EXCHANGE)``,
so readers see the old or the new partition, never a mix and never nothing. A killed run leaves only
hidden staging behind.

S3 (no rename): staging lives under ``<target>/_staging-<run>/``. Publishing deletes ``_SUCCESS``, copies
the files server-side to their final names, deletes names a previous commit had and this one has not,
and writes the markers. The copy phase is short; readers gated on ``_SUCCESS`` (``committed_files``
here) never see partial output, and a rerun rewrites the same names, so no duplicate survives.

Only one run at a time works on a target: it holds the target's lease (``mmray.score.lease``: ``flock``
on ``_lease-<name>`` beside a local target, a conditional-create ``<target>/_lease`` object on S3) from
before it decides anything until after it published, and re-checks the committed run under it just
before publishing. Readers need no lease: ``read_committed`` reads the files of one ``_SUCCESS``
generation and retries when a publish replaced it meanwhile.

A target is replaced only when it is absent, empty, or an mmray commit (it holds ``_SUCCESS``,
``_manifest.json`` or ``_quarantine``): hidden entries such as ``.ssh/`` are a user's data too.

Each staging directory holds an owner record (host, pid, process start time), written atomically and
removed only after the rename that publishes it. A later run removes staging whose owner is gone (an
unreadable record counts as gone), but never that of a run still in progress. Where the filesystem has
no atomic exchange (``renameat2``; e.g. NFS), an overwrite takes two renames via ``_old-<run>-<name>``;
a run killed between them leaves the target missing, and the next run restores it from there.
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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmray.config import StorageConfig
from mmray.data import storage
from mmray.score import lease as leases
from mmray.score.lease import Lease, LeaseHeldError, LeaseLostError

__all__ = [
    "ConcurrentCommitError", "Lease", "LeaseHeldError", "LeaseLostError", "MANIFEST", "METRICS", "OutputExistsError",
    "QUARANTINE", "QUARANTINE_FILE", "SUCCESS", "Staging", "Target", "carry_committed", "check_replaceable",
    "clean_stale_staging", "committed_files", "committed_run", "fingerprint_inputs", "identity_differences", "lease",
    "open_staging", "publish", "read_committed", "run_identity", "validate_partition", "write_rejected_quarantine",
]  # fmt: skip

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
QUARANTINE = "_quarantine"
METRICS = "_metrics.json"
QUARANTINE_FILE = f"{QUARANTINE}/part-00000.parquet"
RAW = "_raw"  # Ray's streaming write lands here, inside staging; never published
_OWNER = "_owner.json"
_LEASE = "_lease"  # S3: <target>/_lease; local: <parent>/_lease-<name>
_STAGING = re.compile(r"^_staging-(?P<run>[0-9a-f]{12})(?:-(?P<name>.+))?$")
_OLD = re.compile(r"^_old-(?P<run>[0-9a-f]{12})-(?P<name>.+)$")  # the previous partition in a two-rename swap
_MARKERS = {SUCCESS, MANIFEST, QUARANTINE}  # any of these: the directory is an mmray commit (or a rejected run's)
_READ_ATTEMPTS = 5  # read_committed retries this often when publishes keep replacing what it reads
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


# --------------------------------------------------------------------------------------------------
# Identity: what makes two runs "the same"
# --------------------------------------------------------------------------------------------------


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
        return [{"path": p, "size": h["ContentLength"], "content": "etag:" + h["ETag"].strip('"')}
                for p, h in zip(files, heads)]  # fmt: skip
    return [{"path": p, "size": os.path.getsize(p), "content": _footer_digest(p)} for p in files]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(inputs: list[dict], model_id: str, settings: dict[str, Any], partition: dict[str, str]) -> dict:
    """The identity of a (input, model, result-affecting settings, partition) combination.

    Args:
        settings: only what changes the committed result (not resources such as concurrency).
    """
    ident = {"inputs": inputs, "model_id": model_id, "config_hash": _digest(settings), "settings": settings,
             "partition": dict(sorted(partition.items()))}  # fmt: skip
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
    """Writes a JSON file; locally via a temporary file, fsync and rename, so no reader ever sees it
    half-written (an S3 PUT is atomic by itself)."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(path))


def _read_record(fs: pafs.FileSystem, path: str) -> dict | None:
    """An owner record; None when missing or unreadable (a record nobody can read names no live owner)."""
    try:
        return _read_json(fs, path)
    except (ValueError, UnicodeDecodeError):
        return None


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


def _success_run(fs: pafs.FileSystem, path: str) -> str | None:
    success = _read_json(fs, f"{path}/{SUCCESS}")
    return success.get("run_id") if success else None


def read_committed(target: Target, columns: list[str] | None = None) -> pa.Table:
    """The committed rows (exactly the manifest's files) as one table, all from one ``_SUCCESS`` generation.

    A publish that lands while the files are read (S3 copies over the same names; a local swap) is
    detected (``_SUCCESS`` names another run afterwards, or a row's ``run_id`` is not the manifest's)
    and the read starts again, so the result is never a mix of two runs.
    """
    fs, path = target.resolve()
    for _ in range(_READ_ATTEMPTS):
        manifest = _required_run(target)
        run_id = manifest["run_id"]
        try:
            tables = [pq.read_table(f"{path}/{f['name']}", filesystem=fs, columns=columns) for f in manifest["files"]]
        except (OSError, pa.ArrowInvalid):
            if _success_run(fs, path) == run_id:
                raise  # the generation did not change: a real error
            continue
        if _success_run(fs, path) != run_id:
            continue
        if any(t.num_rows and "run_id" in t.column_names
               and not pc.all(pc.equal(t["run_id"], f.get("run_id", run_id))).as_py()
               for t, f in zip(tables, manifest["files"])):  # fmt: skip
            continue
        return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.null()) for c in columns or []})
    raise RuntimeError(f"{storage.redact(target.uri)} was republished while being read, {_READ_ATTEMPTS} times; "
                       "read it again")  # fmt: skip


def check_replaceable(target: Target) -> None:
    """Refuses a target that holds data mmray did not write (publishing replaces the whole directory).

    Replaceable: absent, empty (but for this target's own lease and staging on S3), or carrying one of
    mmray's markers (``_SUCCESS``, ``_manifest.json`` or ``_quarantine``, which an S3 publish copies
    first). Hidden entries count: ``.ssh/`` or ``_archive/`` are somebody's data.
    """
    fs, final = target.resolve()
    info = fs.get_file_info(final)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise OutputExistsError(f"{target.uri} is a file; the output must be a directory")
    names = {os.path.basename(e.path) for e in fs.get_file_info(pafs.FileSelector(final))}
    names = {n for n in names if n != _LEASE and not _STAGING.match(n)}
    if names and not names & _MARKERS:
        shown = sorted(names)
        raise OutputExistsError(
            f"{target.uri} holds data mmray did not write ({', '.join(shown[:3])}"
            f"{', ...' if len(shown) > 3 else ''}); refusing to replace it: choose a new or empty output"
        )


# --------------------------------------------------------------------------------------------------
# Staging
# --------------------------------------------------------------------------------------------------


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


def carry_committed(st: Staging, manifest: dict) -> list[dict]:
    """Copies the data files of the commit ``manifest`` describes into ``st``'s staging, under their names
    (a hard link where the filesystem allows), for a new commit that keeps them; returns their manifest
    entries, each with the ``run_id`` that wrote it. Call it under the lease: the files are then the
    committed ones."""
    carried = []
    for f in manifest["files"]:
        src, dst = f"{st.final}/{f['name']}", st.file(f["name"])
        if st.local:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        else:
            st.fs.copy_file(src, dst)
        carried.append({**f, "run_id": f.get("run_id") or manifest["run_id"]})
    return carried


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


def _old_dirs(final: str) -> list[str]:
    """Local only: previous partitions a two-rename swap moved aside (``_old-<run>-<name>``)."""
    parent, name = os.path.split(final)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return sorted(os.path.join(parent, n) for n in os.listdir(parent)
                      if (m := _OLD.match(n)) and m.group("name") == name)  # fmt: skip
    return []


def clean_stale_staging(target: Target) -> list[str]:
    """Removes staging directories of runs that are no longer running; returns what it removed.

    Locally it first repairs a two-rename swap that was killed between its renames: a missing target is
    restored from its ``_old-*`` directory, and any other ``_old-*`` is removed. Call it under the lease.
    """
    fs, final = target.resolve()
    removed = []
    if isinstance(fs, pafs.LocalFileSystem):
        for old in _old_dirs(final):
            if not os.path.lexists(final):
                os.rename(old, final)  # the killed swap's previous partition comes back, whole
                _fsync(os.path.dirname(final))
                continue
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    for path in _staging_dirs(fs, final):
        if leases.record_alive(_read_record(fs, f"{path}/{_OWNER}")):
            continue
        with contextlib.suppress(FileNotFoundError):
            fs.delete_dir(path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def lease(target: Target, ttl_s: float = leases.DEFAULT_TTL_S) -> Iterator[Lease]:
    """Holds ``target``'s lease (local: ``<parent>/_lease-<name>``; S3: ``<target>/_lease``).

    Raises:
        LeaseHeldError: another live run holds it; the message names that run.
    """
    fs, final = target.resolve()
    parent, name = _staging_parent(fs, final)
    where = f"{parent}/{_LEASE}" + (f"-{name}" if name is not None else "")
    uri = where if isinstance(fs, pafs.LocalFileSystem) else f"s3://{where}"
    with leases.acquire(uri, target.storage, storage.redact(target.uri), ttl_s) as held:
        yield held


def open_staging(target: Target, run_id: str) -> Staging:
    """Cleans stale staging, then creates this run's staging directory with its owner record."""
    if not re.fullmatch(r"[0-9a-f]{12}", run_id):
        raise ValueError(f"run_id must be 12 hex digits, got {run_id!r}")
    clean_stale_staging(target)
    fs, final = target.resolve()
    parent, name = _staging_parent(fs, final)
    path = f"{parent}/_staging-{run_id}" + (f"-{name}" if name is not None else "")
    fs.create_dir(path, recursive=True)
    _write_json(fs, f"{path}/{_OWNER}", leases.process_record())
    return Staging(target, run_id, fs, path, final)


# --------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------


def publish(st: Staging, manifest: dict, success: dict, held: Lease) -> None:
    """Moves a complete staging directory to the target; ``_manifest.json`` then ``_SUCCESS`` land last.

    The staging directory must hold the data files named in ``manifest["files"]``, the quarantine file
    and (optionally) ``_metrics.json``; its ``_raw/`` directory is dropped.

    Args:
        held: the target's lease, checked before anything becomes visible (S3: and again before
            ``_SUCCESS``).

    Raises:
        LeaseLostError: the lease is no longer this run's; nothing was published (S3: if it was lost
            during the copy phase, ``_SUCCESS`` is not written and the target reads as uncommitted).
    """
    if manifest.get("run_id") != st.run_id or success.get("run_id") != st.run_id:
        raise ValueError("manifest and _SUCCESS must name this staging's run_id")
    if st.fs.get_file_info(st.raw).type == pafs.FileType.Directory:
        st.fs.delete_dir(st.raw)
    if st.local:
        _publish_local(st, manifest, success, held)
    else:
        _publish_copy(st, manifest, success, held)


def _publish_local(st: Staging, manifest: dict, success: dict, held: Lease) -> None:
    st.write_json(MANIFEST, manifest)
    st.write_json(SUCCESS, success)
    _fsync_tree(st.path)
    held.check()
    _rename_into_place(st.path, st.final, st.run_id)
    # Only now: until the rename, the record keeps other runs' cleanup away from this staging.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(st.final, _OWNER))
    _fsync(st.final)


def _publish_copy(st: Staging, manifest: dict, success: dict, held: Lease) -> None:
    fs, final = st.fs, st.final
    names = [f["name"] for f in manifest["files"]]
    held.check()
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
    held.check()
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


def _rename_into_place(staging: str, final: str, run_id: str) -> None:
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
            # No atomic swap here: a short window without the partition (documented fallback). Killed
            # between the renames, the next run restores the target from ``old`` (clean_stale_staging).
            old = os.path.join(parent, f"_old-{run_id}-{os.path.basename(final)}")
            os.rename(final, old)
            _fsync(parent)
            os.rename(staging, final)
            _fsync(parent)
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
