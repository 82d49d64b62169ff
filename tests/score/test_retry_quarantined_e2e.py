"""``mmray score --retry-quarantined``: rows quarantined because their image could not be fetched (the
S3 endpoint was down) are scored again into a new commit of the same partition, exactly once."""

from __future__ import annotations

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import load_config
from mmray.data.synthetic import make_rows
from mmray.score import commit
from mmray.score.job import run_scoring
from tests.helpers import free_port, run_cli
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
    retried = run_cli(args, ray_address).json
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

    again = run_cli(args, ray_address).json  # nothing transient is left: no new commit
    assert again["status"] == "nothing to retry" and again["run_id"] == retried["run_id"]
