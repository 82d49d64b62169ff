"""Text preprocessing on Chinese captions: ``segmenter`` none vs jieba, ``pos_tags`` off vs on.

One generated task with Chinese captions only (``mmray make-data --task sum --lang zh``: the caption
says a number, 零 / 没有, 一 / 一个 or 二 / 两个, among filler words; the label adds the number of objects in
the image). ``sum`` is learned in a few epochs; ``match`` needs 15 and more rows, beyond this benchmark's
ten minutes on 2 CPUs. For each of the four settings:

- accuracy: ``mmray train`` with ``configs/recipe.yaml`` and ``mmray ablate`` on the held-out split,
  through the real CLI on one local Ray (``bench/quality.py``'s ``run_cell``);
- preprocessing rows/s, in this process, on the training split: the whole ``Preprocessor`` (what an
  actor does: text and image) and its text part alone (normalise, segment, tag, tokenise), after the
  actor's start-up (jieba's dictionary, its tags), which is timed on its own in a fresh process;
- tokens per row (non-padding, special tokens included) and the WordPiece vocabulary actually used.

Stopwords are off (``--stopwords zh`` turns them on in every setting: the built-in list holds 一个 and
没有, number words of this task), so the comparison is about segmentation and tags. Appended to
``bench/RESULTS.md`` with the date, machine and git sha (``--no-record``: print only).

Usage:
    python bench/bench_text.py                        # ~10 minutes on 2 CPUs
    python bench/bench_text.py --task match --rows 600 --epochs 3 --no-record
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import REPO, cli, machine, run_cell, start_ray  # noqa: E402

SETTINGS = {  # name -> overrides
    "none": ["data.text.segmenter=none", "data.text.pos_tags=false"],
    "none+pos": ["data.text.segmenter=none", "data.text.pos_tags=true"],
    "jieba": ["data.text.segmenter=jieba", "data.text.pos_tags=false"],
    "jieba+pos": ["data.text.segmenter=jieba", "data.text.pos_tags=true"],
}
_STARTUP = """
import sys, time
from mmray.config import TextConfig
from mmray.data.preprocess import PreprocessSpec, Preprocessor
from mmray.data.text import read_tokenizer_dir
seg, pos = sys.argv[1], sys.argv[2] == "true"
spec = PreprocessSpec(text=TextConfig(max_length=24, segmenter=seg, pos_tags=pos), with_labels=False)
started = time.perf_counter()
Preprocessor(spec, read_tokenizer_dir(sys.argv[3])).normalize_text("图里有一个红色的圆形")
print(time.perf_counter() - started)
"""


def preprocessing_rates(config: str, overrides: list[str], data: dict, tokenizer_dir: str, repeats: int = 3) -> dict:
    """Rows/s of the whole Preprocessor and of its text part, on the training split, best of ``repeats``."""
    import pyarrow.dataset as pads

    from mmray.config import load_config
    from mmray.data import schema as S
    from mmray.data.labels import Task
    from mmray.data.preprocess import Preprocessor, PreprocessSpec
    from mmray.data.text import read_tokenizer_dir

    cfg = load_config(REPO / config, overrides)
    table = pads.dataset(data["train"]["path"], format="parquet").to_table().to_pydict()
    task = Task("label", "multiclass", tuple(sorted(set(table["label"]))))
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, [task])
    files = read_tokenizer_dir(tokenizer_dir)
    # Start-up in a fresh process (this one may already hold a shared jieba dictionary).
    startup = subprocess.run(
        [sys.executable, "-c", _STARTUP, cfg.data.text.segmenter, str(cfg.data.text.pos_tags).lower(), tokenizer_dir],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    pre = Preprocessor(spec, files)
    n, size = len(table["id"]), cfg.data.preprocess.batch_size
    batches = [{k: np.array(v[i : i + size], dtype=object) for k, v in table.items()} for i in range(0, n, size)]
    pre(batches[0])  # warm: first-call costs are the start-up's, timed above
    whole, text_only, out = [], [], None
    for _ in range(repeats):
        started = time.perf_counter()
        outs = [pre(b) for b in batches]
        whole.append(time.perf_counter() - started)
        started = time.perf_counter()
        for b in batches:
            pre._tokenize([pre._text(t) for t in b["text"]], cfg.data.text.max_length)
        text_only.append(time.perf_counter() - started)
        out = outs
    ids = np.concatenate([o[S.INPUT_IDS] for o in out])
    mask = np.concatenate([o[S.ATTENTION_MASK] for o in out])
    return {
        "rows_per_s": round(n / min(whole)),
        "text_rows_per_s": round(n / min(text_only)),
        "startup_s": round(float(startup.stdout.strip().splitlines()[-1]), 2),
        "tokens_per_row": round(float(mask.sum(1).mean()), 1),
        "vocab_used": int(len(np.unique(ids[mask > 0]))),
        "unk_share": round(float((ids[mask > 0] == 1).mean()), 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/recipe.yaml")
    p.add_argument("--task", default="sum")
    p.add_argument("--stopwords", default=None, help="data.text.stopwords in every setting (default: none)")
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workdir", default="work/bench-text")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    import ray

    env = start_ray()
    workdir = (REPO / args.workdir).resolve()
    started = time.perf_counter()
    rows = []
    try:
        data = cli(
            ["make-data", str(workdir / "data"), "--task", args.task, "--lang", "zh", "--rows", str(args.rows)], env
        )["splits"]
        for name, overrides in SETTINGS.items():
            extra = [*overrides, f"data.text.stopwords={args.stopwords or ''}", f"train.epochs={args.epochs}"]
            label = f"{args.task}-zh-{name.replace('+', '_')}"
            cell = run_cell(label, "concat", data, args.config, workdir, env, extra)
            run_dir = sorted((workdir / "runs").glob(f"{label}-concat-*"))[-1]
            rates = preprocessing_rates(args.config, extra, data, str(run_dir / "tokenizer"))
            row = {
                "setting": name,
                "test_accuracy": cell["test_accuracy"],
                "val_accuracy": cell["val_accuracy"],
                "train_s": cell["train_s"],
                **rates,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    total_s = time.perf_counter() - started
    head = (
        "| setting | test acc | val acc by epoch | train s | rows/s (whole actor) | rows/s (text part) | "
        "actor start s | tokens/row | ids used | [UNK] |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['setting']} | {r['test_accuracy']:.3f} | {' '.join(f'{a:.2f}' for a in r['val_accuracy'])} | "
        f"{r['train_s']:.0f} | {r['rows_per_s']} | {r['text_rows_per_s']} | {r['startup_s']} | "
        f"{r['tokens_per_row']} | {r['vocab_used']} | {r['unk_share']:.2%} |"
        for r in rows
    ]
    text = "\n".join([head, *lines])
    load = os.getloadavg()[0]
    print(f"\n{text}\n\ntotal {total_s / 60:.1f} min, load average {load:.1f}")
    if not args.no_record:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(
                f"\n### Text preprocessing on Chinese captions {stamp} ({machine()}; `{args.config}`, "
                f"`--task {args.task} --lang zh --rows {args.rows}`, {args.epochs} epochs, stopwords {args.stopwords}, concat; "
                f"{total_s / 60:.1f} min, load average {load:.1f})\n\n{text}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
