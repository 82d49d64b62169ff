"""``data.cache=features``: the encoder actor's rows, and a run on cached features that trains exactly as
a run on cached preprocessed rows does (same seed, same data), checkpointing the same whole model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmray.checkpoint import WEIGHTS_FILE
from mmray.config import config_from_dict, load_config
from mmray.data.labels import Task
from mmray.data.schema import ATTENTION_MASK, IMAGE, INPUT_IDS, PIXELS, TEXT, label_key, mask_key
from mmray.data.synthetic import make_dataset
from mmray.models.encoders import feature_key
from mmray.train.features import FeatureEncoder
from mmray.train.launcher import run_training
from mmray.train.loop import initial_model
from mmray.train.tracking import read_history
from tests.helpers import tiny_overrides
from tests.models.conftest import make_batch

FROZEN = {"model.text_encoder.freeze": "true", "model.image_encoder.freeze": "true"}
CLS = Task("label", "multiclass", ("a", "b", "c"))


def numpy_rows(b: int = 6) -> dict[str, np.ndarray]:
    rows = {k: v.numpy() for k, v in make_batch(b).items()}
    return {**rows, label_key("label"): np.arange(b) % 3}


@pytest.mark.parametrize("fusion, tokens", [("concat", False), ("cross_attention", True)])
def test_the_encoder_actor_replaces_the_encoders_inputs_by_their_outputs(fusion, tokens):
    cfg = config_from_dict(
        {"data": {"cache": "features", "text": {"max_length": 8}, "image": {"size": 16}}},
        [f"model.fusion={fusion}", *(f"{k}={v}" for k, v in FROZEN.items())],
    )
    model = initial_model(cfg, [CLS], vocab_size=50)
    rows = numpy_rows()
    out = FeatureEncoder(model)(rows)
    assert PIXELS not in out and ATTENTION_MASK not in out
    for kept in (INPUT_IDS, mask_key(TEXT), mask_key(IMAGE), label_key("label")):
        np.testing.assert_array_equal(out[kept], rows[kept])
    with torch.no_grad():
        expected = model.eval().encode({k: torch.from_numpy(v) for k, v in rows.items()})
    for m in (IMAGE, TEXT):
        assert out[feature_key(m, "pooled")].dtype == np.float32
        np.testing.assert_array_equal(out[feature_key(m, "pooled")], expected[m].pooled.numpy())
        assert (feature_key(m, "tokens") in out) is tokens and (feature_key(m, "token_mask") in out) is tokens


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict:
    # 350 training rows: under the 416 at which Ray's local shuffle (buffer 256, batch 32) starts to
    # shuffle while blocks still arrive, so both runs see the same batches however their blocks are cut.
    return make_dataset(tmp_path_factory.mktemp("features_data"), rows=500, seed=0)


def train(cache: str, data: dict, root) -> dict:
    extra = {
        **FROZEN,
        "data.cache": cache,
        "train.epochs": 2,
        "train.num_workers": 1,
        "train.name": f"cache_{cache}",
        # Randomness after the encoders and hard negatives drawn from their outputs: the same either way.
        "model.modality_dropout": 0.2,
        "model.align.weight": 0.5,
        "model.align.itm_weight": 0.5,
    }
    result = run_training(load_config("configs/demo.yaml", tiny_overrides(data, root, **extra)))
    return {**result, "history": read_history(result["run_dir"])}


@pytest.mark.integration
def test_cached_features_train_and_checkpoint_as_cached_rows_do(ray_session, small_data, tmp_path):
    rows, features = train("always", small_data, tmp_path), train("features", small_data, tmp_path)
    assert features["metrics"]["data_cached"] and features["metrics"]["data"] == rows["metrics"]["data"]
    assert [h["epoch"] for h in features["history"]] == [0, 1]
    for mine, ref in zip(features["history"], rows["history"]):
        compared = sorted(k for k in ref if k.startswith("val_") or k == "train_loss")
        assert "val_loss" in compared and "val_align_loss" in compared
        # Bit-equal here; a tolerance for kernels whose rounding depends on the batch size (the actor
        # encodes batches of data.preprocess.batch_size rows). float16 features fail it.
        assert {k: mine[k] for k in compared} == pytest.approx({k: ref[k] for k in compared}, rel=1e-6, abs=1e-9)
    # The checkpoint is the whole model, frozen encoders included: scoring runs it on raw rows.
    mine = load_file(f"{features['checkpoint']}/{WEIGHTS_FILE}")
    ref = load_file(f"{rows['checkpoint']}/{WEIGHTS_FILE}")
    assert set(mine) == set(ref) and any(k.startswith("encoders.") for k in mine)
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
