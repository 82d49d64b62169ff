"""Preprocessing actors: raw Parquet rows -> token ids, uint8 pixels, modality masks, encoded labels.

``Preprocessor`` is a class-based ``map_batches`` UDF: it loads the tokenizer once per actor and then
maps batches. A row it cannot use is not dropped and does not crash the job: it comes out with a
non-empty ``_error`` (and the column and stage), and ``split_quarantine`` routes it to the quarantine.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmray.config import DataConfig, ImageConfig, StorageConfig, TextConfig
from mmray.data import schema as S
from mmray.data.image import ImageDecodeError, decode_image, resize_uint8
from mmray.data.labels import LabelError, Task, task_from_dict
from mmray.data.text import TextNormalizer, load_tokenizer

__all__ = ["PreprocessSpec", "Preprocessor", "keep_errors", "keep_good", "quarantine_rows"]


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything a preprocessing actor needs; stored in checkpoints so scoring matches training."""

    tasks: tuple[Task, ...] = ()
    with_labels: bool = True  # training/evaluation: labels required; scoring: ignored
    id_column: str = "id"
    text_column: str = "text"
    image_column: str | None = "image"
    image_uri_column: str | None = None
    missing_modality: str = "allow"
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    @classmethod
    def from_config(cls, data: DataConfig, storage: StorageConfig, tasks, with_labels: bool = True):
        return cls(
            tasks=tuple(tasks), with_labels=with_labels, id_column=data.id_column,
            text_column=data.text_column, image_column=data.image_column,
            image_uri_column=data.image_uri_column, missing_modality=data.missing_modality,
            text=data.text, image=data.image, storage=storage,
        )  # fmt: skip

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("storage")  # deployment detail, never persisted (and never credentials)
        return d

    @classmethod
    def from_dict(cls, d: dict, **overrides: Any) -> "PreprocessSpec":
        d = {**d, **overrides}
        d["tasks"] = tuple(t if isinstance(t, Task) else task_from_dict(t) for t in d.get("tasks", ()))
        d["text"] = TextConfig(**d["text"]) if isinstance(d.get("text"), dict) else d.get("text", TextConfig())
        img = d.get("image", {})
        if isinstance(img, dict):
            img = ImageConfig(**{**img, "mean": tuple(img["mean"]), "std": tuple(img["std"])})
        d["image"] = img
        return cls(**d)

    def input_columns(self) -> dict[str, str]:
        """Input column -> expected kind, for the schema check before any work."""
        cols = {self.id_column: "any", self.text_column: "string"}
        if self.image_column:
            cols[self.image_column] = "binary"
        if self.image_uri_column:
            cols[self.image_uri_column] = "string"
        if self.with_labels:
            cols.update({t.name: "label" for t in self.tasks})
        return cols


class _RowError(Exception):
    def __init__(self, stage: str, column: str, reason: str):
        super().__init__(reason)
        self.stage, self.column, self.reason = stage, column, reason


