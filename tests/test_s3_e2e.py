"""S3 end to end through the real CLI, against a real S3 API server (moto) on 127.0.0.1.

Training reads train/val Parquet from ``s3://``, fetches every image from an ``image_uri`` column of
S3 objects, takes its tokenizer from ``s3://`` (``model.text_encoder.tokenizer``), and writes its run
(checkpoints, metrics, quarantine) to ``s3://``. Its driver is killed after the first checkpoint and
the same command resumes the run from what Ray Train recorded on S3. Scoring reads the checkpoint and
input from S3 and commits its output there. The bucket lives in ``eu-west-3`` and every request must
be signed for the configured ``storage.s3_region``, also in the Ray actors that fetch the images.

The whole session, Ray included, runs with a unique fake secret key (``tests.helpers.FAKE_SECRET``),
which must not appear in any output, Ray log file or object written.
"""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import requests

from mmray.config import StorageConfig
from mmray.data import storage
from mmray.data.synthetic import make_rows
from mmray.data.text import train_wordpiece
from tests import faults
from tests.helpers import CLI_TIMEOUT, FAKE_SECRET, kill_cli_when, leaks, ray_log_files, run_cli

pytestmark = pytest.mark.integration

SECRET = FAKE_SECRET
REGION = "eu-west-3"  # not the environment's (us-east-1): only storage.s3_region can bring it
RUN = "s3-resumed"
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
def s3(s3_server, tmp_path_factory) -> dict:
    """The bucket and its data; the S3 server records every request from here to the module's end."""
    import boto3

    bucket = "mmray-e2e"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    store = StorageConfig(s3_endpoint_url=s3_server, s3_region=REGION)
    splits = {
        name: _upload_split(client, store, bucket, name, n, seed)
        for name, n, seed in [("train", 160, 11), ("val", 50, 12), ("test", 40, 13)]
    }
    # A tokenizer trained on other text with a small vocabulary: nothing a fresh run would build.
    tok = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece(make_rows(100, seed=99)["text"], vocab_size=150, out_dir=tok)
    storage.copy_dir_to(str(tok), f"s3://{bucket}/tokenizers/small", store)
    common = [
        f"storage.s3_endpoint_url={s3_server}",
        f"storage.s3_region={REGION}",
        "data.image_column=null",
        "data.image_uri_column=image_uri",
    ]

    recorder = f"{s3_server}/moto-api/recorder"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("recording"))  # moto writes ./moto_recording
        requests.post(f"{recorder}/reset-recording", timeout=30).raise_for_status()
        requests.post(f"{recorder}/start-recording", timeout=30).raise_for_status()
        try:
            yield {
                "bucket": bucket,
                "store": store,
                "splits": splits,
                "common": common,
                "logs": [],
                "tokenizer": tok,
                "recorder": recorder,
            }
        finally:
            requests.post(f"{recorder}/stop-recording", timeout=30)


def _snapshot_has(s3: dict, text: str) -> bool:
    uri = f"s3://{s3['bucket']}/runs/{RUN}/checkpoint_manager_snapshot.json"
    return storage.exists(uri, s3["store"]) and text in storage.read_text(uri, s3["store"])


@pytest.fixture(scope="module")
def trained(s3, ray_address, tmp_path_factory) -> dict:
    """Training with its run on S3: the driver is SIGKILLed once epoch 0's checkpoint is recorded there,
    then the same command (same ``train.name``) resumes and finishes the run."""
    sp = s3["splits"]
    args = [
        "train",
        "--config",
        "configs/demo.yaml",
        f"data.train={sp['train']['uri']}",
        f"data.val={sp['val']['uri']}",
        f"train.storage_path=s3://{s3['bucket']}/runs",
        f"train.name={RUN}",
        "train.epochs=2",
        "train.num_workers=1",
        f"model.text_encoder.tokenizer=s3://{s3['bucket']}/tokenizers/small",
        f"train.before_step={faults.HOOK}",
        *s3["common"],
    ]
    tmp = tmp_path_factory.mktemp("s3_train")
    # Rank 0 waits at the start of epoch 1 until the driver is gone.
    hold = faults.arm(rank=0, epoch=1, step=0, action="pause", max_s=CLI_TIMEOUT)
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    try:
        first = kill_cli_when(args, env, lambda: _snapshot_has(s3, "checkpoint_epoch0000"), tmp / "first.log")
    finally:
        hold.unlink(missing_ok=True)
    s3["logs"].append(first)
    proc = run_cli(args, ray_address)
    s3["logs"] += [proc.stdout, proc.stderr]
    return proc.json


@pytest.fixture(scope="module")
def scored(trained, s3, ray_address) -> dict:
    test = s3["splits"]["test"]
    out = f"s3://{s3['bucket']}/preds"
    proc = run_cli(
        ["score", "--checkpoint", trained["checkpoint"], "--input", test["uri"], "--output", out, *s3["common"][:2]],
        ray_address,
    )
    s3["logs"] += [proc.stdout, proc.stderr]
    return {"result": proc.json, "out": out}


