"""Data-layer benchmark: ratios measured side by side in one run, on an embedded Ray.

    python bench/bench_preprocess.py [--rows 3000] [--out bench/results/bench_preprocess.json]

What it measures (each line compares two runs of the same code that differ in one thing):

1. Streaming read: peak object-store bytes while read -> preprocess -> iterate runs over N and 4N
   rows, against materializing the same rows (which grows 4x). Ray Data back-pressures a pipeline to a
   share of the object store in units of its blocks (up to 128 MiB); Ray 2.60 packs Parquet files that
   are small next to that into one read task, so at the default scale here (tens of MiB) the streaming
   peak still grows with the rows. Only runs much larger than a block show the bound.
2. Driver-side streaming (label maps + tokenizer sample, ``prepare.build_tasks``/``sample_texts``): peak
   RSS growth of this process over N and 4N rows.
3. Object-store bytes of the preprocessed rows with uint8 pixels vs the same rows as float32.
4. JPEG decode time for a 1024x768 photo to a 32 px model input, with and without DCT draft scaling.
5. Image-URI fetch time per batch with ``fetch_threads`` 1 vs 8, against a local S3 API server (moto)
   that adds 20 ms of latency per request (as a real object store would).
6. A preprocessing actor's start-up: wall time and peak RSS of a fresh process that builds a
   ``Preprocessor`` and maps one batch, against the same process that first imports what an actor
   used to (torch, torchvision's transforms, transformers' AutoTokenizer).

Absolute numbers depend on the machine (and its load); the ratios are what the results record.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
from PIL import Image  # noqa: E402

from mmray.config import Config, DataConfig, ImageConfig, PreprocessConfig, StorageConfig, TextConfig  # noqa: E402
from mmray.data import pipeline, prepare  # noqa: E402
from mmray.data import schema as S  # noqa: E402
from mmray.data.image import decode_image, resize_uint8  # noqa: E402
from mmray.data.labels import Task  # noqa: E402
from mmray.data.preprocess import Preprocessor, PreprocessSpec  # noqa: E402
from mmray.data.synthetic import SCHEMA, make_rows  # noqa: E402
from mmray.data.text import TextNormalizer, train_wordpiece  # noqa: E402

TASK = Task("label", "multiclass", ("cat_blue", "cat_red", "dog_blue", "dog_red"))
ROWS_PER_FILE = 500  # many small files and row groups: Ray Data streams one read unit at a time


class PeakSampler:
    """Polls a reading function every ``interval`` seconds in a thread; ``peak`` is the maximum seen."""

    def __init__(self, read, interval: float = 0.05):
        self.read, self.interval, self.peak = read, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self.baseline = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def object_store_used() -> int:
    # Internal API, fine for a benchmark: the raylet's plasma usage summed over nodes.
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def process_rss() -> int:
    return psutil.Process().memory_info().rss


def write_dataset(folder: Path, rows: int, base: dict[str, list]) -> str:
    """``rows`` rows (the base rows tiled, with unique ids) in files of ROWS_PER_FILE rows."""
    folder.mkdir(parents=True)
    n = len(base["id"])
    for start in range(0, rows, ROWS_PER_FILE):
        idx = [i % n for i in range(start, min(rows, start + ROWS_PER_FILE))]
        table = pa.table(
            {
                "id": [f"r{start + j}" for j in range(len(idx))],
                "text": [base["text"][i] for i in idx],
                "image": [base["image"][i] for i in idx],
                "label": [base["label"][i] for i in idx],
            },
            schema=SCHEMA,
        )
        pq.write_table(table, folder / f"part-{start // ROWS_PER_FILE:05d}.parquet", row_group_size=100)
    return str(folder)


def spec_and_tokenizer(tmp: Path, base: dict) -> tuple[PreprocessSpec, dict[str, bytes]]:
    data = DataConfig(text=TextConfig(max_length=24), image=ImageConfig(size=32))
    train_wordpiece(base["text"], 1000, tmp / "tok")
    files = {p.name: p.read_bytes() for p in (tmp / "tok").iterdir()}
    return PreprocessSpec.from_config(data, StorageConfig(), tasks=[TASK]), files


def preprocessed(uri: str, spec: PreprocessSpec, tok: dict[str, bytes]) -> ray.data.Dataset:
    pcfg = PreprocessConfig(concurrency=1, batch_size=100, num_cpus=0.5)
    files = pipeline.input_files(uri, spec.input_columns(), StorageConfig())
    return pipeline.preprocess(
        pipeline.read_input(uri, files, StorageConfig(), list(spec.input_columns())), spec, tok, pcfg
    )


def bench_streaming(uris: dict[int, str], spec, tok) -> dict:
    out = {}
    for rows, uri in uris.items():
        with PeakSampler(object_store_used) as s:
            stream = preprocessed(uri, spec, tok).iter_batches(batch_size=100, batch_format="numpy")
            seen = sum(len(b[S.ID]) for b in stream)
        assert seen == rows
        ds = preprocessed(uri, spec, tok).materialize()
        out[rows] = {"streaming_peak_bytes": s.peak - s.baseline, "materialized_bytes": ds.size_bytes()}
        del ds
    return out


def bench_driver(uris: dict[int, str]) -> dict:
    out = {}
    for rows, uri in uris.items():
        cfg = Config(data=DataConfig(train=uri))
        files = pipeline.input_files(uri, {"label": "label", "text": "string"}, cfg.storage)
        with PeakSampler(process_rss, interval=0.01) as s:
            tasks = prepare.build_tasks(cfg, uri, files)
            normalize = TextNormalizer(cfg.data.text)
            texts = sum(
                1
                for _ in prepare.sample_texts(
                    uri, files, cfg.data.text_column, normalize, cfg.storage, bounds=cfg.data.text
                )
            )
        assert tasks[0].classes == TASK.classes and texts == rows
        out[rows] = {"peak_rss_growth_bytes": max(0, s.peak - s.baseline)}
    return out


def bench_uint8_vs_float32(uri: str, spec, tok) -> dict:
    ds = preprocessed(uri, spec, tok).materialize()

    def as_float(batch):
        return {**batch, S.PIXELS: batch[S.PIXELS].astype(np.float32)}

    as_f32 = ds.map_batches(as_float, batch_format="numpy").materialize()
    return {"uint8_bytes": ds.size_bytes(), "float32_bytes": as_f32.size_bytes()}


def bench_jpeg_draft(repeats: int = 30) -> dict:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)).resize((1024, 768))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    times = {}
    for name, min_side in (("full", None), ("draft", 32)):
        start = time.perf_counter()
        for _ in range(repeats):
            resize_uint8(decode_image(data, 10**8, min_side=min_side), 32)
        times[name] = (time.perf_counter() - start) / repeats
    return {"full_decode_s": times["full"], "draft_decode_s": times["draft"]}


def bench_fetch_threads(base: dict, n: int = 64, latency_s: float = 0.02) -> dict | None:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None
    import logging

    import boto3
    from werkzeug.serving import WSGIRequestHandler

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    original = WSGIRequestHandler.handle_one_request

    def slow(self):  # every request to the fake object store pays a network round trip
        time.sleep(latency_s)
        return original(self)

    WSGIRequestHandler.handle_one_request = slow
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        for i in range(n):
            s3.put_object(Bucket="bench", Key=f"img/{i}.png", Body=base["image"][i % len(base["image"])])
        store = StorageConfig(s3_endpoint_url=endpoint, s3_region="us-east-1")
        data = DataConfig(image_column=None, image_uri_column="image_uri", image=ImageConfig(size=32))
        spec = PreprocessSpec.from_config(data, store, tasks=[TASK], with_labels=False)
        with tempfile.TemporaryDirectory() as tmp:
            train_wordpiece(base["text"], 200, tmp)
            tok = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
        batch = {
            "id": np.array([str(i) for i in range(n)], dtype=object),
            "text": np.array(["a cat"] * n, dtype=object),
            "image_uri": np.array([f"s3://bench/img/{i}.png" for i in range(n)], dtype=object),
        }
        times = {}
        for threads in (1, 8):
            pre = Preprocessor(spec, tok, fetch_threads=threads)
            pre(batch)  # warm the connection pool
            start = time.perf_counter()
            out = pre(batch)
            times[threads] = time.perf_counter() - start
            assert (out[S.ERROR] == "").all(), set(out[S.ERROR])
        return {"rows": n, "latency_s": latency_s, "threads_1_s": times[1], "threads_8_s": times[8]}
    finally:
        server.stop()
        WSGIRequestHandler.handle_one_request = original


_ACTOR = """
import pickle, sys, time
t = time.perf_counter()
if sys.argv[2] == "with-torch":
    import torch, torchvision.transforms.v2.functional, transformers
    transformers.AutoTokenizer
