"""Speed suite: mmray's scoring and training speed, side by side with what it is measured against, in one run.

Every benchmark runs the real code: the ``mmray`` CLI as a subprocess (the whole wall time a user sees,
with the embedded local Ray the CLI starts itself) or mmray's own functions in this process. The inputs
are made once per run: Parquet folders of 8 files each, 64 px PNG images and the synthetic captions
(``mmray.data.synthetic``), at 1x, 4x and 16x rows (full: 10,000 / 40,000 / 160,000; ``--quick``: 1,250 /
5,000 / 20,000), and a checkpoint trained once on 1x rows (``configs/demo.yaml``, 1 epoch, 1 worker).

1. ``speedup_vs_dataloader``: ``mmray score`` against bench/dataloader_script.py (a PyTorch DataLoader,
   2 workers, the same decode, model and prediction columns, none of the commit machinery) on the same
   input at each size: walls and script/mmray (> 1: mmray faster), and where the two curves cross.
   Also a 300-row score on a Ray that is already up, the second of two runs: in one process, as ``mmray
   demo`` and ``mmray nightly`` backfills score (goal < 5 s), and from a new ``mmray score --address``.
2. ``scoring_efficiency``: the streaming rows/s of ``mmray score`` on 4x rows (rows / the ``stream``
   seconds ``--verbose`` prints) over the model's forward alone on preloaded tensors (batches of
   ``score.batch_size`` 128, torch threads = this machine's CPUs, which the scoring pools hold). Goal >= 0.7.
3. ``efficiency``: rows/s of the preprocessing pool (``pipeline.read_input`` -> ``pipeline.preprocess`` on
   an in-process Ray, max(2, CPUs - 1) actors, rows counted by iterating the output, actor start-up
   included) over CPUs x one process looping ``Preprocessor`` over the same rows. Goal >= 0.8.
4. ``ingest_efficiency``: training rows/s of ``mmray train`` (``configs/demo.yaml``, 1 worker, 3 epochs,
   ``--quick``: 2; the mean of the epochs after the first, the ``rows/s`` its epoch lines print, read from
   ``history.jsonl``) with ``data.cache=always`` and ``never``, over ``train_epoch`` fed preprocessed
   tensors from memory in this process (one torch thread, as the 0.5-CPU trainer worker). Goal >= 0.9.
5. ``memory_growth``: peak RSS of ``mmray score``'s whole process tree (the CLI and every descendant: Ray's
   raylet, GCS and workers; sampled every 0.2 s) on 4x rows over 1x. Goal <= 1.15.
6. ``scaling``: (time 4x / time 1x) / 4 for ``mmray score`` (benchmark 1's walls) and ``mmray train``
   (1 epoch on 1x and 4x rows, the subprocess walls). 1.0 is linear; fixed start-up costs push it below.

Runs that benchmarks share (the score runs at each size, the training runs) are made once. Each
benchmark that fails is recorded as ``failed: <error>`` and the others still run. The table is printed
and appended to bench/RESULTS.md with the date, machine and git sha (``--no-record``: print only).

Usage:
    python bench/suite.py                      # make bench (on a quiet machine)
    python bench/suite.py --quick              # make bench-quick (under 5 minutes on 2 CPUs)
    python bench/suite.py --quick --no-record --scale 0.1 --only scoring_efficiency,memory_growth
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality import REPO, bench_environment  # noqa: E402
from record import append_section  # noqa: E402

bench_environment()

FULL_ROWS, QUICK_ROWS = 10_000, 1_250  # 1x; the sizes are 1x, 4x, 16x
FACTORS = (1, 4, 16)
FILES = 8
WARM_ROWS = 300
BASE_ROWS = 512  # distinct rows; every input tiles them (generating 160,000 PNGs would take minutes)
CONFIG = "configs/demo.yaml"
INGEST_EPOCHS = 3  # --quick: 2 (each epoch of `mmray train` costs seconds of reporting and checkpointing)
GOALS = {  # benchmark -> (comparison, bound) on its headline ratio
    "warm_score_s": ("<", 5.0),
    "scoring_efficiency": (">=", 0.7),
    "efficiency": (">=", 0.8),
    "ingest_efficiency": (">=", 0.9),
    "memory_growth": ("<=", 1.15),
}


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def png64(colour: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    """A 64x64 PNG: a shape of ``colour`` on a grey gradient (smooth, so 160,000 of them stay small)."""
    from PIL import Image, ImageDraw

    grey = int(rng.integers(90, 170))
    ramp = np.linspace(-20, 20, 64)[None, :, None] * rng.uniform(-1, 1)
    img = Image.fromarray(np.clip(grey + ramp + np.zeros((64, 64, 3)), 0, 255).astype(np.uint8), "RGB")
    cx, cy, r = (float(v) for v in rng.uniform([24, 24, 12], [40, 40, 22]))
    ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def base_rows() -> dict[str, list]:
    """BASE_ROWS synthetic rows (captions and labels of ``make_rows``) with 64 px PNG images."""
    from mmray.data.synthetic import COLOURS, make_rows

    rows, rng = make_rows(BASE_ROWS, seed=0), np.random.default_rng(0)
    rows["image"] = [png64(COLOURS[label.split("_")[1]], rng) for label in rows["label"]]
    return rows


def write_input(folder: Path, rows: int, base: dict[str, list], prefix: str) -> str:
    """``rows`` rows (``base`` tiled, unique ids) in FILES Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmray.data.synthetic import SCHEMA

    folder.mkdir(parents=True)
    n, per = len(base["id"]), -(-rows // FILES)
    for f, start in enumerate(range(0, rows, per)):
        idx = [i % n for i in range(start, min(rows, start + per))]
        table = pa.table(
            {
                "id": [f"{prefix}{start + j:08d}" for j in range(len(idx))],
                **{c: [base[c][i] for i in idx] for c in ("text", "image", "label")},
            },
            schema=SCHEMA,
        )
        pq.write_table(table, folder / f"part-{f:05d}.parquet", row_group_size=1024)
    return str(folder)


# ------------------------------------------------------------------------------------------------
# Running the CLI
# ------------------------------------------------------------------------------------------------


class TreeRss:
    """Peak RSS summed over a process and all its descendants, polled every ``interval`` seconds.

    Pages that several processes map (Ray's object store) count once per process: the sum overstates
    the machine's memory, the same way at every size, so the 4x / 1x ratio still shows growth.
    """

    def __init__(self, pid: int, interval: float = 0.2):
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # exited between the listing and the read
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def mmray_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "mmray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mmray.cli"]


