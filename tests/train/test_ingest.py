"""Cache-or-stream decision, a split's counts and quarantine either way, and exact validation sharding."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmray.config import config_from_dict
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.data.synthetic import make_rows
from mmray.data.text import train_wordpiece
from mmray.train import ingest

TASK = Task("label", "multiclass", ("cat_blue", "cat_red", "dog_blue", "dog_red"))


def test_row_bytes_counts_pixels_tokens_masks_and_labels():
    cfg = config_from_dict({"data": {"image": {"size": 32}, "text": {"max_length": 24}}})
    tags = Task("tags", "multilabel", ("x", "y", "z"))
    # 3*32*32 uint8 + 2*24 int64 + 2 float32 masks + int64 class + 3 float32 tags + overhead
    assert ingest.row_bytes(cfg, [TASK, tags]) == 3072 + 384 + 8 + 8 + 12 + 64


@pytest.mark.parametrize(
    "mode,nbytes,expected",
    [("auto", 299, True), ("auto", 300, True), ("auto", 301, False), ("always", 10**12, True), ("never", 1, False)],
)
def test_cache_decision(mode, nbytes, expected):
    cache, why = ingest.cache_decision(mode, nbytes, store_bytes=1000, max_fraction=0.3)
    assert cache is expected
    assert why.startswith(f"data.cache={mode}")


def test_auto_reason_names_the_sizes():
    _, why = ingest.cache_decision("auto", 3 * 2**30, store_bytes=4 * 2**30, max_fraction=0.5)
    assert "3072.0 MiB" in why and "exceeds 50% of the 4.0 GiB object store" in why


def bad_dataset(folder: Path) -> tuple[str, set[str]]:
    """30 rows in two files; three are unusable (undecodable image x2, null label)."""
    rows = make_rows(30, seed=3)
    rows["image"][4] = b"not an image"
    rows["image"][17] = b"\x89PNG\r\n\x1a\n truncated"
    rows["label"][22] = None
    folder.mkdir()
    table = pa.table(rows)
    pq.write_table(table.slice(0, 15), folder / "part-0.parquet")
    pq.write_table(table.slice(15), folder / "part-1.parquet")
    return str(folder), {rows["id"][i] for i in (4, 17, 22)}


@pytest.mark.integration
@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cached"])
def test_split_counts_and_quarantines_every_bad_row(ray_session, tmp_path, cache):
    from mmray.data import pipeline

    uri, bad_ids = bad_dataset(tmp_path / "train")
    cfg = config_from_dict({"data": {"text": {"max_length": 16}, "image": {"size": 24}, "max_bad_fraction": 0.2}})
    tok = tmp_path / "tok"
    train_wordpiece(make_rows(50, seed=1)["text"], vocab_size=200, out_dir=tok)
    tokenizer_files = {p.name: p.read_bytes() for p in tok.iterdir()}
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=[TASK])
    files = pipeline.input_files(uri, {**spec.input_columns()}, cfg.storage)
    rows_in = pipeline.count_rows(uri, files, cfg.storage)
    assert rows_in == 30

    usable, counts = ingest.prepare_split(
        cfg, uri, files, spec, tokenizer_files, str(tmp_path / "run"), "train", rows_in, cache
    )
    assert counts == {"rows_in": 30, "rows_used": 27, "rows_quarantined": 3}
    quarantine = pq.read_table(tmp_path / "run" / "quarantine" / "train.parquet")
    assert set(quarantine.column("id").to_pylist()) == bad_ids
    assert set(quarantine.column("column").to_pylist()) == {"image", "label"}
    # Streamed, each pass re-runs preprocessing; either way a pass yields exactly the usable rows.
    assert usable.count() == counts["rows_used"]


def split_with_bad(folder: Path, seed: int, bad: tuple[int, ...]) -> tuple[str, set[str]]:
    """30 rows in two files, ids prefixed by the folder's name; rows ``bad`` have an undecodable image."""
    rows = make_rows(30, seed=seed, id_prefix=folder.name)
    for i in bad:
        rows["image"][i] = b"not an image"
    folder.mkdir()
    table = pa.table(rows)
    pq.write_table(table.slice(0, 12), folder / "part-0.parquet")
    pq.write_table(table.slice(12), folder / "part-1.parquet")
    return str(folder), {rows["id"][i] for i in bad}


