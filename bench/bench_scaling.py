"""Per-CPU throughput of the three stages that scale out, for docs/scaling.md.

    python bench/bench_scaling.py [--rows 512] [--out bench/results/bench_scaling.json]

Each stage runs the real code in this process, on one thread, and is timed in CPU seconds
(``time.process_time``), so the number is "rows per CPU-second" and does not depend much on what
else the machine is doing (wall time on a shared 2-core box does):

1. Preprocessing: ``mmray.data.preprocess.Preprocessor`` on raw rows (decode + resize the image,
   normalise + tokenize the text), i.e. one preprocessing actor with ``num_cpus: 1``.
2. Training: ``mmray.train.loop.train_epoch`` (forward, backward, AdamW step) on preprocessed
   batches of ``train.batch_size``, i.e. one CPU trainer worker without DDP communication.
3. Scoring: ``mmray.score.predictor.Predictor`` on preprocessed batches of ``score.batch_size``,
   i.e. one CPU predictor actor.

Two image workloads: the synthetic demo images (PNG/JPEG, 20-72 px) and 640x480 JPEG photos (the size
a production feed is more likely to carry), each with the model of ``configs/demo.yaml`` and
``configs/cpu.yaml``. GPU models (``configs/gpu.yaml``) need a GPU machine and are not measured here.

``--table`` prints docs/scaling.md's expected wall times from the saved results and the stated
assumptions below (``MODEL``), without measuring again.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmray.checkpoint import CheckpointInfo, save_checkpoint  # noqa: E402
from mmray.config import load_config  # noqa: E402
from mmray.data import schema as S  # noqa: E402
from mmray.data.labels import Task  # noqa: E402
from mmray.data.preprocess import Preprocessor, PreprocessSpec  # noqa: E402
from mmray.data.synthetic import make_rows  # noqa: E402
from mmray.data.text import TokenEncoder, train_wordpiece  # noqa: E402
from mmray.score.predictor import Predictor  # noqa: E402
from mmray.train.loop import build_parts, train_epoch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = (1_000_000, 100_000_000, 1_000_000_000)
NODES = (1, 8, 64)
# Everything the wall-time model assumes besides the measured per-CPU rates (docs/scaling.md says why).
MODEL = {
    "node_cpus": 16,  # cluster/: the `cpu` worker group and aws.yaml's cpu_worker (m6i.4xlarge)
    "read_cpus": 1,  # Ray Data's read path holds one whole CPU per node
    "object_store_gib_per_node": 19.2,  # Ray's default: 30% of the node's 64 GiB
    "job_start_s": 15.0,  # submit + driver connect + actor pools (torch-importing predictor actor: 6.9 s)
    "train_group_start_s": 10.0,  # Train worker group: processes, torch import, gloo/NCCL rendezvous
    "s3_request_s": 0.1,  # one LIST page / footer GET (AWS: 100-200 ms first byte for small objects)
    "footer_readers": 16,  # mmray.data.pipeline._FOOTER_READERS
    "footer_passes": 2,  # schema check (input_files) + row count (count_rows)
    "input_rows_per_file": 10_000,  # ~500 MB of 640x480 JPEGs inline
    "output_rows_per_file": 100_000,  # score.rows_per_file default
    "copy_s_per_file": 0.15,  # server-side CopyObject of a ~5 MB part file
    "finalize_rows_per_s": 370_000,  # driver re-reads + rewrites the staged output (pyarrow, measured locally)
}
TASK = Task("label", "multiclass", ("cat_blue", "cat_red", "dog_blue", "dog_red"))


def photos(n: int, seed: int) -> list[bytes]:
    """640x480 JPEGs with photo-like detail (smooth gradients plus noise), quality 90."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    out = []
    for _ in range(n):
        base = (np.stack([xx * rng.uniform(0.1, 0.4), yy * rng.uniform(0.1, 0.5), (xx + yy) * 0.2], -1)) % 255
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def cpu_seconds(fn, repeat: int) -> float:
    fn()  # warm-up: first-call allocations, lazy imports
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat


