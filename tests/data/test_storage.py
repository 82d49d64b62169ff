"""storage: one resolver for local paths and s3:// (against a real S3 API server), retries, redaction."""

from __future__ import annotations

import os
import pickle
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmray.config import ConfigError, StorageConfig, config_from_dict
from mmray.data import storage
from tests.helpers import run_cli

SECRET = "s3cr3t-Never-Print-Me-7f2a"


@pytest.fixture
def s3(s3_server, s3_bucket) -> tuple[StorageConfig, str]:
    return StorageConfig(s3_endpoint_url=s3_server), f"s3://{s3_bucket}"


def test_resolve_local_paths(tmp_path):
    fs, path = storage.resolve(f"file://{tmp_path}/x.parquet")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/x.parquet"
    assert storage.resolve("~/x")[1] == os.path.expanduser("~/x")
    assert storage.resolve("rel/x")[1] == os.path.abspath("rel/x")


def test_resolve_s3_is_scheme_less_and_reuses_one_client(s3):
    store, bucket = s3
    fs, path = storage.resolve(f"{bucket}/a/b/", store)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{bucket[5:]}/a/b"
    assert storage.resolve(f"{bucket}/other", store)[0] is fs


@pytest.mark.parametrize(
    "uri, message",
    [
        ("gs://bucket/x", "unsupported URI scheme"),
        ("s3://", "without a bucket"),
        ("", "expected a local path or s3:// URI"),
    ],
)
def test_resolve_rejects_bad_uris(uri, message):
    with pytest.raises(ValueError, match=message):
        storage.resolve(uri)


def test_credentials_in_a_uri_are_refused_and_never_echoed():
    with pytest.raises(ValueError) as e:
        storage.resolve(f"s3://AKIAEXAMPLE:{SECRET}@bucket/data")
    assert SECRET not in str(e.value) and "must not embed credentials" in str(e.value)
    with pytest.raises(ValueError) as e:
        storage.resolve("s3://bucket/x", StorageConfig(s3_endpoint_url=f"http://user:{SECRET}@minio:9000"))
    assert SECRET not in str(e.value)


def test_config_refuses_credentials_in_the_endpoint():
    with pytest.raises(ConfigError, match="storage.s3_endpoint_url") as e:
        config_from_dict({"storage": {"s3_endpoint_url": f"https://key:{SECRET}@s3.example.com"}})
    assert SECRET not in str(e.value)


