"""``mmray score --retry-quarantined``: rows quarantined because their image could not be fetched (the
S3 endpoint was down) are scored again into a new commit of the same partition, exactly once, found by
their position in the input whatever their ids."""

from __future__ import annotations

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import load_config
from mmray.data.synthetic import make_rows
from mmray.score import commit
from mmray.score.job import run_scoring
from tests.helpers import free_port, run_cli_here
from tests.score.conftest import TASK, make_checkpoint

pytestmark = pytest.mark.integration

URI_ROWS = range(2, 6)  # these rows' images come by s3:// URI
BAD_ROWS = range(0, 2)  # undecodable bytes, no text: never retryable


def test_transient_fetch_failures_are_retried_into_one_new_commit(ray_address, s3_server, s3_bucket, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", [TASK], image_uri_column="image_uri")
    data = make_rows(12, seed=3, id_prefix="q")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    uris = [None] * 12
    for i in URI_ROWS:
        s3.put_object(Bucket=s3_bucket, Key=f"img/{i}.png", Body=data["image"][i])
        uris[i], data["image"][i] = f"s3://{s3_bucket}/img/{i}.png", None
    for i in BAD_ROWS:
        data["image"][i], data["text"][i] = b"not an image", None
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({**data, "image_uri": uris}), tmp_path / "in" / "part-00000.parquet")
    out, common = (
        str(tmp_path / "out"),
        [
            "data.preprocess.fetch_attempts=1",
            "data.max_bad_fraction=0.9",
            "score.rows_per_file=4",
            "data.preprocess.batch_size=4",
        ],
    )
    down = f"storage.s3_endpoint_url=http://127.0.0.1:{free_port()}"  # nothing listens there

    first = run_scoring(load_config(None, [*common, down]), str(ckpt), str(tmp_path / "in"), out, {"date": "d1"})
    assert (first["rows_scored"], first["rows_quarantined"]) == (6, 6)

    args = [
        "score",
        "--checkpoint",
        str(ckpt),
        "--input",
        str(tmp_path / "in"),
        "--output",
        out,
        "--partition",
        "date=d1",
        "--retry-quarantined",
        *common,
        f"storage.s3_endpoint_url={s3_server}",
    ]
    retried = run_cli_here(args).json
    assert retried["status"] == "committed" and retried["retried"] == 4 and retried["retried_from"] == first["run_id"]
    assert (retried["rows_in"], retried["rows_scored"], retried["rows_quarantined"]) == (12, 10, 2)

    target = commit.Target(out, {"date": "d1"})
    table = commit.read_committed(target)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(data["id"][i] for i in range(12) if i not in BAD_ROWS) and len(set(ids)) == 10
    by_run = {}
    for row_id, run in zip(ids, table.column("run_id").to_pylist()):
        by_run.setdefault(run, set()).add(row_id)
    assert by_run == {
        first["run_id"]: {data["id"][i] for i in range(6, 12)},
        retried["run_id"]: {data["id"][i] for i in URI_ROWS},
    }
    quarantine = pq.read_table(f"{target.uri}/{commit.QUARANTINE_FILE}")
    assert sorted(quarantine.column("id").to_pylist()) == sorted(data["id"][i] for i in BAD_ROWS)
    assert commit.committed_run(target)["rows_scored"] == 10

    again = run_cli_here(args).json  # nothing transient is left: no new commit
    assert again["status"] == "nothing to retry" and again["run_id"] == retried["run_id"]


def test_permanent_uris_are_never_retried_and_a_repeated_ids_row_is_retried_alone(
    ray_address, s3_server, s3_bucket, tmp_path
):
    """``http://``, ``FILE:///`` and a NUL byte can never be fetched: quarantined as invalid, not retried.
    Id ``d`` is on two rows (one scored, one quarantined) and ``7`` is an int in one file and a string in
    the other: the first run warns; the retry finds rows by input position, so it scores ``d``'s
    quarantined row, and only that one of the two, and the counts reconcile."""
    ckpt = make_checkpoint(tmp_path / "ck", [TASK], image_uri_column="image_uri")
    data = make_rows(8, seed=5, id_prefix="r")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    uris = [None] * 8
    for i in (0, 1):  # 0: an id of its own; 1: id "d", like row 2 (which has its image inline)
        s3.put_object(Bucket=s3_bucket, Key=f"img/{i}.png", Body=data["image"][i])
        uris[i], data["image"][i] = f"s3://{s3_bucket}/img/{i}.png", None
    data["id"][1] = data["id"][2] = "d"
    permanent = {3: "http://example.com/x.png", 4: "FILE:///etc/passwd", 5: f"s3://{s3_bucket}/img/a\x00.png"}
    for i, uri in permanent.items():
        uris[i], data["image"][i] = uri, None
    data["id"][6] = "7"
    (tmp_path / "in").mkdir()
    table = pa.table({**data, "image_uri": uris})
    pq.write_table(table.slice(0, 7), tmp_path / "in" / "part-00000.parquet")
    last = table.slice(7).to_pydict()
    pq.write_table(pa.table({**last, "id": [7]}), tmp_path / "in" / "part-00001.parquet")  # int64 ids here

    out = str(tmp_path / "out")
    common = ["data.preprocess.fetch_attempts=1", "data.max_bad_fraction=0.9", "data.preprocess.batch_size=4"]

    def score(endpoint: str, *extra: str):
        args = ["score", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--output", out, *extra]
        return run_cli_here([*args, *common, f"storage.s3_endpoint_url={endpoint}"])

    first = score(f"http://127.0.0.1:{free_port()}")  # the S3 endpoint is down: rows 0 and 1 fail transiently
    assert (first.json["rows_scored"], first.json["rows_quarantined"]) == (3, 5)
    assert "warning: 2 ids are on more than one input row (4 rows; e.g. '7' x2, 'd' x2)" in first.stderr
    target = commit.Target(out)
    quarantined = pq.read_table(f"{target.uri}/{commit.QUARANTINE_FILE}").to_pylist()
    assert sorted((r["row"], r["id"]) for r in quarantined) == [
        (0, data["id"][0]),
        (1, "d"),
        *((i, data["id"][i]) for i in (3, 4, 5)),
    ]

    retried = score(s3_server, "--retry-quarantined")
    assert "not retried" not in retried.stderr
    assert retried.json["retried"] == 2
    assert (retried.json["rows_in"], retried.json["rows_scored"], retried.json["rows_quarantined"]) == (8, 5, 3)
    table = commit.read_committed(target)
    assert sorted(table.column("id").to_pylist()) == sorted(["7", "7", "d", "d", data["id"][0]])
    by_run = [(i, r == retried.json["run_id"]) for i, r in zip(table["id"].to_pylist(), table["run_id"].to_pylist())]
    assert sorted(by_run) == sorted([("7", False), ("7", False), ("d", False), ("d", True), (data["id"][0], True)])
    quarantine = pq.read_table(f"{target.uri}/{commit.QUARANTINE_FILE}").to_pylist()
    assert {r["error"].split(": ")[0] for r in quarantine} == {"invalid image URI"}
    assert sorted(r["row"] for r in quarantine) == [3, 4, 5]

    again = score(s3_server, "--retry-quarantined")
    assert again.json["status"] == "nothing to retry"
