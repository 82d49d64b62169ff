"""The hostile corpus through the real preprocessing actor, in a fresh process whose peak RSS is measured.

Every attack row ends quarantined with its reason (and no secret), every other row is used, and the
process's peak RSS stays under ``RSS_BOUND_MB`` with default settings: the bound the README states.
Before the bounds, the same corpus read /etc/passwd, hung on the FIFO and took gigabytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmray.data.synthetic import make_rows
from mmray.data.text import train_wordpiece
from tests.hostile.corpus import KEPT, LABEL_ATTACKS, SECRET, make_hostile

RSS_BOUND_MB = 600  # peak RSS of one preprocessing actor, defaults, whatever the input (README "Bad input")

# Runs in a fresh interpreter: reads the corpus in Ray's numpy batch form and maps it with the actor.
_SCRIPT = r"""
import json, pathlib, sys
import numpy as np, pyarrow.parquet as pq
from mmray.config import DataConfig, StorageConfig
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec, Preprocessor
from mmray.data.text import read_tokenizer_dir

corpus = json.loads(sys.argv[1])
tok = read_tokenizer_dir(sys.argv[2])  # trained by the parent: training one imports transformers
task = Task("label", "multiclass", ("cat_blue", "cat_red", "dog_blue", "dog_red"))
data = DataConfig(image_uri_column="image_uri", image_uri_roots=[corpus["root"]])
pre = Preprocessor(PreprocessSpec.from_config(data, StorageConfig(), tasks=[task]), tok, fetch_timeout_s=20)

def batches(path, size=8):
    f = pq.ParquetFile(path)
    for batch in f.iter_batches(batch_size=size):
        yield {c: np.array(batch.column(c).to_pylist(), dtype=object) for c in batch.schema.names}

def peak_mb():
    # VmHWM belongs to this address space; ru_maxrss would carry over the forking parent's peak.
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

files = sorted(pathlib.Path(corpus["input"]).glob("*.parquet"))
first = next(batches(files[0]))
pre({k: v[:2] for k, v in first.items()})  # warm: tokenizer, Pillow plugins, numpy
baseline = peak_mb()
rows = {}
for path in files:
    for batch in batches(path):
        out = pre(batch)
        for i, row_id in enumerate(out["id"]):
            rows[str(row_id)] = {"error": out["_error"][i], "column": out["_error_column"][i],
                                 "stage": out["_error_stage"][i], "text": float(out["mask__text"][i]),
                                 "image": float(out["mask__image"][i])}
print(json.dumps({"rows": rows, "baseline_mb": baseline, "peak_mb": peak_mb()}))
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    return make_hostile(tmp_path_factory.mktemp("hostile"))


def test_every_attack_is_quarantined_within_a_bounded_rss(hostile, tmp_path):
    train_wordpiece(make_rows(50, seed=1)["text"], vocab_size=200, out_dir=tmp_path / "tok")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(hostile), str(tmp_path / "tok")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert len(rows) == hostile["rows"], "every row comes out, once"
    expected = {**hostile["quarantined"], **LABEL_ATTACKS}
    for row_id, (stage, column, reason) in expected.items():
        got = rows[row_id]
        assert (got["stage"], got["column"]) == (stage, column) and got["error"].startswith(reason), (row_id, got)
    for row_id, (text, image) in KEPT.items():
        assert rows[row_id] == {"error": "", "column": "", "stage": "", "text": text, "image": image}, row_id
    assert all(rows[i]["error"] == "" for i in hostile["good_ids"])
    assert set(rows) == set(expected) | set(KEPT) | set(hostile["good_ids"])
    assert not any(SECRET in r["error"] or "K7MDENG" in r["error"] for r in rows.values())
    assert result["peak_mb"] < RSS_BOUND_MB, result  # the float64 path alone took > 1.5 GB on the bomb
    print(f"hostile corpus: baseline {result['baseline_mb']:.0f} MB, peak {result['peak_mb']:.0f} MB")
