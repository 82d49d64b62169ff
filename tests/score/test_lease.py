"""Per-target leases without Ray: local flock files and S3 conditional-create objects (moto server)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import boto3
import pytest

from mmray.config import StorageConfig
from mmray.score import lease
from mmray.score.lease import LeaseHeldError, LeaseLostError
from tests.helpers import REPO

HOLD = """
import sys, time
from mmray.config import StorageConfig
from mmray.score import lease
with lease.acquire(sys.argv[1], StorageConfig(s3_endpoint_url=sys.argv[2] or None), "the target"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_in_subprocess(uri: str, endpoint: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, uri, endpoint], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --------------------------------------------------------------------------------------------------
# Local: flock
# --------------------------------------------------------------------------------------------------


def test_local_lease_is_exclusive_names_its_holder_and_is_removed_on_release(tmp_path):
    path = str(tmp_path / "_lease-out")
    with lease.acquire(path, StorageConfig(), "out") as held:
        held.check()
        with pytest.raises(LeaseHeldError) as e:
            with lease.acquire(path, StorageConfig(), "out"):
                pass
        message = str(e.value)
        assert f"out is being scored by another run (pid {os.getpid()} on host {os.uname().nodename} since" in message
        assert "\n" not in message and json.loads(open(path).read())["pid"] == os.getpid()
    assert not os.path.exists(path)
    with lease.acquire(path, StorageConfig(), "out"):
        pass


def test_a_killed_local_holder_frees_the_lease_at_once(tmp_path):
    path = str(tmp_path / "_lease-out")
    proc = hold_in_subprocess(path)
    try:
        with pytest.raises(LeaseHeldError, match=f"pid {proc.pid} "):
            with lease.acquire(path, StorageConfig(), "out"):
                pass
    finally:
        kill(proc)
    with lease.acquire(path, StorageConfig(), "out") as held:  # the kernel dropped the dead holder's lock
        held.check()


# --------------------------------------------------------------------------------------------------
# S3: If-None-Match create, expiry, If-Match renewal and breaking
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def s3(s3_server, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    uri = f"s3://{s3_bucket}/preds/date=d1/_lease"
    return {
        "client": client,
        "bucket": s3_bucket,
        "key": "preds/date=d1/_lease",
        "uri": uri,
        "store": StorageConfig(s3_endpoint_url=s3_server),
        "endpoint": s3_server,
    }


def stored(s3) -> dict | None:
    try:
        return json.loads(s3["client"].get_object(Bucket=s3["bucket"], Key=s3["key"])["Body"].read())
    except s3["client"].exceptions.NoSuchKey:
        return None


def plant(s3, **record) -> None:
    s3["client"].put_object(Bucket=s3["bucket"], Key=s3["key"], Body=json.dumps(record).encode())


def test_s3_lease_is_a_conditional_create_released_by_delete(s3):
    with lease.acquire(s3["uri"], s3["store"], "preds/date=d1") as held:
        held.check()
        assert stored(s3)["pid"] == os.getpid()
        with pytest.raises(LeaseHeldError, match=r"preds/date=d1 is being scored by another run \(pid "):
            with lease.acquire(s3["uri"], s3["store"], "preds/date=d1"):
                pass
    assert stored(s3) is None
    with lease.acquire(s3["uri"], s3["store"], "preds/date=d1"):
        pass


def test_s3_lease_of_a_killed_holder_on_this_host_is_broken_at_once(s3):
    proc = hold_in_subprocess(s3["uri"], s3["endpoint"])
    kill(proc)
    assert stored(s3)["pid"] == proc.pid  # the dead holder's lease is still there, unexpired
    with lease.acquire(s3["uri"], s3["store"], "t", ttl_s=3600):
        assert stored(s3)["pid"] == os.getpid()


def test_s3_lease_of_another_host_holds_until_it_expires(s3):
    plant(s3, host="elsewhere", pid=1, created=time.time(), expires=time.time() + 600, lease_id="x")
    with pytest.raises(LeaseHeldError, match="pid 1 on host elsewhere"):
        with lease.acquire(s3["uri"], s3["store"], "t"):
            pass
    plant(s3, host="elsewhere", pid=1, created=time.time() - 900, expires=time.time() - 300, lease_id="x")
    with lease.acquire(s3["uri"], s3["store"], "t"):
        assert stored(s3)["lease_id"] != "x"
    plant(s3, garbage=True)  # an unreadable record names no live holder
    with lease.acquire(s3["uri"], s3["store"], "t"):
        assert stored(s3)["pid"] == os.getpid()


def test_s3_lease_is_renewed_while_held(s3):
    with lease.acquire(s3["uri"], s3["store"], "t", ttl_s=0.9) as held:
        first = stored(s3)["expires"]
        time.sleep(2.0)
        renewed = stored(s3)
        assert renewed["lease_id"] == held.record["lease_id"] and renewed["expires"] > first
        assert renewed["expires"] > time.time()
        held.check()


def test_of_two_breakers_of_one_stale_lease_only_one_wins(s3, monkeypatch):
    plant(s3, host="elsewhere", pid=1, created=0, expires=1, lease_id="stale")
    stale_view = lease._S3Lease._read(s3["client"], s3["bucket"], s3["key"])
    with lease.acquire(s3["uri"], s3["store"], "t") as winner:
        real_read, reads = lease._S3Lease._read, []

        def late_read(*args):  # the second breaker read the stale lease before the winner replaced it
            reads.append(1)
            return stale_view if len(reads) == 1 else real_read(*args)

        monkeypatch.setattr(lease._S3Lease, "_read", staticmethod(late_read))
        with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()} "):
            with lease.acquire(s3["uri"], s3["store"], "t"):
                pass
        assert len(reads) == 2 and stored(s3)["lease_id"] == winner.record["lease_id"]
        winner.check()


def test_s3_lease_replaced_under_its_holder_is_lost_and_left_alone(s3):
    with lease.acquire(s3["uri"], s3["store"], "t") as held:
        plant(s3, host="elsewhere", pid=7, created=time.time(), expires=time.time() + 600, lease_id="theirs")
        with pytest.raises(LeaseLostError, match="now held by pid 7 on host elsewhere"):
            held.check()
    assert stored(s3)["lease_id"] == "theirs"  # release never deletes another run's lease


# --------------------------------------------------------------------------------------------------
# Liveness: a pid is judged only within its own host, boot and PID namespace
# --------------------------------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def here(**fields) -> dict:
    """A record of a process on this host, boot and PID namespace (``fields`` override)."""
    return {**lease.process_record(), **fields}


def test_a_dead_pid_is_dead_only_in_this_host_boot_and_pid_namespace():
    gone, now = dead_pid(), time.time()
    assert lease.record_alive(here())
    assert not lease.record_alive(here(pid=gone, token=None))
    assert not lease.record_alive(here(token="a different process"))  # the pid was reused
    for other in ({"pid_ns": "pid:[1]"}, {"boot_id": "another-boot"}, {"host": "elsewhere"}):
        assert lease.record_alive(here(pid=gone, token=None, **other, expires=now + 60)), other
        assert not lease.record_alive(here(pid=gone, token=None, **other, expires=now - 60 - lease._CLOCK_SKEW_S))
        assert lease.record_alive(here(pid=gone, token=None, **other))  # no expiry (staging): a day from created
        assert not lease.record_alive(here(pid=gone, token=None, **other, created=now - 2 * lease._FOREIGN_TTL_S))
    older_version = {"host": os.uname().nodename, "pid": gone, "token": "x", "created": now, "expires": now + 60}
    assert lease.record_alive(older_version)  # written before records named their PID namespace


def test_s3_lease_of_a_holder_in_another_pid_namespace_holds_until_it_expires(s3):
    """Two host-network pods share a hostname; the other pod's pid is not ours to look up."""
    theirs = here(pid=dead_pid(), pid_ns="pid:[4026532999]", lease_id="theirs", expires=time.time() + 600)
    plant(s3, **theirs)
    with pytest.raises(LeaseHeldError, match=f"pid {theirs['pid']} on host"):
        with lease.acquire(s3["uri"], s3["store"], "t"):
            pass
    assert stored(s3)["lease_id"] == "theirs"
    plant(s3, **{**theirs, "expires": time.time() - 300})
    with lease.acquire(s3["uri"], s3["store"], "t"):
        assert stored(s3)["lease_id"] != "theirs"


def unshare_works() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="needs root and unshare -p -f --mount-proc")
def test_s3_lease_held_from_another_real_pid_namespace_is_not_broken(s3):
    holder = subprocess.Popen(
        ["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c", HOLD, s3["uri"], s3["endpoint"]],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        record = stored(s3)
        assert record["pid_ns"] != lease.process_record()["pid_ns"] and record["host"] == os.uname().nodename
        with pytest.raises(LeaseHeldError, match=f"pid {record['pid']} on host"):
            with lease.acquire(s3["uri"], s3["store"], "t"):
                pass
        assert stored(s3)["lease_id"] == record["lease_id"]
    finally:
        kill(holder)