def measure(config: str, images: str, rows: int, tmp: Path) -> dict:
    cfg = load_config(REPO / "configs" / config, ["data.label_column=label"])
    raw = make_rows(rows, seed=1)
    if images == "photo_640x480_jpeg":
        raw["image"] = photos(rows, seed=2)
    tok_dir = tmp / f"tok-{config}"
    train_wordpiece(raw["text"], cfg.data.text.vocab_size, tok_dir)
    tokenizer_files = {p.name: p.read_bytes() for p in tok_dir.iterdir() if p.is_file()}
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=[TASK], with_labels=True)
    batch = {k: np.array(v, dtype=object) for k, v in raw.items()}
    pre = Preprocessor(spec, tokenizer_files, fetch_threads=1)
    pre_s = cpu_seconds(lambda: pre(batch), repeat=2)
    out = pre(batch)
    assert (out[S.ERROR] == "").all(), set(out[S.ERROR])

    vocab = TokenEncoder(tokenizer_files, cfg.data.text.max_length).vocab_size
    keys = [k for k, v in out.items() if isinstance(v, np.ndarray) and v.dtype != object]
    tensors = {k: torch.from_numpy(np.ascontiguousarray(out[k])) for k in keys}
    bs = cfg.train.batch_size
    batches = [{k: v[i : i + bs] for k, v in tensors.items()} for i in range(0, rows, bs)]
    parts = build_parts(cfg, [TASK], vocab, rows, 1, torch.device("cpu"))
    train_s = cpu_seconds(lambda: train_epoch(parts, batches, cfg, [TASK]), repeat=2)

    ckpt = tmp / f"ckpt-{config}-{images}"
    info = CheckpointInfo(cfg.model, spec.to_dict(), (TASK,), vocab, 0, {})
    save_checkpoint(ckpt, parts.model, info, tokenizer_files)
    predictor = Predictor(str(ckpt), cfg.storage)
    sb = cfg.score.batch_size
    unlabeled = {k: v for k, v in out.items() if S.task_of_label_key(k) is None}
    score_batches = [{k: v[i : i + sb] for k, v in unlabeled.items()} for i in range(0, rows, sb)]
    score_s = cpu_seconds(lambda: [predictor(b) for b in score_batches], repeat=2)
    return {
        "config": config,
        "images": images,
        "rows": rows,
        "image_size": cfg.data.image.size,
        "text_max_length": cfg.data.text.max_length,
        "preprocess_rows_per_cpu_s": rows / pre_s,
        "train_samples_per_cpu_s": rows / train_s,
        "score_rows_per_cpu_s": rows / score_s,
    }


def driver_s(rows: int) -> dict[str, float]:
    """Seconds the one driver spends around the distributed part of a scoring job (does not scale out)."""
    m = MODEL
    files = -(-rows // m["input_rows_per_file"])
    out_files = -(-rows // m["output_rows_per_file"])
    return {
        "list_and_footers": (-(-files // 1000) + m["footer_passes"] * files / m["footer_readers"]) * m["s3_request_s"],
        "finalize": rows / m["finalize_rows_per_s"],
        "commit_copy": out_files * m["copy_s_per_file"],
    }


def wall_times(r: dict) -> dict[str, dict]:
    """Expected seconds for nightly scoring and for one training epoch, per (rows, nodes)."""
    m = MODEL
    cpus = m["node_cpus"] - m["read_cpus"]
    score_cpu_s = 1 / r["preprocess_rows_per_cpu_s"] + 1 / r["score_rows_per_cpu_s"]  # per row
    cached_cpu_s = 1 / r["train_samples_per_cpu_s"]
    streamed_cpu_s = cached_cpu_s + 1 / r["preprocess_rows_per_cpu_s"]
    row_bytes = 3 * r["image_size"] ** 2 + 16 * r["text_max_length"] + 80  # mmray.train.ingest.row_bytes
    out: dict[str, dict] = {"score": {}, "train_epoch": {}}
    for rows in ROWS:
        fixed = m["job_start_s"] + sum(driver_s(rows).values())
        for nodes in NODES:
            out["score"][f"{rows}/{nodes}"] = fixed + rows * score_cpu_s / (nodes * cpus)
            fits = rows * row_bytes <= 0.3 * nodes * m["object_store_gib_per_node"] * 2**30  # data.cache=auto
            per_row = cached_cpu_s if fits else streamed_cpu_s
            out["train_epoch"][f"{rows}/{nodes}"] = m["train_group_start_s"] + rows * per_row / (nodes * cpus)
            out["train_epoch"][f"{rows}/{nodes}/cached"] = fits
    return out


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def print_table(report: dict) -> None:
    (r,) = [x for x in report["results"] if x["config"] == "cpu.yaml" and x["images"] == "photo_640x480_jpeg"]
    times = wall_times(r)
    for kind, title in (("score", "nightly scoring"), ("train_epoch", "one training epoch")):
        print(
            f"\n{title} (configs/cpu.yaml, 640x480 JPEG):\n| rows | " + " | ".join(f"{n} node(s)" for n in NODES) + " |"
        )
        print("| --- |" + " --- |" * len(NODES))
        for rows in ROWS:
            cells = [
                _duration(times[kind][f"{rows}/{n}"])
                + ("" if kind == "score" or times[kind][f"{rows}/{n}/cached"] else " (streamed)")
                for n in NODES
            ]
            print(f"| {rows:,} | " + " | ".join(cells) + " |")
    print("\ndriver-side seconds (any node count):")
    for rows in ROWS:
        print(f"  {rows:>13,}: " + ", ".join(f"{k} {v:,.0f}" for k, v in driver_s(rows).items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_scaling.json"))
    p.add_argument("--table", action="store_true", help="print the wall-time tables from --out; measure nothing")
    args = p.parse_args()
    if args.table:
        print_table(json.loads(Path(args.out).read_text()))
        return
    torch.set_num_threads(1)  # per CPU: an actor or worker with num_cpus=1
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in ("demo.yaml", "cpu.yaml"):
            for images in ("synthetic_20-72px", "photo_640x480_jpeg"):
                r = measure(config, images, args.rows, Path(tmp))
                print(json.dumps(r), flush=True)
                results.append(r)
    report = {
        "results": results,
        "torch_threads": 1,
        "load_average_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    print_table(report)


if __name__ == "__main__":
    main()