def run(cmd: list[str], timeout: float = 3600) -> dict:
    """Runs ``cmd`` from the repo root; returns wall seconds, peak tree RSS, stdout and stderr.

    Raises:
        RuntimeError: a non-zero exit, with the end of its stderr.
    """
    # Without RAY_ADDRESS the CLI starts its own embedded Ray (``--address`` joins one explicitly).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = TreeRss(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # timeout or Ctrl-C: SIGTERM first, so the CLI stops the Ray it started
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        peak = rss.stop()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exit {proc.returncode}: {err[-1500:]}")
    return {"wall_s": wall, "peak_rss": peak, "stdout": out, "stderr": err}


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.strip().startswith("{")][-1])


def actors_up_seconds(stderr: str) -> float | None:
    """When the scoring actors were up, in seconds into the stream (``--verbose``'s ``actors up at``)."""
    found = re.findall(r"\bactors up at ([\d.]+)", stderr)
    return float(found[-1]) if found else None


def stream_seconds(stderr: str) -> float:
    """The ``stream`` step of ``mmray score --verbose``'s closing line (``mmray score: 13.6 s: ..., stream 6.76 ...``)."""
    found = re.findall(r"mmray score: [\d.]+ s: .*?\bstream ([\d.]+)", stderr)
    if not found:
        raise RuntimeError("no 'stream' seconds in mmray score --verbose's output")
    return float(found[-1])