def test_redact_scrubs_credential_env_values_and_userinfo(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = storage.redact(f"failed with key {SECRET} at https://u:{SECRET}@host/x and s3://id:pw@b/k")
    assert SECRET not in text and "pw" not in text
    assert "https://***@host/x" in text and "s3://***@b/k" in text


_SCHEMES = st.sampled_from(["s3", "https", "http", "file", "postgresql", "mlflow+https", "git+ssh"])
_USERINFO = st.text(st.characters(codec="utf-8").filter(lambda c: not c.isspace()), min_size=1, max_size=40)
_HOST = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}(:[0-9]{1,5})?", fullmatch=True)
_PATH = st.from_regex(r"(/[A-Za-z0-9._-]{0,12}){0,4}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(_SCHEMES, _USERINFO, _HOST, _PATH)
def test_redact_removes_any_userinfo_of_any_scheme(scheme, userinfo, host, path):
    """Half of AWS secret keys hold a '/', some passwords '@', ':', '?', '#' or quotes: whatever sits
    between 'scheme://' and the last '@' is user-info and never survives, whatever the scheme."""
    message = f"cannot read '{scheme}://{userinfo}@{host}{path}': access denied"
    assert storage.redact(message) == f"cannot read '{scheme}://***@{host}{path}': access denied"
    assert storage.redact(f"{scheme}://{userinfo}@{host}") == f"{scheme}://***@{host}"


def test_redact_keeps_uris_without_userinfo_and_catches_slashed_aws_secrets():
    assert storage.redact("s3://bucket/a/b.png and /local/x.png") == "s3://bucket/a/b.png and /local/x.png"
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the AWS documentation's example: two '/'
    assert secret not in storage.redact(f"s3://AKIAIOSFODNN7EXAMPLE:{secret}@bucket/key")
    with pytest.raises(ValueError) as e:
        storage.resolve(f"s3://AKIAIOSFODNN7EXAMPLE:{secret}@bucket/key")
    assert "K7MDENG" not in str(e.value) and "must not embed credentials" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_dict({"storage": {"s3_endpoint_url": f"https://AKIAIOSFODNN7EXAMPLE:{secret}@minio:9000"}})
    assert "K7MDENG" not in str(e.value)


@pytest.mark.parametrize(
    "uri, shown",
    [
        (f"https://h/x.png?access_token={SECRET}&v=2", "https://h/x.png?access_token=***&v=2"),
        (f"s3://b/k?X-Amz-Credential={SECRET}&X-Amz-Signature={SECRET}", "?X-Amz-Credential=***&X-Amz-Signature=***"),
        (f"https://acct.blob/c/x?sv=2024&sig={SECRET}", "https://acct.blob/c/x?sv=2024&sig=***"),
        (f"http://h/a?key={SECRET};password={SECRET}#top", "http://h/a?key=***;password=***#top"),
        (f"'mlflow+https://h/?client_secret={SECRET}', next", "'mlflow+https://h/?client_secret=***', next"),
        (f"file://KEY:pa/{SECRET}@host/o5", "file://***@host/o5"),
        (f"FILE://k:{SECRET}@h/x?token={SECRET}", "FILE://***@h/x?token=***"),
    ],
)
def test_redact_removes_token_like_query_values_and_userinfo_in_every_uri_shape(uri, shown):
    text = storage.redact(f"cannot read {uri}")
    assert SECRET not in text and shown in text


def test_redact_keeps_ordinary_query_parameters():
    uri = "https://h/x.png?width=64&format=png&monkey=1"
    assert storage.redact(uri) == uri


def test_a_file_uri_with_a_host_or_userinfo_is_refused_without_echoing_it():
    for uri in (f"file://KEY:pa/{SECRET}@host/o5", f"file://{SECRET}@host/o5", "file://host/x.parquet"):
        with pytest.raises(ValueError, match="file:// URIs must be file:///absolute/path") as e:
            storage.resolve(uri)
        assert SECRET not in str(e.value)
        with pytest.raises(ValueError) as e:  # an image URI from data: the same rule
            storage.fetch_bytes(uri, local_roots=("/",))
        assert SECRET not in str(e.value)


@pytest.mark.parametrize(
    "uri, message",
    [
        ("http://example.com/x.png", "unsupported URI scheme"),
        ("FILE:///etc/passwd", "unsupported URI scheme"),
        ("/data/a\x00.png", "NUL byte in '/data/a\\x00.png'"),
        ("s3://bucket/a\x00.png", "NUL byte"),
        ("file://host/x.png", "file:// URIs must be file:///absolute/path"),
        (f"s3://KEY:{SECRET}@bucket/x.png", "must not embed credentials"),
    ],
)
def test_a_uri_no_attempt_can_read_is_an_invalid_uri_error_at_once(uri, message, monkeypatch):
    monkeypatch.setattr(storage, "read_bytes", lambda *a, **k: pytest.fail("a permanent error was attempted"))
    for roots in (None, ("/",)):
        with pytest.raises(storage.InvalidURIError, match=re.escape(message)) as e:
            storage.fetch_bytes(uri, attempts=3, backoff_s=0, local_roots=roots)
        assert SECRET not in str(e.value)


def test_no_uri_secret_reaches_the_cli_output_or_its_working_directory(tmp_path):
    """The config line names a presigned or token URI, and a file:// URI carries user-info: neither
    secret is printed, and nothing is written relative to the working directory."""
    proc = run_cli(
        [
            "score",
            "--checkpoint",
            str(tmp_path / "no-checkpoint"),
            "--input",
            f"file://KEY:pa/{SECRET}@host/o5",
            "--output",
            str(tmp_path / "out"),
            f"data.train=s3://b/train?access_token={SECRET}",
            f"data.val=https://h/val?X-Amz-Credential={SECRET}&X-Amz-Signature={SECRET}",
        ],
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert "file:// URIs must be file:///absolute/path" in proc.stderr
    assert "access_token=***" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_pickled_s3_filesystem_carries_no_credentials(monkeypatch, s3):
    # Ray pickles the filesystem into every read task and into Train's run state.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    store, bucket = s3
    fs, _ = storage.resolve(bucket, store)
    assert SECRET.encode() not in pickle.dumps(fs)


def test_s3_round_trip_and_listing(s3, tmp_path):
    store, bucket = s3
    storage.write_text(f"{bucket}/d/note.txt", "héllo 猫", store)
    assert storage.read_text(f"{bucket}/d/note.txt", store) == "héllo 猫"
    assert storage.exists(f"{bucket}/d/note.txt", store) and not storage.exists(f"{bucket}/d/nope", store)
    table = pa.table({"x": [1, 2]})
    fs, root = storage.resolve(f"{bucket}/data", store)
    for rel in (
        "part-0.parquet",
        "sub/part-1.parquet",
        "_SUCCESS",
        ".hidden/part-2.parquet",
        "notes.txt",
        "_staging/part-3.parquet",
    ):
        with fs.open_output_stream(f"{root}/{rel}") as f:
            pq.write_table(table, f)
    found = storage.list_parquet_files(f"{bucket}/data", store)
    assert found == [f"{root}/part-0.parquet", f"{root}/sub/part-1.parquet"]
    assert storage.list_parquet_files(f"{bucket}/data/sub/*.parquet", store) == [f"{root}/sub/part-1.parquet"]
    assert storage.list_parquet_files(f"{bucket}/data/part-0.parquet", store) == [f"{root}/part-0.parquet"]
    with pytest.raises(FileNotFoundError, match=f"{bucket}/missing"):
        storage.list_parquet_files(f"{bucket}/missing", store)


def test_copy_dir_round_trip_through_s3(s3, tmp_path):
    store, bucket = s3
    (tmp_path / "src" / "nested").mkdir(parents=True)
    (tmp_path / "src" / "a.json").write_text("{}")
    (tmp_path / "src" / "nested" / "b.bin").write_bytes(b"\x00\x01")
    storage.copy_dir_to(tmp_path / "src", f"{bucket}/tok", store)
    local = storage.copy_dir_from(f"{bucket}/tok", store)
    assert open(os.path.join(local, "a.json")).read() == "{}"
    assert open(os.path.join(local, "nested", "b.bin"), "rb").read() == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        storage.copy_dir_from(f"{bucket}/nothing-here", store)


def test_fetch_bytes_reads_local_and_s3_objects(s3, tmp_path):
    store, bucket = s3
    storage.write_bytes(f"{bucket}/img/a.png", b"pixels", store)
    (tmp_path / "b.png").write_bytes(b"local")
    assert storage.fetch_bytes(f"{bucket}/img/a.png", store) == b"pixels"
    assert storage.fetch_bytes(str(tmp_path / "b.png")) == b"local"
    with pytest.raises(FileNotFoundError):
        storage.fetch_bytes(f"{bucket}/img/missing.png", store)
    with pytest.raises(storage.TooLargeError, match="more than 3 bytes"):
        storage.fetch_bytes(f"{bucket}/img/a.png", store, max_bytes=3)


class _Flaky:
    """Stands in for ``storage.read_bytes``: fails with ``error`` ``failures`` times, then succeeds."""

    def __init__(self, error: Exception, failures: int):
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self, uri, store=None, max_bytes=None) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return b"ok"


def test_fetch_bytes_retries_transient_s3_errors(monkeypatch):
    flaky = _Flaky(OSError("AWS Error SLOW_DOWN during GetObject operation: please reduce your request rate"), 2)
    monkeypatch.setattr(storage, "read_bytes", flaky)
    assert storage.fetch_bytes("s3://b/k", attempts=3, backoff_s=0) == b"ok"
    assert flaky.calls == 3


def test_fetch_bytes_gives_up_after_attempts_with_a_redacted_error(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    flaky = _Flaky(OSError(f"AWS Error NETWORK_CONNECTION (signed with {SECRET})"), 5)
    monkeypatch.setattr(storage, "read_bytes", flaky)
    with pytest.raises(OSError) as e:
        storage.fetch_bytes("s3://b/k", attempts=3, backoff_s=0)
    assert flaky.calls == 3 and "NETWORK_CONNECTION" in str(e.value) and SECRET not in str(e.value)


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("Path does not exist 'b/k'"),
        OSError("AWS Error ACCESS_DENIED during GetObject operation"),
        PermissionError("denied"),
    ],
)
def test_fetch_bytes_does_not_retry_permanent_errors(monkeypatch, error):
    flaky = _Flaky(error, 5)
    monkeypatch.setattr(storage, "read_bytes", flaky)
    with pytest.raises(type(error)):
        storage.fetch_bytes("s3://b/k", attempts=3, backoff_s=0)
    assert flaky.calls == 1


