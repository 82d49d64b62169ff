"""``mmray report RUN_DIR``: one self-contained ``report.html`` for a finished run.

Everything is inline (PNGs as data URIs, one style block, no script, no network), so the file can be
mailed, attached to a ticket or opened from object storage. The plots are matplotlib (Agg):

    curves        train/val loss and every validation metric per epoch (``history.jsonl``)
    lr            the learning rate(s) at the end of each epoch
    confusion     per task, on the validation set (the full model of the ablation below)
    per-class     precision and recall per class (multiclass) or per label (binary, multilabel)
    ablation      ``mmray ablate``'s variants (full, text masked, image masked, unimodal heads)
    retrieval     text->image and image->text Recall@1/5/10 (``mmray ablate --retrieval``), for a
                  checkpoint with image-text alignment (``model.align``) only
    calibration   accuracy against confidence (multiclass top class; binary/multilabel scores)
    data          rows in / used / quarantined per split, and the top quarantine reasons
    config        the resolved config the run was started with
    lineage       run, checkpoint, model_id, mmray (git sha), Ray and torch versions

The confusion matrices, per-class scores, ablation and calibration come from one run of
``mmray.score.ablation.run_ablation`` on the run's validation split when the report is made, and the
retrieval recalls from ``mmray.score.retrieval.run_retrieval`` on the same split (Ray is needed for it;
``evaluate=False`` leaves those sections saying so).

Example:
    mmray report runs/mmray-20261202-134509-7f7e07
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mmray.config import Config, config_from_dict
from mmray.data import storage
from mmray.train.tracking import read_history

__all__ = ["REPORT_FILE", "SECTIONS", "best_checkpoint", "load_run", "render_report", "write_report"]

REPORT_FILE = "report.html"
SECTIONS = (
    "summary",
    "curves",
    "lr",
    "confusion",
    "per-class",
    "ablation",
    "retrieval",
    "calibration",
    "data",
    "config",
    "lineage",
)
_OPTIONAL = ("retrieval",)  # only where the evaluation has it: a model without alignment has nothing to show
_CONFIG_FILE = "config.json"  # written by mmray.train.launcher.run_training
_TOP_REASONS = 8


def _read_json(uri: str, cfg: Config) -> dict | None:
    try:
        return json.loads(storage.read_text(uri, cfg.storage))
    except FileNotFoundError:
        return None


def best_checkpoint(run_dir: str, cfg: Config) -> str | None:
    """The run's best checkpoint by ``train.checkpoint_metric`` / ``checkpoint_mode``, from the record
    each checkpoint's ``mmray.json`` carries (None when the run has none)."""
    fs, path = storage.resolve(run_dir, cfg.storage)
    from pyarrow import fs as pafs

    best, best_value = None, None
    sign = 1 if cfg.train.checkpoint_mode == "min" else -1
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        name = info.path.rsplit("/", 1)[-1]
        if info.type != pafs.FileType.Directory or not name.startswith("checkpoint_"):
            continue
        uri = storage.join(run_dir, name)
        bundle = _read_json(storage.join(uri, "mmray.json"), cfg)
        value = (bundle or {}).get("metrics", {}).get(cfg.train.checkpoint_metric)
        if value is not None and (best_value is None or sign * value < sign * best_value):
            best, best_value = uri, value
    return best


