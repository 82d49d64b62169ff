"""``mmray ablate --retrieval`` through the real CLI on the session's Ray: a tiny aligned checkpoint's
recalls over a split equal those computed here from the same rows without Ray, bad rows are
quarantined, and a checkpoint without alignment is refused in one line (exit 2)."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest
import torch

from mmray.config import AlignConfig, StorageConfig
from mmray.retrieval import retrieval_recalls
from mmray.score.retrieval import COUNTED, KEY, AlignedVectors
from tests.helpers import run_cli_here
from tests.score.conftest import TASK, make_checkpoint, write_input
from tests.score.test_retrieval import preprocessed

pytestmark = pytest.mark.integration


def test_ablate_retrieval_reports_the_recalls_of_the_aligned_vectors(ray_address, tiny_checkpoint, tmp_path):
    ckpt = make_checkpoint(tmp_path, [TASK], align=AlignConfig(weight=1.0, projection_dim=8))
    data = write_input(tmp_path / "in", rows=30, seed=4, prefix="r", bad=2)
    args = ["ablate", "--retrieval", "--checkpoint", str(ckpt), "--input", data["path"]]

    out = run_cli_here([*args, "--same-caption"]).json
    assert (out["rows_in"], out["rows_quarantined"]) == (30, 2)
    retrieval = out["retrieval"]
    assert (retrieval["rows"], retrieval["pairs"], retrieval["same_caption"]) == (28, "all", True)

    rows = pads.dataset(data["path"], format="parquet").to_table().to_pydict()
    vectors = AlignedVectors(str(ckpt), StorageConfig())(preprocessed(ckpt, rows))
    text, image, keys = (torch.from_numpy(vectors[k][vectors[COUNTED]]) for k in ("text", "image", KEY))
    want = retrieval_recalls(text, image, keys)
    for direction in ("text_to_image", "image_to_text"):
        assert list(retrieval[direction]) == ["R@1", "R@5", "R@10"]
        assert retrieval[direction] == pytest.approx(want[direction], abs=1e-9)

    refused = run_cli_here(
        ["ablate", "--retrieval", "--checkpoint", str(tiny_checkpoint), "--input", data["path"]],
        check=False,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "has no image-text alignment (model.align.weight = 0)" in error[0]
    assert "Traceback" not in refused.stderr