# ------------------------------------------------------------------------------------------------
# What benchmarks share: inputs, the checkpoint, score and training runs, each made once
# ------------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, tmp: Path, one_x: int, ingest_epochs: int):
        self.tmp, self.one_x, self.ingest_epochs = tmp, one_x, ingest_epochs
        self.sizes = [one_x * f for f in FACTORS]
        self._base: dict[str, list] | None = None
        self._inputs: dict[str, str] = {}
        self._scores: dict[int, dict] = {}
        self._trains: dict[tuple, dict] = {}

    def base(self) -> dict[str, list]:
        if self._base is None:
            self._base = base_rows()
        return self._base

    def input(self, rows: int, kind: str = "score") -> str:
        key = f"{kind}-{rows}"
        if key not in self._inputs:
            self._inputs[key] = write_input(self.tmp / "data" / key, rows, self.base(), prefix=kind[0])
        return self._inputs[key]

    def train(self, rows: int, epochs: int, cache: str = "auto") -> dict:
        """``mmray train`` on ``rows`` training rows (+10% validation); wall, history, checkpoint."""
        key = (rows, epochs, cache)
        if key not in self._trains:
            name = f"train-{rows}-{epochs}-{cache}"
            cmd = [
                *mmray_cmd(),
                "train",
                "--config",
                CONFIG,
                f"data.train={self.input(rows, 'train')}",
                f"data.val={self.input(max(rows // 10, 32), 'val')}",
                f"data.cache={cache}",
                f"train.epochs={epochs}",
                "train.num_workers=1",
                f"train.storage_path={self.tmp / 'runs'}",
                f"train.name={name}",
            ]
            r = run(cmd)
            done = last_json(r["stdout"])
            history = [json.loads(x) for x in Path(done["run_dir"], "history.jsonl").read_text().splitlines()]
            self._trains[key] = {"wall_s": r["wall_s"], "checkpoint": done["checkpoint"], "history": history}
            print(f"  mmray train {rows} rows, {epochs} epoch(s), cache={cache}: {r['wall_s']:.1f} s", flush=True)
        return self._trains[key]

    def checkpoint(self) -> str:
        return self.train(self.one_x, 1)["checkpoint"]

    def score(self, rows: int) -> dict:
        """``mmray score --verbose`` on ``rows`` rows with its own embedded Ray: wall, stream s, peak RSS."""
        if rows not in self._scores:
            out = self.tmp / "out" / f"mmray-{rows}"
            ck, data = self.checkpoint(), self.input(rows)
            cmd = [*mmray_cmd(), "score", "--verbose", "--checkpoint", ck, "--input", data, "--output", str(out)]
            r = run([*cmd, "--overwrite"])
            self._scores[rows] = {
                "wall_s": r["wall_s"],
                "stream_s": stream_seconds(r["stderr"]),
                "actors_up_s": actors_up_seconds(r["stderr"]),
                "peak_rss": r["peak_rss"],
            }
            shutil.rmtree(out, ignore_errors=True)
            mib = r["peak_rss"] / 2**20
            print(
                f"  mmray score {rows} rows: {r['wall_s']:.1f} s, stream {self._scores[rows]['stream_s']:.1f} s, {mib:,.0f} MiB"
            )
        return self._scores[rows]

    def script(self, rows: int) -> dict:
        """bench/dataloader_script.py on the same rows and checkpoint."""
        out = self.tmp / "out" / f"script-{rows}"
        r = run([sys.executable, "bench/dataloader_script.py", self.checkpoint(), self.input(rows), str(out)])
        shutil.rmtree(out, ignore_errors=True)
        print(f"  dataloader script {rows} rows: {r['wall_s']:.1f} s", flush=True)
        return {"wall_s": r["wall_s"], **last_json(r["stdout"])}


class Row:
    """One line of the table: a benchmark's measurement, its ratio and whether it met its goal."""

    def __init__(self, bench: str, detail: str, value: float | None, unit: str):
        self.bench, self.detail, self.value, self.unit = bench, detail, value, unit

    def verdict(self) -> str:
        if self.value is None or self.bench not in GOALS:
            return "-"
        op, bound = GOALS[self.bench]
        ok = {"<": self.value < bound, "<=": self.value <= bound, ">=": self.value >= bound}[op]
        return "met" if ok else "missed"

    def line(self) -> str:
        goal = " ".join(map(str, GOALS[self.bench])) if self.bench in GOALS else "-"
        value = "-" if self.value is None else f"{self.value:.2f}"
        return f"| {self.bench} | {self.detail} | {value} | {self.unit} | {goal} | {self.verdict()} |"


# ------------------------------------------------------------------------------------------------
# The benchmarks: each returns its rows of the table
# ------------------------------------------------------------------------------------------------