def load_run(run_dir: str, cfg: Config | None = None) -> dict[str, Any]:
    """What a run directory holds, read once: history, metrics, config, quarantine summaries."""
    from mmray.data.pipeline import ranked_reasons  # imports Ray Data: only when a report is made

    cfg = cfg or Config()
    saved = _read_json(storage.join(run_dir, _CONFIG_FILE), cfg) or {}
    run_cfg = config_from_dict(saved["config"]) if "config" in saved else cfg
    quarantine = {}
    for split in ("train", "val"):
        try:
            with storage.local_dir(storage.join(run_dir, "quarantine"), cfg.storage) as local:
                table = pq.read_table(f"{local}/{split}.parquet")
        except (FileNotFoundError, OSError):
            continue
        top = ranked_reasons(table, _TOP_REASONS)
        quarantine[split] = {"rows": table.num_rows, "reasons": [(f"{c or '-'}: {r}", n) for (c, r), n in top]}
    try:
        history = read_history(run_dir, cfg)
    except FileNotFoundError:
        history = []
    return {
        "run_dir": storage.redact(run_dir),
        "history": history,
        "metrics": _read_json(storage.join(run_dir, "metrics.json"), cfg) or {},
        "config": saved.get("config"),
        "versions": saved.get("versions", {}),
        "run_config": run_cfg,
        "quarantine": quarantine,
    }


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float = 6.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _epoch_plot(history: list[dict], keys: list[str], title: str, ylabel: str, size: tuple[float, ...] = ()) -> str:
    """One line per key of ``history`` (those some epoch has) against the epoch, as an inline image."""
    epochs = [h["epoch"] + 1 for h in history]
    fig, ax = _figure(*size)
    for key in keys:
        if any(key in h for h in history):
            ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.legend(fontsize="small")
    _epoch_axis(ax)
    return _img(_png(fig), title)


def _curves(history: list[dict]) -> list[str]:
    plots = [_epoch_plot(history, ["train_loss", "val_loss"], "loss", "loss")]
    metrics = sorted({k for h in history for k in h if k.startswith("val_") and k not in ("val_loss", "val_rows")})
    if metrics:
        plots.append(_epoch_plot(history, metrics, "validation metrics", "value"))
    return plots


def _lr(history: list[dict]) -> list[str]:
    return [_epoch_plot(history, ["lr", "encoder_lr"], "learning rate", "learning rate (end of epoch)", (6.0, 3.0))]


def _confusion(name: str, classes: list[str], cm: np.ndarray) -> str:
    fig, ax = _figure(1.6 + 0.55 * len(classes), 1.2 + 0.5 * len(classes))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=f"{name}: confusion (validation)")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}",
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black",
                    fontsize=8,
                )
    return _img(_png(fig), f"{name} confusion matrix")


def _per_class(name: str, classes: list[str], precision: np.ndarray, recall: np.ndarray) -> str:
    fig, ax = _figure(max(4.0, 0.6 * len(classes) + 2), 3.2)
    x = np.arange(len(classes))
    ax.bar(x - 0.2, precision, 0.4, label="precision")
    ax.bar(x + 0.2, recall, 0.4, label="recall")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set(ylim=(0, 1.05), title=f"{name}: per-class precision / recall (validation)")
    ax.legend(fontsize="small")
    return _img(_png(fig), f"{name} per-class precision and recall")


def _calibration(name: str, confidence: np.ndarray, accuracy: np.ndarray, rows: np.ndarray, what: str) -> str:
    fig, ax = _figure(4.2, 4.0)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    seen = rows > 0
    ax.plot(confidence[seen], accuracy[seen], marker="o", label=what)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="predicted probability",
        ylabel="observed frequency",
        title=f"{name}: calibration (validation)",
    )
    ax.legend(fontsize="small")
    return _img(_png(fig), f"{name} calibration")


