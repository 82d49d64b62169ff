"""``mmray validate-data``: what training or scoring would make of a dataset, before either runs.

The checks are training's own, run in this process without Ray: the schema check of
``pipeline.input_files`` (the same messages), the label maps of ``prepare.build_tasks``, the tokenizer
of ``prepare.prepare_tokenizer`` and the ``Preprocessor`` actor's row checks, so every row it reports
as quarantined would be quarantined by ``mmray train`` with the same reason. On top: rows per file,
label distribution per task, text length in tokens, image format/mode/size on a sample, rows missing
each modality, and duplicate ids.

Exit status (through the CLI): 0 no problem, 1 problems found (schema errors, rows that would be
quarantined, duplicate ids), 2 the data cannot be read (nothing there, not Parquet).

Example:
    mmray validate-data work/data/train --config configs/demo.yaml
    mmray validate-data s3://bucket/events/date=2024-05-01 --unlabeled --json
"""

from __future__ import annotations

import io
import tempfile
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmray.config import Config
from mmray.console import printable
from mmray.data import storage
from mmray.data.labels import label_key
from mmray.data.preprocess import Preprocessor, PreprocessSpec
from mmray.data.schema import (
    ATTENTION_MASK,
    ERROR,
    ERROR_COLUMN,
    ERROR_STAGE,
    ID,
    IMAGE,
    TEXT,
    SchemaError,
    check_columns,
    mask_key,
    unify_columns,
)

__all__ = ["CannotReadError", "format_report", "validate_data"]

_BATCH_ROWS = 256
_TOP_REASONS = 10
_TOP_LABELS = 20


class CannotReadError(RuntimeError):
    """The dataset cannot be read at all (a file that is not Parquet)."""


def _file_metadata(uri: str, files: list[str], cfg: Config) -> dict[str, pq.FileMetaData]:
    fs, _ = storage.resolve(uri, cfg.storage)
    out = {}
    for path in files:
        try:
            out[path] = pq.read_metadata(path, filesystem=fs)
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise CannotReadError(f"{path} is not a readable Parquet file: {storage.redact(str(e))[:200]}") from None
    return out


def _schema_problems(meta: dict[str, pq.FileMetaData], expected: dict[str, str]) -> list[str]:
    """Training's schema messages, one per file that fails, then the cross-file check."""
    problems = []
    schemas = {path: m.schema.to_arrow_schema() for path, m in meta.items()}
    for path, schema in schemas.items():
        try:
            check_columns(schema, expected, path)
        except SchemaError as e:
            problems.append(str(e))
    if not problems:
        try:
            unify_columns(schemas, expected)
        except SchemaError as e:
            problems.append(str(e))
    return problems