from mmray.data.preprocess import Preprocessor
spec, files, batch = pickle.loads(open(sys.argv[1], "rb").read())
Preprocessor(spec, files)(batch)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (this benchmark).
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(time.perf_counter() - t, hwm * 1024)
"""


def bench_actor_start(spec, tok: dict[str, bytes], base: dict, repeats: int = 3) -> dict:
    """Median wall seconds and peak RSS bytes of an actor-like process, torch-free vs importing torch."""
    import pickle
    import subprocess

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = Path(tmp, "args.pkl")
        batch = {k: np.array(v[:32], dtype=object) for k, v in base.items()}
        args.write_bytes(pickle.dumps((spec, tok, batch)))
        for mode in ("torch-free", "with-torch"):
            runs = []
            for _ in range(repeats):
                proc = subprocess.run(
                    [sys.executable, "-c", _ACTOR, str(args), mode], capture_output=True, text=True, check=True
                )
                runs.append(tuple(float(x) for x in proc.stdout.split()))
            out[mode] = {"start_s": sorted(r[0] for r in runs)[repeats // 2], "peak_rss_bytes": max(r[1] for r in runs)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3000, help="N; the large run uses 4N rows")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_preprocess.json"))
    args = parser.parse_args()
    small, large = args.rows, 4 * args.rows
    base = make_rows(500, seed=0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir)
            uris = {small: write_dataset(tmp / "small", small, base), large: write_dataset(tmp / "large", large, base)}
            spec, tok = spec_and_tokenizer(tmp, base)
            streaming = bench_streaming(uris, spec, tok)
            driver = bench_driver(uris)
            dtype = bench_uint8_vs_float32(uris[small], spec, tok)
            actor = bench_actor_start(spec, tok, base)
        jpeg = bench_jpeg_draft()
        fetch = bench_fetch_threads(base)
    finally:
        ray.shutdown()

    ratios = {
        "streaming_peak_object_store_4N_over_N": streaming[large]["streaming_peak_bytes"]
        / max(1, streaming[small]["streaming_peak_bytes"]),
        "materialized_object_store_4N_over_N": streaming[large]["materialized_bytes"]
        / max(1, streaming[small]["materialized_bytes"]),
        "driver_peak_rss_growth_4N_over_N": (driver[large]["peak_rss_growth_bytes"] + (1 << 20))
        / (driver[small]["peak_rss_growth_bytes"] + (1 << 20)),  # +1 MiB: growth can be ~0 at N
        "float32_over_uint8_object_store_bytes": dtype["float32_bytes"] / dtype["uint8_bytes"],
        "jpeg_full_over_draft_decode_time": jpeg["full_decode_s"] / jpeg["draft_decode_s"],
        "actor_start_time_with_torch_over_torch_free": actor["with-torch"]["start_s"] / actor["torch-free"]["start_s"],
        "actor_peak_rss_with_torch_over_torch_free": actor["with-torch"]["peak_rss_bytes"]
        / actor["torch-free"]["peak_rss_bytes"],
    }
    if fetch:
        ratios["fetch_1_thread_over_8_threads_time"] = fetch["threads_1_s"] / fetch["threads_8_s"]
    result = {
        "rows": {"N": small, "4N": large},
        "ratios": ratios,
        "streaming": streaming,
        "driver": driver,
        "uint8_vs_float32": dtype,
        "jpeg": jpeg,
        "fetch": fetch,
        "actor_start": actor,
        "cpus": os.cpu_count(),
    }
    print(f"\nmmray data-layer benchmark (N={small}, 4N={large}):")
    for name, value in ratios.items():
        print(f"  {name:<45} {value:6.2f}")
    mib = 2**20
    print(
        f"  (streaming peak {streaming[small]['streaming_peak_bytes'] / mib:.1f} -> "
        f"{streaming[large]['streaming_peak_bytes'] / mib:.1f} MiB; materialized "
        f"{streaming[small]['materialized_bytes'] / mib:.1f} -> {streaming[large]['materialized_bytes'] / mib:.1f} MiB)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"  results: {args.out}")


if __name__ == "__main__":
    main()
