"""Per-target leases: at most one scoring run works on (and publishes into) a target at a time.

Local disk: ``flock`` on a hidden file (``commit`` puts it beside the target). The kernel drops the lock
when its holder dies, however it dies, so a local lease is never stale; the file only carries the
holder's record for the loser's error message, and is removed on release. On NFS the Linux client maps
``flock`` to NFS byte-range locks (NFSv4, or v3 with lockd); a crashed *client* releases them only when
the server's lease on it runs out (about 90 s).

S3 (no locks, no rename): the object ``<target>/_lease``, created with ``If-None-Match: *``: of two
concurrent creators exactly one succeeds. Its body names the holder and an expiry, and the holder renews
it (``If-Match`` on its own ETag) every third of the TTL from a background thread. A lease whose holder
is provably gone (same host, boot and PID namespace, process gone) or that expired is broken by replacing it with ``If-Match`` on the
ETag that was read, so of two breakers only one wins. ``check`` (before publishing) confirms the object
is still this holder's. The limit: a holder frozen for longer than the TTL (a stopped VM) can lose its
lease and not notice until its next ``check``; between that check and the end of its short copy phase
a breaker could start publishing too. pyarrow's S3 filesystem cannot make conditional requests, so
this module uses boto3 with the endpoint, region and credential chain ``mmray.data.storage`` resolves.

Process records (host, boot id, PID namespace, pid, process start time) identify a holder; ``commit``
uses the same records for its staging directories. A holder is dead at once only when this process can
prove it: same host, same boot, same PID namespace, and that pid is gone or now a different process.
Anything else (another host, another boot, another PID namespace, as for two host-network pods sharing
a hostname, or a record from an older version without these fields) is alive until its lease expires.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from mmray.config import StorageConfig
from mmray.data import storage

__all__ = [
    "DEFAULT_TTL_S",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "acquire",
    "describe",
    "process_record",
    "record_alive",
    "s3_client",
]

DEFAULT_TTL_S = 300.0  # an S3 lease whose holder stopped renewing is broken this long after its last renewal
_CLOCK_SKEW_S = 30.0  # hosts' clocks may disagree this much: an expired lease is broken only after it too
_FOREIGN_TTL_S = 24 * 3600  # a record whose pid means nothing here, without an expiry (staging), lives this long


class LeaseHeldError(ValueError):
    """Another live run holds the target's lease (the CLI exits 2 with this one-line message)."""


class LeaseLostError(RuntimeError):
    """This run's lease was broken or replaced while it worked; it must not publish."""


# --------------------------------------------------------------------------------------------------
# Process records
# --------------------------------------------------------------------------------------------------


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]``); '' when unknown or when ``/proc`` was mounted
    by another PID namespace (its pids are then not the ones ``os.getpid`` and ``os.kill`` use)."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return ""
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_token(pid: int) -> str | None:
    """Identifies a process instance (pid + start time), so a reused pid is not mistaken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{_boot_id()}:{pid}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22: starttime


def process_record(**extra: Any) -> dict[str, Any]:
    """This process: host, boot id, PID namespace, pid, start-time token, creation time (plus ``extra``)."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "pid": pid,
        "token": _process_token(pid),
        "created": time.time(),
        **extra,
    }


def _pids_comparable(record: dict) -> bool:
    """Whether the record's pid means the same process here: same host, boot and PID namespace, all known."""
    here = (socket.gethostname(), _boot_id(), _pid_namespace())
    return all(here) and (record.get("host"), record.get("boot_id"), record.get("pid_ns")) == here