def _numpy_batch(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """A record batch as Ray's ``batch_format="numpy"`` hands it to the preprocessing actors."""
    return {name: col.to_numpy(zero_copy_only=False) for name, col in zip(batch.schema.names, batch.columns)}


def _quantiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


_SIZE_BUCKETS = ((64, "<64 px"), (256, "64-255 px"), (1024, "256-1023 px"), (4096, "1024-4095 px"))


def _image_header(data: bytes) -> tuple[str, str, str]:
    """(format, mode, size bucket of the longer side), from the header alone."""
    with Image.open(io.BytesIO(data)) as img:
        side = max(img.size)
        size = next((name for limit, name in _SIZE_BUCKETS if side < limit), ">=4096 px")
        return str(img.format), img.mode, size


def validate_data(
    uri: str, cfg: Config, labeled: bool = True, max_rows: int | None = None, image_sample: int = 500
) -> dict[str, Any]:
    """Checks the Parquet dataset at ``uri`` as ``cfg`` would read it.

    Args:
        labeled: the data is for training or evaluation (label columns required and checked).
        max_rows: stop the row checks after this many rows (None: all rows; the per-file counts and
            the schema check always cover every file).
        image_sample: rows whose image header is read for the format/mode/size histogram.

    Returns:
        ``{"uri", "files", "rows", "schema_problems", "labels", "text_tokens", "images", "missing",
        "duplicate_ids", "quarantine", "problems", "ok"}``.

    Raises:
        FileNotFoundError: nothing at ``uri``.
        CannotReadError: a file that is not Parquet.
    """
    from mmray.checkpoint import TOKENIZER_DIR
    from mmray.data import prepare  # the label maps and tokenizer exactly as training builds them

    files = storage.list_parquet_files(uri, cfg.storage)
    meta = _file_metadata(uri, files, cfg)
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=(), with_labels=False)
    expected = {**spec.input_columns(), **({c: "label" for c in cfg.data.label_columns} if labeled else {})}
    report: dict[str, Any] = {
        "uri": storage.redact(uri),
        "files": [{"path": storage.redact(p), "rows": m.num_rows} for p, m in meta.items()],
        "rows": sum(m.num_rows for m in meta.values()),
        "schema_problems": _schema_problems(meta, expected),
    }
    if report["schema_problems"]:
        report["problems"] = list(report["schema_problems"])
        report["ok"] = False
        return report
    tasks = prepare.build_tasks(cfg, uri, files) if labeled else []
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=tasks, with_labels=labeled)
    with tempfile.TemporaryDirectory() as tmp:
        inherited = storage.join(cfg.train.resume_from, TOKENIZER_DIR) if cfg.train.resume_from else None
        tokenizer_files = prepare.prepare_tokenizer(cfg, uri, files, tmp, inherited)
    preprocessor = Preprocessor(
        spec,
        tokenizer_files,
        fetch_threads=cfg.data.preprocess.fetch_threads,
        fetch_attempts=cfg.data.preprocess.fetch_attempts,
        fetch_timeout_s=cfg.data.preprocess.fetch_timeout_s,
    )
    report.update(_row_checks(uri, files, cfg, spec, preprocessor, max_rows, image_sample))
    report["labels"] = {t.name: report["labels"].get(t.name, {}) for t in tasks}
    problems = []
    if report["quarantine"]["rows"]:
        problems.append(f"{report['quarantine']['rows']} of {report['rows_checked']} rows would be quarantined")
    if report["duplicate_ids"]["rows"]:
        problems.append(f"{report['duplicate_ids']['rows']} rows share an id with another row")
    report["problems"], report["ok"] = problems, not problems
    return report


def _row_checks(
    uri: str,
    files: list[str],
    cfg: Config,
    spec: PreprocessSpec,
    preprocessor: Preprocessor,
    max_rows: int | None,
    image_sample: int,
) -> dict[str, Any]:
    fs, _ = storage.resolve(uri, cfg.storage)
    columns = list(spec.input_columns())
    rows = 0
    reasons: Counter[tuple[str, str, str]] = Counter()
    examples: dict[tuple[str, str, str], str] = {}
    labels: dict[str, Counter[str]] = {t.name: Counter() for t in spec.tasks}
    tokens: list[int] = []
    truncated = 0
    images: dict[str, Counter[str]] = {"format": Counter(), "mode": Counter(), "size": Counter()}
    image_errors = sampled = 0
    missing = Counter()
    seen: set[str] = set()
    duplicated: Counter[str] = Counter()
    for path in files:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                if max_rows is not None and rows >= max_rows:
                    break
                if max_rows is not None:
                    batch = batch.slice(0, max_rows - rows)
                rows += batch.num_rows
                raw = _numpy_batch(batch)
                out = preprocessor(raw)
                for i in range(batch.num_rows):
                    error = out[ERROR][i]
                    if error:
                        key = (out[ERROR_STAGE][i], out[ERROR_COLUMN][i], error[:60])
                        reasons[key] += 1
                        examples.setdefault(key, str(out[ID][i]))
                    else:
                        if out[mask_key(TEXT)][i]:
                            n = int(out[ATTENTION_MASK][i].sum())
                            tokens.append(n)
                            truncated += n >= spec.text.max_length
                    missing["text"] += not out[mask_key(TEXT)][i] and not error
                    missing["image"] += not out[mask_key(IMAGE)][i] and not error
                    row_id = out[ID][i]
                    if row_id is not None:
                        (duplicated.update([row_id]) if row_id in seen else seen.add(row_id))
                for t in spec.tasks:
                    for value in batch.column(t.name).to_pylist():
                        for v in value if isinstance(value, list) else [value]:
                            key = label_key(v)  # as the label map keys it: 1.0 is class "1", inf none
                            labels[t.name][str(v) if key is None else key] += 1
                if spec.image_column and sampled < image_sample:
                    for data in batch.column(spec.image_column).to_pylist()[: image_sample - sampled]:
                        if not data:
                            continue
                        sampled += 1
                        try:
                            for name, value in zip(images, _image_header(data)):
                                images[name][value] += 1
                        except Exception:  # what Pillow cannot even identify
                            image_errors += 1
        if max_rows is not None and rows >= max_rows:
            break
    bad = sum(reasons.values())
    return {
        "rows_checked": rows,
        "labels": {name: dict(c.most_common(_TOP_LABELS)) for name, c in labels.items()},
        "label_classes": {  # classes seen; a null, NaN or inf label is counted above but is none
            t.name: sum(k in t.classes for k in labels[t.name]) if t.classes else len(labels[t.name])
            for t in spec.tasks
        },
        "text_tokens": {
            **_quantiles(tokens),
            "max_length": spec.text.max_length,
            "truncated": truncated / max(len(tokens), 1),
        },
        "images": {
            "sampled": sampled,
            "decode_errors": image_errors,
            **{name: dict(c.most_common()) for name, c in images.items()},
        },
        "missing": {m: missing[m] / max(rows, 1) for m in ("text", "image")},
        "duplicate_ids": {
            "ids": len(duplicated),
            "rows": sum(duplicated.values()) + len(duplicated),
            "examples": [i for i, _ in duplicated.most_common(5)],
        },
        "quarantine": {
            "rows": bad,
            "fraction": bad / max(rows, 1),
            "max_bad_fraction": cfg.data.max_bad_fraction,
            "reasons": [
                {"stage": st, "column": col, "error": err, "rows": n, "example_id": examples[(st, col, err)]}
                for (st, col, err), n in reasons.most_common(_TOP_REASONS)
            ],
        },
    }


