"""``mmray ablate`` through the real CLI on the session's Ray, and its old name ``mmray evaluate``, which
runs the same job for one more release and says so on stderr."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli_here
from tests.score.conftest import write_input

pytestmark = pytest.mark.integration


def test_ablate_and_its_deprecated_old_name_report_the_same_variants(ray_address, tiny_checkpoint, tmp_path):
    data = write_input(tmp_path / "in", rows=30, seed=5, prefix="a", bad=2)
    args = ["--checkpoint", str(tiny_checkpoint), "--input", data["path"]]

    ablated = run_cli_here(["ablate", *args])
    assert (ablated.json["rows_in"], ablated.json["rows_evaluated"], ablated.json["rows_quarantined"]) == (30, 28, 2)
    assert list(ablated.json["metrics"]) == ["full", "text_masked", "image_masked"]
    assert "deprecated" not in ablated.stderr

    evaluated = run_cli_here(["evaluate", *args])
    deprecation = "mmray evaluate: deprecated, use mmray ablate (the alias goes in the next release)"
    assert evaluated.stderr.splitlines()[0] == deprecation
    for variant, metrics in ablated.json["metrics"].items():  # the same sums, perhaps in another order
        assert evaluated.json["metrics"][variant] == pytest.approx(metrics)
