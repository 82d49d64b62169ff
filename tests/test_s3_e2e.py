"""S3 end to end through the real CLI, against a real S3 API server (moto) on 127.0.0.1.

Training reads train/val Parquet from ``s3://``, fetches every image from an ``image_uri`` column of
S3 objects, and writes its run (checkpoints, metrics, quarantine) to ``s3://``; scoring reads the
checkpoint and input from S3 and commits its output there. The driver runs with a unique secret
key, which must not appear in any output, log line or object written.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mmray.config import StorageConfig
from mmray.data import storage
from mmray.data.synthetic import make_rows
from tests.helpers import run_cli

pytestmark = pytest.mark.integration

SECRET = "mmray-e2e-SECRET-d41d8cd98f00b204"
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("image_uri", pa.string()), ("label", pa.string())])


def _upload_split(client, store: StorageConfig, bucket: str, split: str, n: int, seed: int) -> dict:
    """Images as S3 objects, Parquet rows pointing at them; the last row's image does not exist."""
    rows = make_rows(n, seed, id_prefix=f"{split}-")
    uris = []
    for row_id, image in zip(rows["id"], rows.pop("image")):
        key = f"images/{row_id}.img"  # no extension: formats are sniffed, not guessed
        client.put_object(Bucket=bucket, Key=key, Body=image)
        uris.append(f"s3://{bucket}/{key}")
    missing = rows["id"][-1]
    uris[-1] = f"s3://{bucket}/images/gone-{missing}.png"
    table = pa.table({**rows, "image_uri": uris}).select(SCHEMA.names).cast(SCHEMA)
    fs, root = storage.resolve(f"s3://{bucket}/data/{split}", store)
    for j, (lo, hi) in enumerate([(0, n // 2), (n // 2, n)]):
        with fs.open_output_stream(f"{root}/part-{j}.parquet") as f:
            pq.write_table(table.slice(lo, hi - lo), f)
    return {"uri": f"s3://{bucket}/data/{split}", "rows": n, "ids": rows["id"], "missing": missing}


@pytest.fixture(scope="module")
def s3(s3_server) -> dict:
    import boto3

    bucket = "mmray-e2e"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    store = StorageConfig(s3_endpoint_url=s3_server)
    splits = {name: _upload_split(client, store, bucket, name, n, seed) for name, n, seed in
              [("train", 160, 11), ("val", 50, 12), ("test", 40, 13)]}  # fmt: skip
    common = [f"storage.s3_endpoint_url={s3_server}", "data.image_column=null", "data.image_uri_column=image_uri"]
    return {"bucket": bucket, "store": store, "splits": splits, "common": common,
            "env": {"AWS_SECRET_ACCESS_KEY": SECRET}, "logs": []}  # fmt: skip


@pytest.fixture(scope="module")
def trained(s3, ray_address) -> dict:
    sp = s3["splits"]
    proc = run_cli(["train", "--config", "configs/demo.yaml", f"data.train={sp['train']['uri']}",
                    f"data.val={sp['val']['uri']}", f"train.storage_path=s3://{s3['bucket']}/runs", "train.epochs=2",
                    "train.num_workers=1", *s3["common"]], ray_address, env=s3["env"])  # fmt: skip
    s3["logs"] += [proc.stdout, proc.stderr]
    return proc.json


def _read(s3: dict, uri: str) -> bytes:
    return storage.read_bytes(uri, s3["store"])


def test_train_reads_and_writes_s3(trained, s3):
    run_dir = trained["run_dir"]
    assert run_dir.startswith(f"s3://{s3['bucket']}/runs/") and trained["checkpoint"].startswith(run_dir + "/")
    for name in ("mmray.json", "model.safetensors", "tokenizer/tokenizer.json"):
        assert storage.exists(f"{trained['checkpoint']}/{name}", s3["store"]), name
    counts = trained["metrics"]["data"]["train"]
    assert counts == {"rows_in": 160, "rows_used": 159, "rows_quarantined": 1}
    quarantine = pq.read_table(io.BytesIO(_read(s3, f"{run_dir}/quarantine/train.parquet"))).to_pylist()
    missing = s3["splits"]["train"]["missing"]
    assert quarantine == [{"id": missing, "stage": "preprocess", "column": "image_uri",
                           "error": f"image not found: s3://{s3['bucket']}/images/gone-{missing}.png"}]  # fmt: skip
    assert b'"rows_quarantined": 1' in _read(s3, f"{run_dir}/metrics.json")


def test_score_reads_and_writes_s3(trained, s3, ray_address):
    test = s3["splits"]["test"]
    out = f"s3://{s3['bucket']}/preds"
    proc = run_cli(["score", "--checkpoint", trained["checkpoint"], "--input", test["uri"], "--output", out,
                    *s3["common"][:1]], ray_address, env=s3["env"])  # fmt: skip
    s3["logs"] += [proc.stdout, proc.stderr]
    res = proc.json
    assert (res["rows_in"], res["rows_scored"], res["rows_quarantined"]) == (40, 39, 1)
    fs, root = storage.resolve(out, s3["store"])
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(root)) if f.path.endswith(".parquet")]
    scored = pa.concat_tables(pq.read_table(p, filesystem=fs) for p in files).column("id").to_pylist()
    assert sorted(scored) == sorted(i for i in test["ids"] if i != test["missing"])
    quarantine = pq.read_table(f"{root}/_quarantine", filesystem=fs).to_pylist()
    assert [(r["id"], r["column"]) for r in quarantine] == [(test["missing"], "image_uri")]
    assert quarantine[0]["error"].startswith("image not found: s3://")
    assert storage.exists(f"{out}/_SUCCESS", s3["store"])


def test_credentials_never_leak_into_logs_or_written_objects(trained, s3):
    assert s3["logs"] and not any(SECRET in text for text in s3["logs"])
    fs, _ = storage.resolve(f"s3://{s3['bucket']}", s3["store"])
    written = [f.path for f in fs.get_file_info(pafs.FileSelector(s3["bucket"], recursive=True))
               if f.type == pafs.FileType.File and "/images/" not in f.path]  # fmt: skip
    assert any("/runs/" in p for p in written)
    for path in written:
        with fs.open_input_stream(path) as f:
            assert SECRET.encode() not in f.read(), path
