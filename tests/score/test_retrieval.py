"""Retrieval's actor and its refusals, called directly (no Ray): which rows count, their vectors and
caption keys, the pairs label, and a checkpoint without alignment refused before any work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mmray.checkpoint import open_checkpoint
from mmray.config import AlignConfig, Config, StorageConfig
from mmray.data.preprocess import Preprocessor
from mmray.data.schema import ERROR, IMAGE, TEXT
from mmray.data.synthetic import make_rows
from mmray.score.predictor import model_inputs
from mmray.score.retrieval import COUNTED, KEY, AlignedVectors, pair_label, run_retrieval
from tests.score.conftest import TASK, make_checkpoint


@pytest.fixture(scope="module")
def aligned_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("aligned"), [TASK], align=AlignConfig(weight=1.0, projection_dim=8))


def preprocessed(ckpt, rows: dict[str, list], pairs=None) -> dict[str, np.ndarray]:
    """As ``run_retrieval`` preprocesses: no labels, or only the pairs label."""
    with open_checkpoint(ckpt) as opened:
        spec, tokenizer = opened.info.preprocess_spec(with_labels=False), opened.tokenizer_files()
    if pairs is not None:
        spec = dataclasses.replace(spec, tasks=(pairs.task,), with_labels=True)
    return Preprocessor(spec, tokenizer)({k: np.array(v, dtype=object) for k, v in rows.items()})


def test_rows_count_with_both_modalities_and_a_true_pair_label(aligned_checkpoint):
    rows = make_rows(8, seed=2)
    rows["image"][1], rows["text"][1] = b"not an image", None  # quarantined
    rows["text"][2] = None  # no caption: not a pair to retrieve
    rows["text"][6] = rows["text"][0]  # one caption twice: one key
    pairs = pair_label("label=dog_red", (TASK,))
    batch = preprocessed(aligned_checkpoint, rows, pairs)
    out = AlignedVectors(str(aligned_checkpoint), StorageConfig(), pairs=pairs)(batch)

    assert out[ERROR][1] != ""
    assert out[COUNTED].tolist() == [label == "dog_red" and i not in (1, 2) for i, label in enumerate(rows["label"])]
    assert out[COUNTED].sum() == 2  # rows 0 and 6
    assert out[KEY][0] == out[KEY][6] and len(set(out[KEY][[0, 3, 4, 5, 7]].tolist())) == 5
    everything = AlignedVectors(str(aligned_checkpoint), StorageConfig())(preprocessed(aligned_checkpoint, rows))
    assert everything[COUNTED].tolist() == [i not in (1, 2) for i in range(8)]

    good = np.array([0, 2, 3, 4, 5, 6, 7])
    with open_checkpoint(aligned_checkpoint) as opened, torch.no_grad():
        model = opened.load_model()
        features = model.encode(model_inputs(batch, good, torch.device("cpu")))
        want = model.align({m: features[m].pooled for m in (IMAGE, TEXT)})
    for m in (IMAGE, TEXT):
        np.testing.assert_allclose(out[m][good], want[m].numpy(), rtol=0, atol=1e-6)
        assert not out[m][1].any()


def test_a_pairs_label_the_checkpoint_lacks_is_named():
    assert pair_label("all", (TASK,)) is None
    assert pair_label("label = dog_blue", (TASK,)).index == TASK.classes.index("dog_blue")
    with pytest.raises(ValueError, match="model.align.pairs: no task 'match'"):
        pair_label("match=yes", (TASK,))
    with pytest.raises(ValueError, match="model.align.pairs: 'yes' is not a label of 'label'"):
        pair_label("label=yes", (TASK,))


def test_a_checkpoint_without_alignment_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"has no image-text alignment \(model.align.weight = 0\)"):
        run_retrieval(Config(), str(tiny_checkpoint), str(tmp_path / "no such input"))