def crossing(sizes: list[int], ratios: list[float]) -> str:
    """Where script/mmray crosses 1, interpolated in log(rows) between the two sizes around it."""
    if all(r > 1 for r in ratios):
        return "mmray faster at every size"
    if all(r < 1 for r in ratios):
        return "script faster at every size"
    for (n0, r0), (n1, r1) in zip(zip(sizes, ratios), zip(sizes[1:], ratios[1:])):
        if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
            at = math.exp(math.log(n0) + (1 - r0) * (math.log(n1) - math.log(n0)) / (r1 - r0))
            return f"curves cross at ~{at:,.0f} rows ({'mmray' if r1 > 1 else 'script'} faster above)"
    return "curves cross more than once: " + ", ".join(f"{r:.2f}" for r in ratios)


def speedup_vs_dataloader(s: Suite) -> list[Row]:
    rows, ratios = [], []
    for n in s.sizes:
        mine, theirs = s.score(n), s.script(n)
        ratios.append(theirs["wall_s"] / mine["wall_s"])
        rows.append(
            Row(
                "speedup_vs_dataloader",
                f"{n:,} rows: mmray {mine['wall_s']:.1f} s, script {theirs['wall_s']:.1f} s",
                ratios[-1],
                "script s / mmray s",
            )
        )
    rows.append(Row("speedup_vs_dataloader", crossing(s.sizes, ratios), None, ""))
    return [*rows, *warm_score(s)]


def warm_score(s: Suite) -> list[Row]:
    """A 300-row score on a Ray that is already up, the second of two: in one process (as ``mmray demo``
    and a ``mmray nightly`` backfill score: the goal), and as ``mmray score --address`` from a new CLI
    process (a new Ray job: its import of torch and its actors' processes are not shared; no goal)."""
    import ray

    from mmray.config import load_config
    from mmray.score.job import run_scoring

    ck, data = s.checkpoint(), s.input(WARM_ROWS)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        here, cli = [], []
        for i in range(2):
            started = time.perf_counter()
            run_scoring(load_config(None), ck, data, str(s.tmp / "out" / f"warm-here-{i}"), overwrite=True)
            here.append(time.perf_counter() - started)
        for i in range(2):
            out = s.tmp / "out" / f"warm-{i}"
            cmd = [*mmray_cmd(), "score", "--address", address, "--checkpoint", ck, "--input", data]
            cli.append(run([*cmd, "--output", str(out), "--overwrite"])["wall_s"])
    finally:
        ray.shutdown()
    print(f"  warm {WARM_ROWS}-row score in process: {here[0]:.1f} s then {here[1]:.1f} s", flush=True)
    print(f"  warm {WARM_ROWS}-row score, CLI --address: {cli[0]:.1f} s then {cli[1]:.1f} s", flush=True)
    return [
        Row(
            "warm_score_s",
            f"{WARM_ROWS} rows, Ray up, in one process (second run; first {here[0]:.1f} s)",
            here[1],
            "s",
        ),
        Row("warm_cli_score_s", f"{WARM_ROWS} rows, Ray up, a new `mmray score --address` process", cli[1], "s"),
    ]


def scoring_efficiency(s: Suite) -> list[Row]:
    import torch

    from mmray.checkpoint import open_checkpoint
    from mmray.data.preprocess import Preprocessor
    from mmray.data.schema import ERROR
    from mmray.score.predictor import model_inputs

    n = s.sizes[2]
    scored = s.score(n)
    # Once going: rows over the stream after the actors are up (their start-up is the fixed cost
    # speedup_vs_dataloader and the verbose breakdown show); the whole stream's rate is in the detail.
    up = scored["actors_up_s"] or 0.0
    streaming, whole = n / (scored["stream_s"] - up), n / scored["stream_s"]
    with open_checkpoint(s.checkpoint()) as ck:
        model, files, spec = ck.load_model("cpu"), ck.tokenizer_files(), ck.info.preprocess_spec(with_labels=False)
    raw = in_memory(s.input(n), list(spec.input_columns()))
    pre = Preprocessor(spec, files)
    batches = [pre({k: v[i : i + 128] for k, v in raw.items()}) for i in range(0, n, 128)]
    device = torch.device("cpu")
    tensors = [model_inputs(b, np.flatnonzero(b[ERROR] == ""), device) for b in batches]
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        with torch.inference_mode():
            model(tensors[0])  # warm: first-call allocations
            started = time.perf_counter()
            for t in tensors:
                model(t)
            forward = n / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    decode_started = time.perf_counter()
    for i in range(0, min(n, 2048), 128):
        pre({k: v[i : i + 128] for k, v in raw.items()})
    decode = min(n, 2048) / (time.perf_counter() - decode_started)
    detail = (
        f"{n:,} rows: mmray streams {streaming:,.0f} rows/s once its actors are up at {up:.1f} s ({whole:,.0f} "
        f"over the whole stream); forward alone {forward:,.0f} rows/s; preprocessing alone {decode:,.0f} rows/s "
        "on one CPU"
    )
    return [Row("scoring_efficiency", detail, streaming / forward, "stream / forward")]