def record_alive(record: dict | None) -> bool:
    """Whether the process a record names may still be running.

    Same host, boot and PID namespace: the process (pid and start time) exists. Otherwise its pid says
    nothing here (two pods with one hostname each see the other's pid as free), so the record is alive
    until its ``expires`` (plus clock skew) or, without one, for a day after it was created. No or
    garbled record: dead.
    """
    if not isinstance(record, dict):
        return False
    try:
        if not _pids_comparable(record):
            if record.get("expires") is not None:
                return time.time() < float(record["expires"]) + _CLOCK_SKEW_S
            return time.time() - float(record.get("created", 0)) < _FOREIGN_TTL_S
        pid = int(record.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if record.get("token"):
        return _process_token(pid) == record["token"]
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return True


def describe(record: dict | None) -> str:
    """``pid 123 on host h since 2026-05-01T07:00:00Z`` (or what is known of it)."""
    if not isinstance(record, dict):
        return "an unknown holder"
    since = ""
    with contextlib.suppress(TypeError, ValueError, OverflowError):
        since = " since " + dt.datetime.fromtimestamp(float(record["created"]), dt.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}{since}"


def _parse(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# --------------------------------------------------------------------------------------------------
# Leases
# --------------------------------------------------------------------------------------------------


class Lease(Protocol):
    """A held lease. ``check`` raises ``LeaseLostError`` when it is no longer this run's."""

    uri: str

    def check(self) -> None: ...

    def release(self) -> None: ...


def _held(uri: str, what: str, record: dict | None) -> LeaseHeldError:
    return LeaseHeldError(
        f"{what} is being scored by another run ({describe(record)}; lease {storage.redact(uri)}); "
        "nothing was done: rerun after it finishes"
    )


@contextlib.contextmanager
def acquire(uri: str, store: StorageConfig, what: str, ttl_s: float = DEFAULT_TTL_S):
    """Holds the lease at ``uri`` (a local file or an S3 object) for the ``with`` block.

    Args:
        what: the target, for the error message.
        ttl_s: S3 only: how long a lease outlives its last renewal.

    Raises:
        LeaseHeldError: a live run holds it (naming that run).
    """
    if storage.is_s3(uri):
        bucket, _, key = storage.resolve(uri, store)[1].partition("/")
        lease: _LocalLease | _S3Lease = _S3Lease.take(s3_client(store), bucket, key, uri, what, ttl_s)
    else:
        lease = _LocalLease.take(storage.resolve(uri, store)[1], uri, what)
    try:
        yield lease
    finally:
        lease.release()


class _LocalLease:
    def __init__(self, path: str, uri: str, fd: int):
        self.path, self.uri, self._fd = path, uri, fd

    @classmethod
    def take(cls, path: str, uri: str, what: str) -> _LocalLease:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise _held(uri, what, holder) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed by a releasing holder after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(process_record()).encode(), 0)
        os.fsync(fd)
        return cls(path, uri, fd)

    def check(self) -> None:
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise LeaseLostError(f"lease {self.uri} was removed while this run held it; nothing was committed")

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)  # while locked: a waiter that opened it re-checks the inode
        os.close(self._fd)
        self._fd = -1


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, region: str | None):
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=BotoConfig(retries={"mode": "standard", "max_attempts": 3}),
    )


def s3_client(store: StorageConfig):
    """A boto3 S3 client with the endpoint and region ``mmray.data.storage`` resolves (credentials: the
    standard AWS chain), for what pyarrow cannot do: conditional writes and ETags."""
    scheme, host, region = storage._s3_settings(store)
    return _client(f"{scheme}://{host}" if host else None, region)


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class _S3Lease:
    def __init__(self, client, bucket: str, key: str, uri: str, ttl_s: float, record: dict, etag: str):
        self.client, self.bucket, self.key, self.uri, self.ttl_s = client, bucket, key, uri, ttl_s
        self.record, self._etag, self._lost = record, etag, ""
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="mmray-lease", daemon=True)

    @classmethod
    def take(cls, client, bucket: str, key: str, uri: str, what: str, ttl_s: float) -> _S3Lease:
        from botocore.exceptions import ClientError

        lease_id = uuid.uuid4().hex
        for _ in range(5):
            record = process_record(lease_id=lease_id, expires=time.time() + ttl_s)
            try:
                etag = client.put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode(), IfNoneMatch="*")[
                    "ETag"
                ]
                return cls(client, bucket, key, uri, ttl_s, record, etag)._start()
            except ClientError as e:
                if _code(e) not in _CONFLICT:
                    raise
            holder, etag = cls._read(client, bucket, key)
            if etag is None:
                continue  # released meanwhile: try to create it again
            if holder is not None and holder.get("lease_id") == lease_id:
                return cls(client, bucket, key, uri, ttl_s, holder, etag)._start()  # our retried create had landed
            if record_alive(holder):
                raise _held(uri, what, holder)
            try:  # stale (dead or expired holder): replace exactly the object we judged, nothing newer
                etag = client.put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode(), IfMatch=etag)["ETag"]
                return cls(client, bucket, key, uri, ttl_s, record, etag)._start()
            except ClientError as e:
                if _code(e) not in _CONFLICT | _MISSING:
                    raise
        raise _held(uri, what, None)

    @staticmethod
    def _read(client, bucket: str, key: str) -> tuple[dict | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _code(e) in _MISSING:
                return None, None
            raise
        return _parse(obj["Body"].read()), obj["ETag"]

    def _start(self) -> _S3Lease:
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self.ttl_s / 3):
            record = {**self.record, "expires": time.time() + self.ttl_s}
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._etag = self.client.put_object(
                        Bucket=self.bucket, Key=self.key, IfMatch=self._etag, Body=json.dumps(record).encode()
                    )["ETag"]
                    self.record = record
                except ClientError as e:
                    if _code(e) in _CONFLICT | _MISSING:
                        self._lost = "it was broken or replaced by another run"
                        return
                except BotoCoreError:
                    pass  # a network blip: the next renewal (a third of the TTL later) tries again

    def check(self) -> None:
        with self._lock:
            if not self._lost:
                holder, etag = self._read(self.client, self.bucket, self.key)
                if etag is None or (holder or {}).get("lease_id") != self.record["lease_id"]:
                    self._lost = f"it is now held by {describe(holder)}" if etag else "it was removed"
        if self._lost:
            raise LeaseLostError(
                f"this run lost its lease {storage.redact(self.uri)} ({self._lost}); nothing was committed"
            )

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        with self._lock:
            if self._lost:
                return
            self._lost = "released"
            with contextlib.suppress(ClientError, BotoCoreError):  # not ours any more, or gone: expiry frees it
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