class Preprocessor:
    """Callable class for ``map_batches(Preprocessor, fn_constructor_args=(spec, tokenizer_files))``.

    Args:
        spec: what to read and how to transform it.
        tokenizer_files: file name -> bytes of a saved tokenizer (as in a checkpoint's ``tokenizer/``);
            shipped by value so actors on any node rebuild it without shared storage.
    """

    def __init__(self, spec: PreprocessSpec, tokenizer_files: dict[str, bytes]):
        self.spec = spec
        self._tokenizer_dir = tempfile.mkdtemp(prefix="mmray-tok-")
        for name, data in tokenizer_files.items():
            Path(self._tokenizer_dir, name).write_bytes(data)
        self.tokenizer = load_tokenizer(self._tokenizer_dir)
        self.normalize_text = TextNormalizer(spec.text, spec.storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec, n = self.spec, len(batch[self.spec.id_column])
        size, length = spec.image.size, spec.text.max_length
        out: dict[str, Any] = {
            S.ID: np.empty(n, dtype=object),
            S.PIXELS: np.zeros((n, 3, size, size), dtype=np.uint8),
            S.mask_key(S.IMAGE): np.zeros(n, dtype=np.float32),
            S.mask_key(S.TEXT): np.zeros(n, dtype=np.float32),
            S.ERROR: np.full(n, "", dtype=object),
            S.ERROR_COLUMN: np.full(n, "", dtype=object),
            S.ERROR_STAGE: np.full(n, "", dtype=object),
        }
        labels = {t.name: [t.empty_target()] * n for t in spec.tasks} if spec.with_labels else {}
        texts: list[str] = [""] * n
        for i in range(n):
            try:
                out[S.ID][i] = self._row(batch, i, out, texts, labels)
            except _RowError as e:
                raw_id = batch[spec.id_column][i]
                out[S.ID][i] = None if raw_id is None else str(raw_id)
                out[S.ERROR][i], out[S.ERROR_COLUMN][i], out[S.ERROR_STAGE][i] = e.reason, e.column, e.stage
                out[S.mask_key(S.IMAGE)][i] = out[S.mask_key(S.TEXT)][i] = 0.0
        ids, attn = self._tokenize(texts, length)
        out[S.INPUT_IDS], out[S.ATTENTION_MASK] = ids, attn
        for t in spec.tasks if spec.with_labels else ():
            dtype = np.int64 if t.kind == "multiclass" else np.float32
            out[S.label_key(t.name)] = np.stack([np.asarray(v, dtype=dtype) for v in labels[t.name]])
        return out

    def _row(self, batch, i, out, texts, labels) -> str:
        spec = self.spec
        raw_id = batch[spec.id_column][i]
        if raw_id is None or (isinstance(raw_id, float) and np.isnan(raw_id)):
            raise _RowError("preprocess", spec.id_column, "null id")
        text = batch[spec.text_column][i]
        text = self.normalize_text(text) if isinstance(text, str) else ""
        pixels, image_column = self._image(batch, i)
        if not text and pixels is None:
            raise _RowError("preprocess", f"{spec.text_column},{image_column}", "both modalities missing")
        if spec.missing_modality == "quarantine":
            if not text:
                raise _RowError("preprocess", spec.text_column, "missing text")
            if pixels is None:
                raise _RowError("preprocess", image_column, "missing image")
        if spec.with_labels:
            for t in spec.tasks:
                try:
                    labels[t.name][i] = t.encode(_py(batch[t.name][i]))
                except LabelError as e:
                    raise _RowError("label", t.name, str(e)) from None
        if pixels is not None:
            out[S.PIXELS][i] = pixels
            out[S.mask_key(S.IMAGE)][i] = 1.0
        if text:
            texts[i] = text
            out[S.mask_key(S.TEXT)][i] = 1.0
        return str(raw_id)

    def _image(self, batch, i) -> tuple[np.ndarray | None, str]:
        spec = self.spec
        data, column = None, spec.image_column or spec.image_uri_column
        if spec.image_column is not None:
            data = batch[spec.image_column][i]
        if not data and spec.image_uri_column is not None:
            column = spec.image_uri_column
            uri = batch[spec.image_uri_column][i]
            if uri:
                data = self._fetch(uri, column)
        if not data:
            return None, column
        try:
            img = decode_image(bytes(data), spec.image.max_pixels)
        except ImageDecodeError as e:
            raise _RowError("preprocess", column, str(e)) from None
        return resize_uint8(img, spec.image.size), column

    def _fetch(self, uri: str, column: str, attempts: int = 3) -> bytes:
        from mmray.data import storage as st

        for attempt in range(attempts):
            try:
                return st.read_bytes(uri, self.spec.storage)
            except FileNotFoundError:
                raise _RowError("preprocess", column, f"image not found: {uri}") from None
            except OSError as e:
                if "not found" in str(e).lower() or "nosuchkey" in str(e).lower().replace(" ", ""):
                    raise _RowError("preprocess", column, f"image not found: {uri}") from None
                if attempt == attempts - 1:
                    raise _RowError("preprocess", column, f"image fetch failed: {str(e)[:120]}") from None
                time.sleep(0.2 * 2**attempt)  # transient S3 errors: back off and retry
        raise AssertionError("unreachable")

    def _tokenize(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=length, return_tensors="np"
        )
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _py(v: Any) -> Any:
    """numpy scalars / arrays from Ray batches -> plain Python values for label encoding."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def keep_good(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows without an error, bookkeeping columns dropped (ready for ``iter_torch_batches``)."""
    good = batch[S.ERROR] == ""
    drop = (S.ERROR, S.ERROR_COLUMN, S.ERROR_STAGE)
    return {k: v[good] for k, v in batch.items() if k not in drop}


def keep_errors(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows with an error, as quarantine records (``id, stage, column, error``)."""
    bad = batch[S.ERROR] != ""
    return quarantine_rows(batch[S.ID][bad], batch[S.ERROR_STAGE][bad], batch[S.ERROR_COLUMN][bad],
                           batch[S.ERROR][bad])  # fmt: skip


def quarantine_rows(ids, stages, columns, errors) -> dict[str, np.ndarray]:
    return {
        "id": np.asarray(ids, dtype=object),
        "stage": np.asarray(stages, dtype=object),
        "column": np.asarray(columns, dtype=object),
        "error": np.asarray(errors, dtype=object),
    }
