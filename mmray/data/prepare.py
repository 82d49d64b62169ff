"""What a run needs from its training data before any row is preprocessed: label maps and a tokenizer.

Both are read on the driver, file by file, in bounded memory: label maps keep only each label
column's distinct values, and a trained WordPiece vocabulary sees at most ``TOKENIZER_SAMPLE_ROWS``
texts. Training (``mmray.train.launcher``), ``mmray validate-data`` and the benchmarks build them
here, so all of them see the same label maps and the same tokenizer. Where a tokenizer is kept or
inherited from is the caller's business: the paths come in, no run or checkpoint layout is known here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmray.config import Config, StorageConfig, TextConfig
from mmray.data import storage
from mmray.data.labels import LabelCollector, Task
from mmray.data.text.encoder import load_tokenizer, read_tokenizer_dir
from mmray.data.text.normalize import TextNormalizer, TextTooLarge, bounded_text
from mmray.data.text.wordpiece import train_wordpiece

__all__ = ["TOKENIZER_SAMPLE_ROWS", "build_tasks", "prepare_tokenizer", "read_batches", "sample_texts"]

TOKENIZER_SAMPLE_ROWS = 200_000  # texts used to train a WordPiece vocabulary


def read_batches(uri: str, files: list[str], columns: list[str], store: StorageConfig) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns``, file by file (each file keeps its own schema: an all-null
    column is typed null in one file and string in the next)."""
    fs, _ = storage.resolve(uri, store)
    for path in files:
        with fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(columns=columns)


def build_tasks(cfg: Config, uri: str, files: list[str]) -> list[Task]:
    """One task per label column (``data.label_columns``, kinds from ``model.tasks``); label maps from
    the training data (sorted, deterministic). Streams the label columns, keeping distinct values only."""
    collectors = {name: LabelCollector(name) for name in cfg.data.label_columns}
    for batch in read_batches(uri, files, list(collectors), cfg.storage):
        for name, collector in collectors.items():
            collector.add(batch.column(name))
    return [c.task(cfg.model.tasks.get(name)) for name, c in collectors.items()]


def sample_texts(
    uri: str,
    files: list[str],
    text_column: str,
    normalize: TextNormalizer,
    store: StorageConfig,
    limit: int = TOKENIZER_SAMPLE_ROWS,
    bounds: TextConfig | None = None,
) -> Iterator[str]:
    """The first ``limit`` non-empty normalised texts (whole batches: a few more may come), within the
    text limits (``bounds``, default ``data.text``'s) as the preprocessing actor applies them
    (``text.bounded_text``): a cell above
    ``data.text.max_bytes`` is left out (its row is quarantined where it is preprocessed), a long one cut."""
    seen, bounds = 0, bounds or TextConfig()
    for batch in read_batches(uri, files, [text_column], store):
        for text in batch.column(0).to_pylist():
            try:
                text = normalize(bounded_text(text, bounds)) if isinstance(text, str) else ""
            except TextTooLarge:
                continue
            if text:
                yield text
                seen += 1
        if seen >= limit:
            return


def prepare_tokenizer(
    cfg: Config, uri: str, files: list[str], keep_in: str, inherit_from: str | None = None
) -> dict[str, bytes]:
    """The tokenizer's files, also saved to ``keep_in``.

    Reused from ``keep_in`` when it holds one already (a resumed run), else copied from
    ``inherit_from`` (the tokenizer of the checkpoint training continues from: its embedding rows are
    indexed by that vocabulary), else loaded (``model.text_encoder.tokenizer``, or a pretrained
    encoder's own) or trained on a sample of the texts at ``uri``.
    """
    if storage.exists(storage.join(keep_in, "tokenizer_config.json"), cfg.storage):
        return _read_tokenizer(keep_in, cfg.storage)
    enc = cfg.model.text_encoder
    with tempfile.TemporaryDirectory() as tmp:
        source = enc.tokenizer or (enc.name if enc.kind == "hf" else None)
        if inherit_from:
            for name, data in _read_tokenizer(inherit_from, cfg.storage).items():
                Path(tmp, name).write_bytes(data)
        elif source:
            key = "model.text_encoder.tokenizer" if enc.tokenizer else "model.text_encoder.name"
            try:
                tokenizer = load_tokenizer(source, cfg.storage)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{key}: {e}") from None
            if tokenizer.pad_token is None:  # GPT-style vocabularies: any token works under the attention mask
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
            if tokenizer.pad_token is None:
                raise ValueError(f"{key}: tokenizer {source!r} has no pad, eos, unk or sep token to pad with")
            tokenizer.save_pretrained(tmp)
        else:
            normalize = TextNormalizer(cfg.data.text, cfg.storage)
            texts = sample_texts(uri, files, cfg.data.text_column, normalize, cfg.storage, bounds=cfg.data.text)
            train_wordpiece(texts, cfg.data.text.vocab_size, tmp, split_cjk=cfg.data.text.segmenter == "none")
        storage.copy_dir_to(tmp, keep_in, cfg.storage)
        return read_tokenizer_dir(tmp)


def _read_tokenizer(uri: str, store: StorageConfig) -> dict[str, bytes]:
    with storage.local_dir(uri, store) as local:
        return read_tokenizer_dir(local)