def _printable(obj: Any) -> Any:
    """Every string in the report (ids, paths, label values, reasons, dict keys too) through
    ``console.printable``: all of them may come from the data."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {_printable(k): _printable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_printable(v) for v in obj]
    return obj


def format_report(r: dict[str, Any]) -> str:
    """The report as a table for a terminal; nothing from the data can reach it unescaped."""
    r = _printable(r)
    lines = [f"dataset      {r['uri']}", f"files        {len(r['files'])} ({r['rows']:,} rows)"]
    lines += [f"  {f['path']}  {f['rows']:,} rows" for f in r["files"][:10]]
    if len(r["files"]) > 10:
        lines.append(f"  ... and {len(r['files']) - 10} more")
    if r["schema_problems"]:
        lines += ["schema       PROBLEMS"] + [f"  {p}" for p in r["schema_problems"]]
        return "\n".join(lines + ["result       PROBLEMS (schema): fix the columns first"])
    lines.append("schema       ok")
    checked = r["rows_checked"]
    if checked < r["rows"]:
        lines.append(f"rows checked {checked:,} of {r['rows']:,} (--max-rows)")
    for name, counts in r["labels"].items():
        total = sum(counts.values()) or 1
        shown = "  ".join(f"{k} {v:,} ({v / total:.0%})" for k, v in counts.items())
        lines.append(f"labels       {name}: {r['label_classes'][name]} values  {shown}")
    t = r["text_tokens"]
    if "p50" in t:
        lines.append(
            f"text tokens  p50 {t['p50']:g}  p90 {t['p90']:g}  p99 {t['p99']:g}  max {t['max']:g}  "
            f"(max_length {t['max_length']}: {t['truncated']:.1%} truncated)"
        )
    im = r["images"]
    lines.append(f"images       {im['sampled']:,} sampled, {im['decode_errors']} unreadable")
    for name in ("format", "mode", "size"):
        lines.append(f"  {name:<6} " + "  ".join(f"{k} {v:,}" for k, v in im[name].items()))
    lines.append(f"missing      text {r['missing']['text']:.1%}  image {r['missing']['image']:.1%}")
    d = r["duplicate_ids"]
    lines.append(f"ids          {d['ids']:,} duplicated" + (f" (e.g. {', '.join(d['examples'])})" if d["ids"] else ""))
    q = r["quarantine"]
    lines.append(
        f"quarantine   {q['rows']:,} rows ({q['fraction']:.1%}; training aborts above "
        f"data.max_bad_fraction={q['max_bad_fraction']})"
    )
    lines += [
        f"  {x['rows']:>6,}  {x['stage']}/{x['column'] or '-'}: {x['error']} (e.g. id {x['example_id']})"
        for x in q["reasons"]
    ]
    lines.append("result       " + ("OK" if r["ok"] else "PROBLEMS: " + "; ".join(r["problems"])))
    return "\n".join(lines)