def _task_sections(tasks: list[dict], stats: dict[str, dict]) -> dict[str, list[str]]:
    """Confusion, per-class and calibration blocks per task, from ``MetricAccumulator.task_stats``."""
    out: dict[str, list[str]] = {"confusion": [], "per-class": [], "calibration": []}
    for task in tasks:
        name, kind, classes = task["name"], task["kind"], list(task["classes"])
        st = {k: np.asarray(v, dtype=float) for k, v in stats.get(name, {}).items()}
        if kind == "multiclass":
            cm = st["confusion"]
            out["confusion"].append(_confusion(name, classes, cm))
            precision = np.diag(cm) / np.maximum(cm.sum(0), 1)
            recall = np.diag(cm) / np.maximum(cm.sum(1), 1)
            out["per-class"].append(_per_class(name, classes, precision, recall))
            rows, correct = st["calibration_rows"], st["calibration_correct"]
            centers = (np.arange(len(rows)) + 0.5) / len(rows)
            out["calibration"].append(_calibration(name, centers, correct / np.maximum(rows, 1), rows, "top class"))
        elif kind in ("binary", "multilabel"):
            counts = st["counts"]  # [label, (tp, fp, fn, tn)]
            labels = classes if kind == "multilabel" else [classes[-1]]
            for j, label in enumerate(labels):
                tp, fp, fn, tn = counts[j]
                out["confusion"].append(_confusion(f"{name}/{label}", ["no", "yes"], np.array([[tn, fp], [fn, tp]])))
            out["per-class"].append(
                _per_class(
                    name,
                    labels,
                    counts[:, 0] / np.maximum(counts[:, 0] + counts[:, 1], 1),
                    counts[:, 0] / np.maximum(counts[:, 0] + counts[:, 2], 1),
                )
            )
            pos, neg = st["pos_hist"].sum(0), st["neg_hist"].sum(0)
            k = 10  # 200 histogram bins -> 10 for a readable reliability diagram
            pos, neg = pos.reshape(k, -1).sum(1), neg.reshape(k, -1).sum(1)
            centers = (np.arange(k) + 0.5) / k
            out["calibration"].append(_calibration(name, centers, pos / np.maximum(pos + neg, 1), pos + neg, "score"))
        else:
            out["per-class"].append(f"<p>{html.escape(name)}: regression (no classes).</p>")
    return out


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;background:#fff;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;margin:.3em .6em .3em 0;vertical-align:top}pre{background:#f7f7f7;padding:1em;overflow:auto}
.note{color:#666}
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="n">{v:.4g}</td>'
        if isinstance(v, int):
            return f'<td class="n">{v:,}</td>'
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(title)}</h2>{body}</section>'


def _retrieval(retrieval: dict[str, Any]) -> str:
    """Recall@K per direction, and which rows counted (``run_retrieval``'s ``"retrieval"``)."""
    directions = ("text_to_image", "image_to_text")
    ks = list(retrieval[directions[0]])
    rows = [[d.replace("_", " "), *(retrieval[d][k] for k in ks)] for d in directions]
    correct = "every image of an identical caption" if retrieval.get("same_caption") else "the row's own pair"
    return _table(["direction", *ks], rows) + (
        f'<p class="note">{retrieval["rows"]:,} caption-image pairs (model.align.pairs='
        f"{html.escape(str(retrieval.get('pairs', 'all')))}); correct: {correct}.</p>"
    )