def _read(s3: dict, uri: str) -> bytes:
    return storage.read_bytes(uri, s3["store"])


def test_train_reads_and_writes_s3(trained, s3):
    run_dir = trained["run_dir"]
    assert run_dir == f"s3://{s3['bucket']}/runs/{RUN}" and trained["checkpoint"].startswith(run_dir + "/")
    for name in ("mmray.json", "model.safetensors", "tokenizer/tokenizer.json"):
        assert storage.exists(f"{trained['checkpoint']}/{name}", s3["store"]), name
    counts = trained["metrics"]["data"]["train"]
    assert counts == {"rows_in": 160, "rows_used": 159, "rows_quarantined": 1}
    quarantine = pq.read_table(io.BytesIO(_read(s3, f"{run_dir}/quarantine/train.parquet"))).to_pylist()
    missing = s3["splits"]["train"]["missing"]
    assert quarantine == [
        {
            "id": missing,
            "stage": "preprocess",
            "column": "image_uri",
            "error": f"image not found: s3://{s3['bucket']}/images/gone-{missing}.png",
            "row": None,  # training reads through Ray's reader: no input positions
        }
    ]
    assert b'"rows_quarantined": 1' in _read(s3, f"{run_dir}/metrics.json")
    latest = json.loads(_read(s3, f"s3://{s3['bucket']}/runs/latest.json"))
    assert latest["checkpoint"] == trained["checkpoint"] and latest["run_dir"] == run_dir


def test_a_run_on_s3_resumes_after_its_driver_was_killed(trained, s3):
    history = [json.loads(line) for line in _read(s3, f"{trained['run_dir']}/history.jsonl").decode().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    assert [h["resumed_from_epoch"] for h in history] == [None, 0]  # epoch 0 was not trained again
    assert trained["metrics"]["epoch"] == 1


def test_the_tokenizer_comes_from_s3(trained, s3):
    def vocab(text: str | bytes) -> dict:
        return json.loads(text)["model"]["vocab"]

    given = vocab((s3["tokenizer"] / "tokenizer.json").read_text())
    assert len(given) <= 150  # data.text.vocab_size is 1000 in the demo config: a trained one is larger
    assert vocab(_read(s3, f"{trained['checkpoint']}/tokenizer/tokenizer.json")) == given
    assert vocab(_read(s3, f"{trained['run_dir']}/tokenizer/tokenizer.json")) == given


def test_score_reads_and_writes_s3(scored, s3):
    test = s3["splits"]["test"]
    res, out = scored["result"], scored["out"]
    assert (res["rows_in"], res["rows_scored"], res["rows_quarantined"]) == (40, 39, 1)
    fs, root = storage.resolve(out, s3["store"])
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(root)) if f.path.endswith(".parquet")]
    scored_ids = pa.concat_tables(pq.read_table(p, filesystem=fs) for p in files).column("id").to_pylist()
    assert sorted(scored_ids) == sorted(i for i in test["ids"] if i != test["missing"])
    quarantine = pq.read_table(f"{root}/_quarantine", filesystem=fs).to_pylist()
    assert [(r["id"], r["column"]) for r in quarantine] == [(test["missing"], "image_uri")]
    assert quarantine[0]["error"].startswith("image not found: s3://")
    assert storage.exists(f"{out}/_SUCCESS", s3["store"])


def test_every_request_is_signed_for_the_configured_region(trained, scored, s3):
    """SigV4 names the region in each request's credential scope; the environment says us-east-1."""
    recording = requests.get(f"{s3['recorder']}/download-recording", timeout=60).text.splitlines()
    signed = [json.loads(line) for line in recording]
    signed = [r for r in signed if "Credential=" in r["headers"].get("Authorization", "")]
    regions = {r["headers"]["Authorization"].split("Credential=")[1].split("/")[2] for r in signed}
    assert regions == {REGION}, regions
    # The images are fetched only by the preprocessing actors: the setting reached the Ray workers.
    image_gets = [r for r in signed if r["method"] == "GET" and "/images/" in r["url"]]
    assert len(image_gets) >= 160 + 50 + 40


def test_credentials_never_leak_into_logs_or_written_objects(trained, scored, s3, ray_session):
    # The secret is really there to leak: Ray's workers hold it, as they would on a cluster.
    assert ray_session.get(ray_session.remote(lambda: os.environ["AWS_SECRET_ACCESS_KEY"]).remote()) == SECRET
    assert len(s3["logs"]) == 5 and not any(SECRET in text for text in s3["logs"])
    files = ray_log_files(ray_session)
    assert any(p.name.startswith("worker-") for p in files)  # the actors' and trainer workers' output
    assert not leaks(files, SECRET)
    fs, _ = storage.resolve(f"s3://{s3['bucket']}", s3["store"])
    written = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(s3["bucket"], recursive=True))
        if f.type == pafs.FileType.File and "/images/" not in f.path
    ]
    assert any("/runs/" in p for p in written) and any("/preds/" in p for p in written)
    for path in written:
        with fs.open_input_stream(path) as f:
            assert SECRET.encode() not in f.read(), path
