"""The preprocessing actor on one batch, called directly (no Ray needed for the UDF itself)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmray.config import DataConfig, ImageConfig, StorageConfig, TextConfig
from mmray.data import schema as S
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec, Preprocessor, keep_errors, keep_good
from mmray.data.synthetic import make_rows
from mmray.data.text import train_wordpiece

TASK = Task("label", "multiclass", ("cat_blue", "cat_red", "dog_blue", "dog_red"))


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("tok")
    train_wordpiece(make_rows(50, seed=1)["text"], vocab_size=200, out_dir=out)
    return {p.name: p.read_bytes() for p in Path(out).iterdir()}


def spec(**data_kw) -> PreprocessSpec:
    data = DataConfig(text=TextConfig(max_length=16), image=ImageConfig(size=24), **data_kw)
    return PreprocessSpec.from_config(data, StorageConfig(), tasks=[TASK])


def batch_of(rows: dict[str, list]) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=object) for k, v in rows.items()}


def test_one_batch_shapes_and_types(tokenizer_files):
    rows = make_rows(6, seed=2)
    out = Preprocessor(spec(), tokenizer_files)(batch_of(rows))
    assert out[S.INPUT_IDS].shape == (6, 16) and out[S.INPUT_IDS].dtype == np.int64
    assert out[S.ATTENTION_MASK].shape == (6, 16)
    assert out[S.PIXELS].shape == (6, 3, 24, 24) and out[S.PIXELS].dtype == np.uint8
    assert list(out[S.ERROR]) == [""] * 6
    assert out[S.mask_key(S.TEXT)].tolist() == [1.0] * 6 and out[S.mask_key(S.IMAGE)].tolist() == [1.0] * 6
    assert [TASK.classes[i] for i in out[S.label_key("label")]] == rows["label"]
    assert list(out[S.ID]) == rows["id"]
    assert out[S.PIXELS].max() > 0


def test_bad_rows_are_flagged_not_dropped(tokenizer_files):
    rows = make_rows(4, seed=3)
    rows["image"][0] = b"not an image"
    rows["id"][1] = None
    rows["label"][2] = "unicorn"
    rows["text"][3], rows["image"][3] = None, None
    out = Preprocessor(spec(), tokenizer_files)(batch_of(rows))
    assert len(out[S.ID]) == 4
    assert out[S.ERROR][0].startswith("undecodable image") and out[S.ERROR_COLUMN][0] == "image"
    assert out[S.ERROR][1] == "null id" and out[S.ERROR_COLUMN][1] == "id"
    assert "not in the label map" in out[S.ERROR][2] and out[S.ERROR_STAGE][2] == "label"
    assert out[S.ERROR][3] == "both modalities missing"
    good, bad = keep_good(out), keep_errors(out)
    assert len(good[S.ID]) == 0 and len(bad["id"]) == 4
    assert S.ERROR not in good


def test_missing_single_modality_is_kept_with_a_mask(tokenizer_files):
    rows = make_rows(2, seed=4)
    rows["text"][0] = ""
    rows["image"][1] = None
    out = Preprocessor(spec(), tokenizer_files)(batch_of(rows))
    assert list(out[S.ERROR]) == ["", ""]
    assert out[S.mask_key(S.TEXT)].tolist() == [0.0, 1.0]
    assert out[S.mask_key(S.IMAGE)].tolist() == [1.0, 0.0]
    assert out[S.PIXELS][1].max() == 0


def test_missing_modality_quarantine_policy(tokenizer_files):
    rows = make_rows(2, seed=5)
    rows["text"][0] = None
    out = Preprocessor(spec(missing_modality="quarantine"), tokenizer_files)(batch_of(rows))
    assert out[S.ERROR][0] == "missing text" and out[S.ERROR][1] == ""
