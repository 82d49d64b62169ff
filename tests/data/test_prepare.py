"""Label maps and the tokenizer from the training files: streamed file by file, kept and inherited."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import config_from_dict
from mmray.data.labels import Task
from mmray.data.prepare import build_tasks, prepare_tokenizer, sample_texts
from mmray.data.text import TextNormalizer


@pytest.fixture
def files(tmp_path) -> list[str]:
    """Two files whose label column has different types: all-null in the first, strings in the second."""
    first = pa.table({"text": ["  a CAT ", None, ""], "label": pa.nulls(3), "score": [0.5, 1.0, 2.0]})
    second = pa.table({"text": ["a dog", "two dogs"], "label": ["dog", "cat"], "score": [1.5, 0.0]})
    paths = [str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]
    for table, path in zip([first, second], paths):
        pq.write_table(table, path, row_group_size=2)
    return paths


def test_label_maps_are_sorted_and_kinds_come_from_the_config_or_the_column_type(files, tmp_path):
    cfg = config_from_dict({"data": {"label_column": ["label", "score"]}})
    assert build_tasks(cfg, str(tmp_path), files) == [
        Task("label", "multiclass", ("cat", "dog")),
        Task("score", "regression"),
    ]
    as_classes = config_from_dict({"data": {"label_column": ["score"]}, "model": {"tasks": {"score": "multiclass"}}})
    assert build_tasks(as_classes, str(tmp_path), files) == [Task("score", "multiclass", ("0", "0.5", "1", "1.5", "2"))]


def test_sample_texts_normalises_skips_empty_rows_and_stops_after_the_limit(files, tmp_path):
    normalize = TextNormalizer(config_from_dict({"data": {"text": {"lowercase": True}}}).data.text)
    assert list(sample_texts(str(tmp_path), files, "text", normalize, None)) == ["a cat", "a dog", "two dogs"]
    # Whole batches (row groups of 2 here): the limit is reached within the first batch holding text.
    assert list(sample_texts(str(tmp_path), files, "text", normalize, None, limit=1)) == ["a cat"]


def test_a_trained_tokenizer_is_kept_reused_and_inherited(files, tmp_path):
    cfg = config_from_dict({"data": {"text": {"vocab_size": 50}}})
    run = tmp_path / "run" / "tokenizer"
    trained = prepare_tokenizer(cfg, str(tmp_path), files, str(run))
    assert "tokenizer.json" in trained and (run / "tokenizer.json").read_bytes() == trained["tokenizer.json"]
    # A rerun of the run reuses what it kept, whatever the data says now (its checkpoints index by it).
    (run / "tokenizer.json").write_bytes(b'{"kept": true}')
    assert prepare_tokenizer(cfg, str(tmp_path), files[:1], str(run))["tokenizer.json"] == b'{"kept": true}'
    # A new run continuing a checkpoint takes that checkpoint's tokenizer and keeps its own copy.
    fresh = tmp_path / "next" / "tokenizer"
    assert prepare_tokenizer(cfg, str(tmp_path), files, str(fresh), inherit_from=str(run)) == {
        **trained,
        "tokenizer.json": b'{"kept": true}',
    }
    assert (fresh / "tokenizer.json").read_bytes() == b'{"kept": true}'


def test_the_tokenizer_sample_applies_the_text_limits_before_normalising(tmp_path):
    """A cell above data.text.max_bytes is left out (preprocessing quarantines its row), a long one cut
    to data.text.max_chars: what the sample keeps is what the actor would see."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmray.config import TextConfig

    texts = ["x" * 2000, "é" * 800, "é" * 700, "ok then"]  # é: 2 bytes; 800 of them are 1,600 bytes
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet")
    bounds = TextConfig(max_bytes=1500, max_chars=50)
    normalize = TextNormalizer(bounds)
    got = list(sample_texts(str(tmp_path), [str(tmp_path / "t.parquet")], "text", normalize, None, bounds=bounds))
    assert got == ["é" * 50, "ok then"]


_HUGE_CELLS = r"""
import sys
import pyarrow as pa, pyarrow.parquet as pq
from mmray.config import load_config
from mmray.data.prepare import prepare_tokenizer

root = sys.argv[1]
texts = ["a photo of a cat"] * 200 + ["cat dog " * (30 << 17), "bird fish " * (50 << 17)]  # 30 MB, 50 MB
pq.write_table(pa.table({"text": texts}), f"{root}/t.parquet")
del texts
line = lambda: next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before = int(line().split()[1]) / 1024
cfg = load_config(None, ["data.text.vocab_size=200"])
files = prepare_tokenizer(cfg, root, [f"{root}/t.parquet"], f"{root}/tok")
print(before, int(line().split()[1]) / 1024, len(files))
"""


def test_huge_text_cells_cost_the_tokenizer_sample_no_more_than_their_read(tmp_path):
    """Issue 27: one 30 MB and one 50 MB cell took the driver to 3.9 GB, normalised and pre-tokenised
    whole; now they are left out before any of that (the read itself is what remains)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _HUGE_CELLS, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, peak, _ = (float(v) for v in proc.stdout.split())
    assert peak - before < 600, (before, peak)