@pytest.mark.integration
def test_cached_splits_preprocessed_in_one_pass_are_the_splits_preprocessed_alone(ray_session, tmp_path, monkeypatch):
    """One read and one pool for both splits, cut at the row counts: each split's usable rows, counts and
    quarantine are exactly those of its own pass. The bad rows sit on both sides of the cut (train's
    last row, val's first), so a cut one row off puts a record in the wrong quarantine."""
    from mmray.data import pipeline

    cfg = config_from_dict({"data": {"text": {"max_length": 16}, "image": {"size": 24}, "cache": "always"}})
    tok = tmp_path / "tok"
    train_wordpiece(make_rows(50, seed=1)["text"], vocab_size=200, out_dir=tok)
    tokenizer_files = {p.name: p.read_bytes() for p in tok.iterdir()}
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=[TASK])
    splits = {"train": split_with_bad(tmp_path / "train", 5, (3, 29)), "val": split_with_bad(tmp_path / "val", 6, (0,))}
    inputs = {
        name: (uri, pipeline.input_files(uri, spec.input_columns(), cfg.storage)) for name, (uri, _) in splits.items()
    }
    assert ingest.one_pass(inputs)
    passes = []
    preprocessed = ingest.preprocessed
    monkeypatch.setattr(ingest, "preprocessed", lambda *a: passes.append(a[2]) or preprocessed(*a))

    together, counts, cached = ingest.prepare_datasets(
        cfg, spec, [TASK], tokenizer_files, str(tmp_path / "one"), inputs
    )
    assert cached and passes == [[*inputs["train"][1], *inputs["val"][1]]]  # one pass read both splits' files
    for name, (uri, files) in inputs.items():
        with ingest.ordered_blocks():  # as prepare_datasets runs it
            alone, alone_counts = ingest.prepare_split(
                cfg, uri, files, spec, tokenizer_files, str(tmp_path / "alone"), name, 30, cache=True
            )
        assert (
            counts[name]
            == alone_counts
            == {"rows_in": 30, "rows_used": 30 - len(splits[name][1]), "rows_quarantined": len(splits[name][1])}
        )
        records = pq.read_table(tmp_path / "one" / "quarantine" / f"{name}.parquet")
        assert set(records.column("id").to_pylist()) == splits[name][1]
        assert records.equals(pq.read_table(tmp_path / "alone" / "quarantine" / f"{name}.parquet"))
        got, want = together[name].to_pandas(), alone.to_pandas()
        assert list(got.columns) == list(want.columns) and len(got) == len(want)
        for column in want.columns:
            assert all(np.array_equal(g, w) for g, w in zip(got[column], want[column], strict=True)), column
    assert len(passes) == 3  # and then one pass per split alone


def test_splits_on_two_kinds_of_storage_or_sharing_a_file_are_preprocessed_apart():
    assert ingest.one_pass({"train": ("/d/train", ["/d/train/a.parquet"]), "val": ("/d/val", ["/d/val/b.parquet"])})
    assert not ingest.one_pass(
        {"train": ("s3://b/train", ["b/train/a.parquet"]), "val": ("/d/val", ["/d/val/a.parquet"])}
    )
    assert not ingest.one_pass({"train": ("/d", ["/d/a.parquet"]), "val": ("/d", ["/d/a.parquet"])})
    assert not ingest.one_pass({"train": ("/d/train", ["/d/train/a.parquet"])})


def consume(iterators) -> list[int]:
    """Reads every shard concurrently (a streaming split starts when all shards ask for data)."""
    counts = [0] * len(iterators)

    def read(i):
        counts[i] = sum(len(b["id"]) for b in iterators[i].iter_batches(batch_size=None))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(iterators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return counts


@pytest.mark.integration
def test_train_shards_are_equal_and_validation_shards_lose_no_row(ray_session):
    import ray.data

    datasets = {name: ray.data.range(10, override_num_blocks=5) for name in ("train", "val")}
    shards = ingest.ShardConfig(equal_splits=("train",)).configure(datasets, 3, None, None)
    train = consume([s["train"] for s in shards])
    val = consume([s["val"] for s in shards])
    assert train == [3, 3, 3]  # equal: one row dropped so every rank takes the same DDP steps
    assert sum(val) == 10  # every validation row is evaluated exactly once
