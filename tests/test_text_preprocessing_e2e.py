"""Chinese captions end to end through the real CLI with ``segmenter: jieba`` and ``pos_tags: true``:
make-data --lang zh -> train -> score from the checkpoint alone (the user dictionary's file gone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from mmray.checkpoint import TOKENIZER_DIR, load_info
from mmray.config import load_config
from mmray.data.preprocess import Preprocessor, PreprocessSpec
from mmray.data.schema import ATTENTION_MASK, INPUT_IDS, POS_IDS
from mmray.data.text import read_tokenizer_dir
from tests.helpers import REPO, run_cli, run_cli_here, tiny_overrides

pytestmark = pytest.mark.integration


def test_chinese_captions_train_and_score_with_jieba_and_pos_tags_from_the_checkpoint_alone(ray_address, tmp_path):
    made = run_cli(["make-data", str(tmp_path / "data"), "--task", "match", "--lang", "zh", "--rows", "160"]).json
    # A domain term jieba does not know: the colour + shape compound the training captions use most (which
    # one depends on the generator's draw, so it is read from the data rather than assumed).
    captions = pads.dataset(made["splits"]["train"]["path"], format="parquet").to_table().column("text").to_pylist()
    compounds = [f"{colour}圆圈" for colour in ("红色", "绿色", "蓝色", "黄色")]
    term = max(compounds, key=lambda c: sum(c in (t or "") for t in captions))
    colour, shape = term[:2], term[2:]
    assert any(term in (t or "") for t in captions)
    user_dict = tmp_path / "dict.txt"
    user_dict.write_text(f"{term} 5 nz\n", encoding="utf-8")
    overrides = tiny_overrides(
        made["splits"],
        tmp_path / "runs",
        **{
            "train.epochs": 1,
            "train.num_workers": 1,
            "data.text.segmenter": "jieba",
            "data.text.pos_tags": "true",
            "data.text.stopwords": "zh",
            "data.text.user_dict": str(user_dict),
        },
    )
    trained = run_cli_here(["train", "--config", "configs/demo.yaml", *overrides]).json
    ckpt = Path(trained["checkpoint"])
    info = load_info(ckpt)
    text = info.preprocess["text"]
    assert (text["segmenter"], text["pos_tags"], info.preprocess["user_dict_lines"]) == (
        "jieba",
        True,
        [f"{term} 5 nz"],
    )
    files = read_tokenizer_dir(ckpt / TOKENIZER_DIR)
    vocab = json.loads(files["tokenizer.json"])["model"]["vocab"]
    assert {colour, shape, term} <= set(vocab) and "一个" not in vocab  # whole words; a stopword gone

    # Training's preprocessing (from the config) and scoring's (from the checkpoint alone) agree token
    # for token, POS tag for POS tag, on the held-out rows.
    rows = pads.dataset(made["splits"]["test"]["path"], format="parquet").to_table().to_pydict()
    batch = {k: np.array(v, dtype=object) for k, v in rows.items()}
    cfg = load_config(REPO / "configs/demo.yaml", overrides)
    at_training = Preprocessor(PreprocessSpec.from_config(cfg.data, cfg.storage, info.tasks), files)(batch)
    user_dict.unlink()
    from_ckpt = Preprocessor(PreprocessSpec.from_dict(info.preprocess, tasks=info.tasks, with_labels=False), files)
    at_scoring = from_ckpt(batch)
    for key in (INPUT_IDS, ATTENTION_MASK, POS_IDS):
        assert np.array_equal(at_scoring[key], at_training[key]), key
    assert (at_scoring[POS_IDS] > 0).sum() >= (at_scoring[ATTENTION_MASK].sum() - 2 * len(rows["id"])) * 0.9

    scored = run_cli_here(
        [
            "score",
            "--checkpoint",
            str(ckpt),
            "--input",
            made["splits"]["test"]["path"],
            "--output",
            str(tmp_path / "preds"),
        ],
    ).json
    assert scored["rows_in"] == scored["rows_scored"] == made["splits"]["test"]["rows"]
    assert scored["rows_quarantined"] == 0