def render_report(
    run: dict[str, Any],
    evaluation: dict[str, Any] | None,
    checkpoint: str | None,
    model_id: str | None = None,
    tasks: list[dict] | None = None,
) -> str:
    """The report's HTML. ``evaluation`` is ``run_ablation(..., with_stats=True)``'s result, or None
    (the sections that need it say why they are empty)."""
    history, metrics = run["history"], run["metrics"]
    missing_eval = '<p class="note">not evaluated (mmray report --no-evaluate, or no checkpoint)</p>'
    last = history[-1] if history else {}
    summary_rows = [["epochs run", len(history)], ["train_loss (last epoch)", last.get("train_loss", "")]]
    summary_rows += [
        [f"val {k} (reported checkpoint)", v]
        for k, v in metrics.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k not in ("epoch", "train_loss")
        and not ("/" in k and k.split("/", 1)[1] in metrics)
    ]
    sections = {"summary": ("Summary", _table(["", "value"], summary_rows))}
    if history:
        sections["curves"] = ("Loss and metric curves", "".join(_curves(history)))
        sections["lr"] = ("Learning rate", "".join(_lr(history)))
    else:
        sections["curves"] = ("Loss and metric curves", '<p class="note">no history.jsonl</p>')
        sections["lr"] = ("Learning rate", '<p class="note">no history.jsonl</p>')
    if evaluation is not None and tasks is not None:
        blocks = _task_sections(tasks, evaluation.get("stats", {}))
        sections["confusion"] = ("Confusion matrices (validation)", "".join(blocks["confusion"]))
        sections["per-class"] = ("Per-class precision and recall (validation)", "".join(blocks["per-class"]))
        variants = list(evaluation["metrics"])
        keys = [
            k
            for k in ("loss", "accuracy", "macro_f1", "auroc", "mae", "rmse")
            if any(k in evaluation["metrics"][v] for v in variants)
        ]
        rows = [
            [v, *[evaluation["metrics"][v].get(k, "") for k in keys], int(evaluation["metrics"][v].get("rows", 0))]
            for v in variants
        ]
        ablation = _table(["variant", *keys, "rows"], rows) + (
            f'<p class="note">{evaluation["rows_evaluated"]:,} validation rows evaluated, '
            f"{evaluation['rows_quarantined']:,} quarantined. Masked variants mark that modality missing on every "
            "row; they mean most for models trained with model.modality_dropout &gt; 0.</p>"
        )
        sections["ablation"] = ("Modality ablation (mmray ablate on the validation set)", ablation)
        if "retrieval" in evaluation:
            sections["retrieval"] = (
                "Retrieval (mmray ablate --retrieval on the validation set)",
                _retrieval(evaluation["retrieval"]),
            )
        sections["calibration"] = ("Calibration (validation)", "".join(blocks["calibration"]))
    else:
        for key, title in (
            ("confusion", "Confusion matrices"),
            ("per-class", "Per-class precision and recall"),
            ("ablation", "Modality ablation"),
            ("calibration", "Calibration"),
        ):
            sections[key] = (title, missing_eval)
    data_rows = [
        [split, c.get("rows_in", ""), c.get("rows_used", ""), c.get("rows_quarantined", "")]
        for split, c in metrics.get("data", {}).items()
    ]
    data = _table(["split", "rows in", "rows used", "rows quarantined"], data_rows)
    if "data_cached" in metrics:
        where = "cached in the object store" if metrics["data_cached"] else "streamed"
        data += f'<p class="note">preprocessed splits {where}</p>'
    for split, q in run["quarantine"].items():
        if q["reasons"]:
            data += f"<h3>top quarantine reasons: {html.escape(split)}</h3>" + _table(["reason", "rows"], q["reasons"])
    sections["data"] = ("Data and quarantine", data)
    config = json.dumps(run["config"], indent=2, sort_keys=True, default=str) if run["config"] else "(not recorded)"
    sections["config"] = (
        "Resolved config",
        f"<details><summary>{len(config.splitlines())} lines</summary><pre>{html.escape(config)}</pre></details>",
    )
    lineage = [
        ["run dir", run["run_dir"]],
        ["checkpoint", storage.redact(checkpoint or "(none)")],
        ["model_id", model_id or ""],
        *[[k, v] for k, v in run["versions"].items()],
        ["report made", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")],
    ]
    sections["lineage"] = ("Lineage", _table(["", ""], lineage))
    body = "".join(_section(key, *sections[key]) for key in SECTIONS if key in sections or key not in _OPTIONAL)
    title = f"mmray run report: {run['run_dir'].rstrip('/').rsplit('/', 1)[-1]}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def write_report(run_dir: str, cfg: Config | None = None, evaluate: bool = True) -> dict[str, Any]:
    """Writes ``RUN_DIR/report.html``; with ``evaluate``, Ray must be initialised (the ablation runs on
    the run's validation split).

    Returns:
        ``{"report", "checkpoint", "model_id", "evaluated"}``.
    """
    from mmray.checkpoint import open_checkpoint

    run = load_run(run_dir, cfg)
    run_cfg: Config = run["run_config"]
    checkpoint = best_checkpoint(run_dir, run_cfg)
    evaluation, mid, tasks, aligned = None, None, None, False
    if checkpoint is not None:
        with open_checkpoint(checkpoint, run_cfg.storage) as opened:
            mid, tasks = opened.model_id(), [t.to_dict() for t in opened.info.tasks]
            aligned = opened.info.model.align.weight > 0
        if evaluate and run_cfg.data.val:
            from mmray.score.ablation import run_ablation
            from mmray.score.retrieval import run_retrieval

            evaluation = run_ablation(run_cfg, checkpoint, run_cfg.data.val, with_stats=True)
            if aligned:
                evaluation["retrieval"] = run_retrieval(run_cfg, checkpoint, run_cfg.data.val)["retrieval"]
    uri = storage.join(run_dir, REPORT_FILE)
    storage.write_text(uri, render_report(run, evaluation, checkpoint, mid, tasks), run_cfg.storage)
    return {
        "report": storage.redact(uri),
        "checkpoint": checkpoint,
        "model_id": mid,
        "evaluated": evaluation is not None,
    }