def in_memory(folder: str, columns: list[str]) -> dict[str, np.ndarray]:
    import pyarrow.dataset as pads

    table = pads.dataset(folder, format="parquet").to_table(columns=columns).to_pydict()
    return {k: np.array(v, dtype=object) for k, v in table.items()}


def efficiency(s: Suite) -> list[Row]:
    import ray

    from mmray.checkpoint import open_checkpoint
    from mmray.config import PreprocessConfig, StorageConfig
    from mmray.data import pipeline
    from mmray.data.preprocess import Preprocessor
    from mmray.data.schema import ERROR

    n, cpus = s.sizes[1], os.cpu_count() or 1
    folder = s.input(n)
    with open_checkpoint(s.checkpoint()) as ck:
        files, spec = ck.tokenizer_files(), ck.info.preprocess_spec(with_labels=False)
    columns = list(spec.input_columns())
    actors = max(2, cpus - 1)
    pcfg = PreprocessConfig(concurrency=actors, batch_size=128, num_cpus=0.5 if cpus <= 2 else 1.0)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        parquet = sorted(str(p) for p in Path(folder).glob("*.parquet"))
        started, first, seen = time.perf_counter(), None, 0
        ds = pipeline.preprocess(pipeline.read_input(folder, parquet, StorageConfig(), columns), spec, files, pcfg)
        for batch in ds.iter_batches(batch_format="numpy"):
            seen += len(batch[ERROR])
            first = first or time.perf_counter() - started  # the read's and the actors' start-up, at least
        pool = seen / (time.perf_counter() - started)
    finally:
        ray.shutdown()
    raw = in_memory(folder, columns)
    pre = Preprocessor(spec, files)
    pre({k: v[:128] for k, v in raw.items()})  # warm, as an actor is after its start-up
    started = time.perf_counter()
    for i in range(0, n, 128):
        pre({k: v[i : i + 128] for k, v in raw.items()})
    single = n / (time.perf_counter() - started)
    detail = (
        f"{seen:,} rows, {actors} actors: pool {pool:,.0f} rows/s (first batch out at {first or 0:.1f} s), "
        f"one process {single:,.0f} rows/s x {cpus} CPUs"
    )
    return [Row("efficiency", detail, pool / (cpus * single), "pool / (CPUs x one)")]


def ingest_efficiency(s: Suite) -> list[Row]:
    runs = {cache: s.train(s.one_x, s.ingest_epochs, cache) for cache in ("always", "never")}
    memory = in_memory_train_rate(s, runs["always"]["checkpoint"])
    rows = []
    for cache, r in runs.items():
        later = [h["rows_per_s"] for h in r["history"][1:]] or [r["history"][0]["rows_per_s"]]
        rate = sum(later) / len(later)
        detail = f"data.cache={cache}: mmray train {rate:,.0f} rows/s, in-memory tensors {memory:,.0f} rows/s"
        rows.append(Row("ingest_efficiency", detail, rate / memory, "train / in-memory"))
    return rows


