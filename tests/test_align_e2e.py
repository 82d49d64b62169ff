"""Image-text alignment through the real CLI on the session's Ray (issue 31): ``mmray train`` with
``model.align`` (contrast and matching) on generated caption-matching data, its checkpoint scored by ``mmray score``, and a
``pairs`` setting that names no label refused before any work."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

from mmray.checkpoint import load_info, load_model
from mmray.data.tasks import make_task_dataset
from tests.helpers import run_cli, tiny_overrides

pytestmark = pytest.mark.integration

ALIGN = [
    "model.align.weight=1.0",
    "model.align.pairs=label=yes",
    "model.align.projection_dim=16",
    "model.align.itm_weight=1.0",
]


@pytest.fixture(scope="module")
def match_data(tmp_path_factory) -> dict:
    return make_task_dataset("match", tmp_path_factory.mktemp("align") / "data", rows=240, seed=3)


def test_a_pairs_label_the_data_lacks_is_refused_naming_the_key(match_data, ray_address, tmp_path):
    args = tiny_overrides(
        match_data, tmp_path / "runs", **{"model.align.weight": 1, "model.align.pairs": "label=maybe"}
    )
    proc = run_cli(["train", "--config", "configs/demo.yaml", *args], ray_address, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.align.pairs: 'maybe' is not a label of 'label' (labels: ['no', 'yes'])" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_aligned_training_checkpoints_the_projection_and_scores(match_data, ray_address, tmp_path):
    args = tiny_overrides(match_data, tmp_path / "runs", **{"train.epochs": 2, "train.num_workers": 1})
    result = run_cli(["train", "--config", "configs/demo.yaml", *args, *ALIGN], ray_address).json
    ckpt = result["checkpoint"]
    info = load_info(ckpt)
    align = info.model.align
    assert (align.weight, align.pairs, align.projection_dim, align.itm_weight) == (1.0, "label=yes", 16, 1.0)
    model = load_model(ckpt)
    assert model.align is not None and model.heads_read_similarity and model.match_head is not None
    assert model.align.scale().item() != pytest.approx(1 / 0.07)  # the temperature was learned, and saved

    out = tmp_path / "preds"
    test = match_data["test"]["path"]
    scored = run_cli(["score", "--checkpoint", ckpt, "--input", test, "--output", str(out)], ray_address).json
    rows = pads.dataset(test, format="parquet").count_rows()
    assert scored["rows_scored"] == rows and scored["rows_quarantined"] == 0
    predictions = pads.dataset(str(out), format="parquet").to_table(columns=["prediction"])["prediction"]
    assert set(predictions.to_pylist()) <= {"no", "yes"}
