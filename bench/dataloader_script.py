"""The script a user would write instead of ``mmray score``: the baseline of bench/suite.py (speedup_vs_dataloader).

    python bench/dataloader_script.py CHECKPOINT INPUT_DIR OUTPUT_DIR [--workers 2] [--batch-size 128]

A PyTorch ``IterableDataset`` over the input's Parquet files (each ``DataLoader`` worker reads its share,
one record batch at a time), the *same* decode as mmray (``mmray.data.preprocess.Preprocessor`` with the
checkpoint's preprocessing and tokenizer), the *same* model loaded from the *same* checkpoint, and the
same predictions (``mmray.score.predictor.Predictions``) written as one Parquet file per batch. What it
does not do is what the comparison is about: no quarantine file, no exactly-once commit, no lease, no
row-count reconciliation, no cluster. Prints one JSON line: rows, seconds, rows/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402

from mmray.checkpoint import open_checkpoint  # noqa: E402
from mmray.data.preprocess import Preprocessor  # noqa: E402
from mmray.data.schema import ERROR, ID  # noqa: E402
from mmray.score.predictor import Predictions, model_inputs  # noqa: E402


class ParquetRows(IterableDataset):
    """Decoded batches of ``batch_size`` rows; worker ``k`` of ``n`` takes every n-th file."""

    def __init__(self, files: list[str], columns: list[str], spec, tokenizer_files: dict, batch_size: int):
        self.files, self.columns, self.batch_size = files, columns, batch_size
        self.spec, self.tokenizer_files = spec, tokenizer_files

    def __iter__(self):
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        decode = Preprocessor(self.spec, self.tokenizer_files)
        for path in self.files[k::n]:
            for batch in pq.ParquetFile(path).iter_batches(self.batch_size, columns=self.columns):
                yield decode({c: batch.column(c).to_numpy(zero_copy_only=False) for c in self.columns})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(1)
    with open_checkpoint(args.checkpoint) as ck:
        info, model, tokenizer_files = ck.info, ck.load_model("cpu"), ck.tokenizer_files()
    spec = info.preprocess_spec(with_labels=False)
    files = sorted(str(p) for p in Path(args.input).rglob("*.parquet"))
    rows_out = Predictions(info.tasks)
    dataset = ParquetRows(files, list(spec.input_columns()), spec, tokenizer_files, args.batch_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=args.workers, persistent_workers=False)
    os.makedirs(args.output, exist_ok=True)
    rows = 0
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            batch = {k: np.asarray(v) for k, v in batch.items()}
            good = np.flatnonzero(batch[ERROR] == "")
            columns = {c: np.full(len(batch[ID]), None, dtype=object) for c in rows_out.columns()}
            rows_out.fill(model(model_inputs(batch, good, torch.device("cpu"))), good, columns)
            table = pa.table({"id": pa.array(batch[ID].astype(str)), **{c: list(v) for c, v in columns.items()}})
            pq.write_table(table.cast(rows_out.schema()), f"{args.output}/part-{i:05d}.parquet")
            rows += len(batch[ID])
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1)}))


if __name__ == "__main__":
    main()