def in_memory_train_rate(s: Suite, checkpoint: str) -> float:
    """Rows/s of ``train_epoch`` on preprocessed batches held as tensors, one thread, after a warm epoch."""
    import torch

    from mmray.checkpoint import open_checkpoint
    from mmray.config import load_config
    from mmray.data.preprocess import Preprocessor
    from mmray.train.loop import build_parts, train_epoch

    n = s.one_x
    cfg = load_config(REPO / CONFIG, ["train.num_workers=1", f"train.epochs={s.ingest_epochs}"])
    with open_checkpoint(checkpoint) as ck:
        files, info = ck.tokenizer_files(), ck.info
    spec = info.preprocess_spec(with_labels=True)
    raw = in_memory(s.input(n, "train"), list(dict.fromkeys([*spec.input_columns(), "label"])))
    pre = Preprocessor(spec, files)
    outs = [pre({k: v[i : i + 512] for k, v in raw.items()}) for i in range(0, n, 512)]
    keys = [k for k, v in outs[0].items() if isinstance(v, np.ndarray) and v.dtype != object]
    tensors = {k: torch.from_numpy(np.ascontiguousarray(np.concatenate([o[k] for o in outs]))) for k in keys}
    bs = cfg.train.batch_size
    batches = [{k: v[i : i + bs] for k, v in tensors.items()} for i in range(0, n, bs)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = build_parts(cfg, list(info.tasks), info.vocab_size, n, 1, torch.device("cpu"))
        train_epoch(parts, batches, cfg, list(info.tasks))  # warm, as the epochs after the first
        started = time.perf_counter()
        train_epoch(parts, batches, cfg, list(info.tasks))
        return n / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def memory_growth(s: Suite) -> list[Row]:
    small, large = (s.score(n)["peak_rss"] for n in s.sizes[:2])
    detail = (
        f"peak tree RSS: {s.sizes[0]:,} rows {small / 2**20:,.0f} MiB, {s.sizes[1]:,} rows {large / 2**20:,.0f} MiB"
    )
    return [Row("memory_growth", detail, large / small, "4x / 1x")]


def scaling(s: Suite) -> list[Row]:
    n0, n1 = s.sizes[:2]
    out = []
    for what, t0, t1 in (
        ("mmray score", s.score(n0)["wall_s"], s.score(n1)["wall_s"]),
        ("mmray train, 1 epoch", s.train(n0, 1)["wall_s"], s.train(n1, 1)["wall_s"]),
    ):
        detail = f"{what}: {n0:,} rows {t0:.1f} s, {n1:,} rows {t1:.1f} s"
        out.append(Row("scaling", detail, (t1 / t0) / (n1 / n0), "time ratio / rows ratio (1.0 linear)"))
    return out


BENCHMARKS: dict[str, Callable[[Suite], list[Row]]] = {
    "speedup_vs_dataloader": speedup_vs_dataloader,
    "scoring_efficiency": scoring_efficiency,
    "efficiency": efficiency,
    "ingest_efficiency": ingest_efficiency,
    "memory_growth": memory_growth,
    "scaling": scaling,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"1x = {QUICK_ROWS:,} rows instead of {FULL_ROWS:,}")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every row count (smoke checks)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")

    one_x = max(int((QUICK_ROWS if args.quick else FULL_ROWS) * args.scale), 64)
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="mmray-suite-") as tmp:
        suite = Suite(Path(tmp), one_x, 2 if args.quick else INGEST_EPOCHS)
        for name in names:
            print(f"{name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                found = BENCHMARKS[name](suite)
            except Exception as e:  # one failure is recorded, the others still run
                traceback.print_exc()
                found = [Row(name, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", None, "")]
            for r in found:
                print(f"  {r.detail}" + ("" if r.value is None else f": {r.value:.2f} {r.unit} [{r.verdict()}]"))
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.extend(found)
    total_min = (time.perf_counter() - started) / 60
    head = "| benchmark | measured | ratio | of | goal | verdict |\n|---|---|---|---|---|---|"
    table = "\n".join([head, *(r.line() for r in rows)])
    load = os.getloadavg()[0]
    sizes = "/".join(f"{one_x * f:,}" for f in FACTORS)
    print(
        f"\n{table}\n\n{'quick' if args.quick else 'full'}, rows {sizes}, {total_min:.1f} min, load average {load:.1f}"
    )
    if not args.no_record:
        settings = f"{'--quick' if args.quick else 'full'}, rows {sizes}, `{CONFIG}`; {total_min:.1f} min, load average {load:.1f}"
        append_section("Speed suite", settings, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
