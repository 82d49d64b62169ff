"""What a finished ``mmray tune`` sweep reports: one row per trial (``results.parquet``), the ranking by
the sweep's metric and the top-``k`` table printed before the command's JSON line."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmray.config import Config
from mmray.data import storage
from mmray.train.tune.space import Dimension, with_values

__all__ = ["default_mode", "format_top", "metric_names", "rank", "results_table", "trial_rows", "write_results"]

TOP = 5


def default_mode(metric: str) -> str:
    """Losses and errors are minimised, everything else (accuracy, F1, AUROC) maximised."""
    return "min" if metric.endswith(("loss", "mae", "rmse")) else "max"


def metric_names(tasks: list) -> list[str]:
    """The metrics each epoch reports for these tasks (what the loop's ``epoch_record`` carries)."""
    from mmray.metrics import MetricAccumulator

    return ["train_loss", *sorted(f"val_{k}" for k in MetricAccumulator(tasks).compute())]


def _history(result: Any) -> list[dict[str, Any]]:
    df = result.metrics_dataframe
    return [] if df is None else df.to_dict("records")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def trial_rows(
    grid: Any, dims: list[Dimension], metric: str, mode: str, base: dict, runs: str, root: str
) -> list[dict]:
    """One row per trial of Tune's ``ResultGrid``: sampled values, status, metric history, best epoch
    and its checkpoint, sorted by trial id."""
    from mmray.runs import result_uri

    best = min if mode == "min" else max
    rows = []
    for result in grid:
        history = [h for h in _history(result) if _number(h.get(metric))]
        config = result.metrics.get("config") or {}
        trial_id = result.metrics.get("trial_id")
        epochs = with_values(base, {d.key: config[d.key] for d in dims if d.key in config}).train.epochs
        values = [float(h[metric]) for h in history]
        at_best = history[values.index(best(values))] if values else {}
        status = "error" if result.error else ("completed" if len(history) >= epochs else "stopped_early")
        rows.append(
            {
                "trial_id": trial_id,
                **{d.key: config.get(d.key) for d in dims},
                "status": status,
                "epochs": len(history),
                "final_metric": values[-1] if values else None,
                "best_metric": at_best.get(metric),
                "best_epoch": at_best.get("epoch"),
                "metric_history": values,
                "run_dir": storage.join(runs, trial_id) if trial_id else None,
                "checkpoint": result_uri(at_best["checkpoint_path"], root) if at_best.get("checkpoint_path") else None,
                "error": storage.redact(str(result.error)) if result.error else None,
            }
        )
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def results_table(rows: list[dict], dims: list[Dimension], metric: str, mode: str) -> pa.Table:
    """One row per trial. A sampled key's column keeps its values' type; choices that mix types
    (``[true, 2]``, ``[null, 1.0]`` with strings ...) are stored as their JSON text instead."""
    columns = {}
    for name in rows[0] if rows else ["trial_id"]:
        values = [r.get(name) for r in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    meta = {"mmray.metric": metric, "mmray.mode": mode, "mmray.space": json.dumps([d.key for d in dims])}
    return pa.table(columns).replace_schema_metadata(meta)


def rank(rows: list[dict], mode: str) -> list[dict]:
    """The trials that reported the metric, best first."""
    scored = [r for r in rows if _number(r["best_metric"])]
    return sorted(scored, key=lambda r: r["best_metric"], reverse=mode == "max")


def format_top(rows: list[dict], dims: list[Dimension], metric: str, mode: str, k: int = TOP) -> str:
    """The best ``k`` trials as an aligned text table."""
    header = ["trial_id", f"best {metric}", "epochs", "status", *(d.key for d in dims)]
    body = [
        [
            str(r["trial_id"]),
            f"{r['best_metric']:.4f}",
            str(r["epochs"]),
            r["status"],
            *(_short(r[d.key]) for d in dims),
        ]
        for r in rank(rows, mode)[:k]
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [f"top {min(k, len(body))} of {len(rows)} trials by {metric} ({mode}):"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_results(rows: list[dict], dims: list[Dimension], metric: str, mode: str, uri: str, cfg: Config) -> None:
    """``results.parquet`` (``results_table``) through mmray's storage (local or s3://)."""
    sink = pa.BufferOutputStream()
    pq.write_table(results_table(rows, dims, metric, mode), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), cfg.storage)