def test_local_reads_only_regular_files_under_the_roots(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "private"
    root.mkdir(), outside.mkdir()
    (root / "a.png").write_bytes(b"pixels")
    (outside / "secret.txt").write_bytes(b"do not read")
    (root / "escape.png").symlink_to(outside / "secret.txt")
    os.mkfifo(root / "fifo.png")  # opening it for reading would block until a writer came
    (root / "sparse.png").write_bytes(b"")
    os.truncate(root / "sparse.png", 1 << 30)  # 1 GiB by stat, refused before a byte is read
    roots = (os.path.realpath(root),)
    assert storage.read_local_file(str(root / "a.png"), roots, max_bytes=100) == b"pixels"
    assert storage.fetch_bytes(f"file://{root}/a.png", local_roots=roots) == b"pixels"
    refused = [
        outside / "secret.txt",
        outside / "absent.txt",
        root / "escape.png",
        root / "fifo.png",
        root,
        root / ".." / "private" / "secret.txt",
        "/etc/passwd",
        "/dev/zero",
        "/proc/self/environ",
    ]
    messages = set()
    for path in refused:
        with pytest.raises(storage.NotAllowedError) as e:
            storage.fetch_bytes(str(path), local_roots=roots)
        messages.add(str(e.value))
    assert len(messages) == 1, "one reason for every refused path: it must not tell what exists"
    with pytest.raises(storage.NotAllowedError):
        storage.read_local_file("/dev/zero", ("/",), max_bytes=100)  # allowed root, but not a regular file
    with pytest.raises(storage.NotAllowedError):
        storage.fetch_bytes(str(root / "a.png"), local_roots=())  # no roots configured: nothing local
    with pytest.raises(storage.TooLargeError, match=f"{1 << 30} bytes, above the limit of 1000"):
        storage.read_local_file(str(root / "sparse.png"), roots, max_bytes=1000)
    with pytest.raises(FileNotFoundError):
        storage.read_local_file(str(root / "absent.png"), roots)
