"""``mmray demo``: synthetic data -> train -> score the test split -> accuracy -> the run's report.html,
on an embedded Ray."""

from __future__ import annotations

import os
from typing import Any

import pyarrow.dataset as pads

from mmray.config import load_config
from mmray.data.synthetic import make_dataset
from mmray.report import write_report
from mmray.runtime import init_ray
from mmray.score.job import run_scoring
from mmray.train.launcher import run_training

__all__ = ["run_demo"]


def test_accuracy(predictions_dir: str, test_dir: str) -> float:
    """Share of test rows whose prediction equals the label (joined on id)."""
    preds = pads.dataset(predictions_dir, format="parquet").to_table(columns=["id", "prediction"]).to_pylist()
    table = pads.dataset(test_dir, format="parquet").to_table(columns=["id", "label"])
    labels = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
    return sum(labels[p["id"]] == p["prediction"] for p in preds) / max(len(labels), 1)


def run_demo(
    workdir: str, config: str | None, overrides: list[str], rows: int = 2000, address: str | None = None
) -> dict[str, Any]:
    workdir = os.path.abspath(workdir)
    splits = make_dataset(os.path.join(workdir, "data"), rows=rows, seed=0)
    cfg = load_config(
        config,
        [
            f"data.train={splits['train']['path']}",
            f"data.val={splits['val']['path']}",
            f"train.storage_path={os.path.join(workdir, 'runs')}",
            *overrides,
        ],
    )
    init_ray(address)
    trained = run_training(cfg)
    output = os.path.join(workdir, "predictions")
    scored = run_scoring(cfg, trained["checkpoint"], splits["test"]["path"], output, overwrite=True)
    accuracy = test_accuracy(output, splits["test"]["path"])
    report = write_report(trained["run_dir"], cfg)
    print(
        f"\nmmray demo: test accuracy {accuracy:.3f} ({scored['rows_scored']} rows scored)\n"
        f"  run dir:     {trained['run_dir']}\n  checkpoint:  {trained['checkpoint']}\n"
        f"  predictions: {output}\n  report:      {report['report']}",
        flush=True,
    )
    return {"test_accuracy": accuracy, "train": trained, "score": scored, "report": report["report"]}
