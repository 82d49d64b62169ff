"""``mmray validate-data``: what training or scoring would make of a dataset, before either runs.

The checks are training's own, run in this process without Ray: the schema check of
``pipeline.input_files`` (``pipeline.schema_errors``: the same messages), the label maps of
``prepare.build_tasks``, the tokenizer of ``prepare.prepare_tokenizer`` and the ``Preprocessor`` actor's
row checks, so every row it reports as quarantined would be quarantined by ``mmray train`` with the same
reason, grouped as training's summary groups them (``pipeline.reason_counts``). On top: rows per file,
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
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmray.config import Config
from mmray.console import printable
from mmray.data import pipeline, storage
from mmray.data.labels import Task, label_key
from mmray.data.preprocess import Preprocessor, PreprocessSpec
from mmray.data.schema import ATTENTION_MASK, ERROR, ID, IMAGE, TEXT, SchemaError, mask_key

__all__ = ["CannotReadError", "format_report", "validate_data"]

_BATCH_ROWS = 256
_TOP_REASONS = 10
_ERROR_CHARS = 60  # of a reason's first error, shown: more than the 40 that group reasons
_TOP_LABELS = 20


class CannotReadError(RuntimeError):
    """The dataset cannot be read at all (a file that is not Parquet)."""


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
    try:
        footers = pipeline.read_footers(uri, files, cfg.storage)
    except SchemaError as e:  # not Parquet at all: nothing to check columns of (exit 2, not 1)
        raise CannotReadError(str(e)) from None
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=(), with_labels=False)
    expected = {**spec.input_columns(), **({c: "label" for c in cfg.data.label_columns} if labeled else {})}
    report: dict[str, Any] = {
        "uri": storage.redact(uri),
        "files": [{"path": storage.redact(p), "rows": m.num_rows} for p, m in footers.items()],
        "rows": sum(m.num_rows for m in footers.values()),
        "schema_problems": [str(e) for e in pipeline.schema_errors(footers, expected)],
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
    checks = _RowChecks(spec, image_sample)
    for batch in _batches(uri, files, cfg, list(spec.input_columns()), max_rows):
        checks.add(batch, preprocessor(_numpy_batch(batch)))
    report.update(checks.report(cfg.data.max_bad_fraction))
    report["labels"] = {t.name: report["labels"].get(t.name, {}) for t in tasks}
    problems = []
    if report["quarantine"]["rows"]:
        problems.append(f"{report['quarantine']['rows']} of {report['rows_checked']} rows would be quarantined")
    if report["duplicate_ids"]["rows"]:
        problems.append(f"{report['duplicate_ids']['rows']} rows share an id with another row")
    report["problems"], report["ok"] = problems, not problems
    return report


def _batches(
    uri: str, files: list[str], cfg: Config, columns: list[str], max_rows: int | None
) -> Iterator[pa.RecordBatch]:
    """``columns`` of the input, file by file in batches of ``_BATCH_ROWS``, up to ``max_rows`` rows."""
    fs, _ = storage.resolve(uri, cfg.storage)
    left = max_rows  # None: no limit
    for path in files:
        if left is not None and left <= 0:
            return
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                if left is not None:
                    if left <= 0:
                        return
                    batch = batch.slice(0, left)
                    left -= batch.num_rows
                yield batch


class _RowChecks:
    """What the row checks count, batch by batch: counts, token lengths and one example per reason,
    never the rows themselves.

    Args:
        image_sample: rows whose image header is read for the format/mode/size histogram.
    """

    def __init__(self, spec: PreprocessSpec, image_sample: int):
        self.spec, self.image_sample = spec, image_sample
        self.rows = 0
        self.reasons: Counter[tuple[str, str]] = Counter()  # (column, reason), as training's summary
        self.examples: dict[tuple[str, str], tuple[str, str | None, str]] = {}  # -> its first row's
        self.labels: dict[str, Counter[str]] = {t.name: Counter() for t in spec.tasks}
        self.tokens: list[int] = []
        self.truncated = 0
        self.images: dict[str, Counter[str]] = {"format": Counter(), "mode": Counter(), "size": Counter()}
        self.image_errors = self.sampled = 0
        self.missing: Counter[str] = Counter()
        self.seen: set[Any] = set()
        self.duplicated: Counter[Any] = Counter()

    def add(self, batch: pa.RecordBatch, out: dict[str, np.ndarray]) -> None:
        """One input ``batch`` and the ``Preprocessor``'s output for it."""
        self.rows += batch.num_rows
        self._count_reasons(pipeline.quarantine_records(out))
        self._count_good_rows(out)
        self._count_ids(out[ID])
        for t in self.spec.tasks:
            self._count_labels(t, batch.column(t.name).to_pylist())
        if self.spec.image_column and self.sampled < self.image_sample:
            self._sample_images(batch.column(self.spec.image_column).to_pylist()[: self.image_sample - self.sampled])

    def _count_reasons(self, records: pa.Table) -> None:
        self.reasons.update(pipeline.reason_counts(records))
        for key, example in pipeline.reason_examples(records).items():
            self.examples.setdefault(key, example)

    def _count_good_rows(self, out: dict[str, np.ndarray]) -> None:
        """Token lengths of the rows that would train, and those missing a modality."""
        good = out[ERROR] == ""
        has_text, has_image = out[mask_key(TEXT)].astype(bool), out[mask_key(IMAGE)].astype(bool)
        lengths = out[ATTENTION_MASK][good & has_text].sum(axis=1)
        self.tokens += lengths.tolist()
        self.truncated += int((lengths >= self.spec.text.max_length).sum())
        self.missing["text"] += int((good & ~has_text).sum())
        self.missing["image"] += int((good & ~has_image).sum())

    def _count_ids(self, ids: np.ndarray) -> None:
        for row_id in ids:
            if row_id is None:
                continue
            if row_id in self.seen:
                self.duplicated[row_id] += 1
            else:
                self.seen.add(row_id)

    def _count_labels(self, task: Task, values: list[Any]) -> None:
        for v in (v for value in values for v in (value if isinstance(value, list) else [value])):
            key = label_key(v)  # as the label map keys it: 1.0 is class "1", inf none
            self.labels[task.name][str(v) if key is None else key] += 1

    def _sample_images(self, images: list[bytes | None]) -> None:
        for data in images:
            if not data:
                continue
            self.sampled += 1
            try:
                for name, value in zip(self.images, _image_header(data)):
                    self.images[name][value] += 1
            except Exception:  # what Pillow cannot even identify
                self.image_errors += 1

    def report(self, max_bad_fraction: float) -> dict[str, Any]:
        """The row checks' part of ``validate_data``'s report."""
        rows, bad, tasks = self.rows, sum(self.reasons.values()), self.spec.tasks
        return {
            "rows_checked": rows,
            "labels": {name: dict(c.most_common(_TOP_LABELS)) for name, c in self.labels.items()},
            "label_classes": {  # classes seen; a null, NaN or inf label is counted above but is none
                t.name: sum(k in t.classes for k in self.labels[t.name]) if t.classes else len(self.labels[t.name])
                for t in tasks
            },
            "text_tokens": {
                **_quantiles(self.tokens),
                "max_length": self.spec.text.max_length,
                "truncated": self.truncated / max(len(self.tokens), 1),
            },
            "images": {
                "sampled": self.sampled,
                "decode_errors": self.image_errors,
                **{name: dict(c.most_common()) for name, c in self.images.items()},
            },
            "missing": {m: self.missing[m] / max(rows, 1) for m in ("text", "image")},
            "duplicate_ids": {
                "ids": len(self.duplicated),
                "rows": sum(self.duplicated.values()) + len(self.duplicated),
                "examples": [i for i, _ in self.duplicated.most_common(5)],
            },
            "quarantine": {
                "rows": bad,
                "fraction": bad / max(rows, 1),
                "max_bad_fraction": max_bad_fraction,
                "reasons": self._top_reasons(),
            },
        }

    def _top_reasons(self) -> list[dict[str, Any]]:
        """The most common reasons, grouped and ranked as training's summary does, each shown by its first
        row: stage, error (``_ERROR_CHARS``) and id."""
        top = []
        for (column, reason), rows in pipeline.ranked_reasons(self.reasons, _TOP_REASONS):
            stage, row_id, error = self.examples[(column, reason)]
            top.append(
                {
                    "stage": stage,
                    "column": column,
                    "error": error[:_ERROR_CHARS],
                    "rows": rows,
                    "example_id": str(row_id),
                }
            )
        return top


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
