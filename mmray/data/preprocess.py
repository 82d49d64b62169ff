"""Preprocessing actors: raw Parquet rows -> token ids, uint8 pixels, modality masks, encoded labels.

``Preprocessor`` is a class-based ``map_batches`` UDF: it loads the tokenizer once per actor and then
maps batches. A row it cannot use is not dropped and does not crash the job: it comes out with a
non-empty ``_error`` (and the column and stage), which ``pipeline.quarantine_records`` turns into a
quarantine record.
Image URIs are fetched concurrently per batch, with retries on transient storage errors.

It never imports torch or transformers (``TokenEncoder`` runs the tokenizer's Rust backend, Pillow
resizes): a fresh actor process maps its first batch after 0.5 s with an 81 MB peak RSS, against
7.2 s and 773 MB when it imports them (``bench/bench_preprocess.py``).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mmray.config import DataConfig, ImageConfig, StorageConfig, TextConfig
from mmray.data import storage
from mmray.data.image import ImageDecodeError, decode_image, resize_uint8
from mmray.data.labels import LabelError, Task, task_from_dict
from mmray.data.schema import (
    ATTENTION_MASK,
    ERROR,
    ERROR_COLUMN,
    ERROR_STAGE,
    ID,
    IMAGE,
    INPUT_IDS,
    PIXELS,
    POS_IDS,
    TEXT,
    label_key,
    mask_key,
)
from mmray.data.text.dictionaries import load_stopwords, load_user_dict
from mmray.data.text.encoder import TokenEncoder
from mmray.data.text.normalize import TextNormalizer, TextTooLarge, bounded_text
from mmray.data.text.pos import PosTagger, check_pos_model
from mmray.data.text.segment import shared_segmenter

__all__ = ["PreprocessSpec", "Preprocessor", "keep_good"]


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
    # data.text.stopwords resolved to its words, so a checkpoint never depends on the stopword file.
    stopword_list: tuple[str, ...] | None = None
    # data.text.user_dict resolved to its lines, for the same reason: jieba cuts alike at scoring.
    user_dict_lines: tuple[str, ...] | None = None
    # Deployment details, never persisted (scoring passes its own): where S3 is, and the local
    # directories image URIs may be read from (None or empty: no local path is read).
    storage: StorageConfig = field(default_factory=StorageConfig)
    image_uri_roots: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, data: DataConfig, storage: StorageConfig, tasks, with_labels: bool = True):
        if data.text.pos_tags:
            check_pos_model(data.text.pos_model)  # on the driver, before any actor starts
        return cls(
            tasks=tuple(tasks),
            with_labels=with_labels,
            id_column=data.id_column,
            text_column=data.text_column,
            image_column=data.image_column,
            image_uri_column=data.image_uri_column,
            missing_modality=data.missing_modality,
            text=data.text,
            image=data.image,
            stopword_list=load_stopwords(data.text.stopwords, storage),
            user_dict_lines=load_user_dict(data.text.user_dict, storage),
            storage=storage,
            image_uri_roots=tuple(data.image_uri_roots) if data.image_uri_roots else None,
        )

    def to_dict(self) -> dict:
        """The settings a checkpoint persists; ``from_dict(d, tasks=...)`` restores the spec.

        Left out: the tasks (a checkpoint stores them beside these, with their label maps), and what
        each reader decides for itself: ``with_labels`` and the deployment details (never credentials).
        """
        d = asdict(self)
        for reader_owned in ("tasks", "with_labels", "storage", "image_uri_roots"):
            d.pop(reader_owned)
        return d

    @classmethod
    def from_dict(cls, d: dict, **overrides: Any) -> PreprocessSpec:
        d = {**d, **overrides}
        d["tasks"] = tuple(t if isinstance(t, Task) else task_from_dict(t) for t in d.get("tasks", ()))
        d["text"] = TextConfig(**d["text"]) if isinstance(d.get("text"), dict) else d.get("text", TextConfig())
        img = d.get("image", {})
        if isinstance(img, dict):
            img = ImageConfig(**{**img, "mean": tuple(img["mean"]), "std": tuple(img["std"])})
        d["image"] = img
        for key in ("stopword_list", "user_dict_lines"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        if d.get("image_uri_roots") is not None:
            d["image_uri_roots"] = tuple(d["image_uri_roots"])
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
        # Every quarantine reason passes here: redacted (URIs, labels and exceptions may carry user-info),
        # then cut, never the other way round (a cut could separate a secret from its "@").
        self.stage, self.column, self.reason = stage, column, storage.redact(reason)[:_MAX_REASON]


_MAX_REASON = 240  # quarantine reasons are short: the id says which row, the reason what went wrong


class Preprocessor:
    """Callable class for ``map_batches(Preprocessor, fn_constructor_args=(spec, tokenizer_files))``.

    Hostile input is bounded row by row: text is checked against ``data.text.max_bytes`` and cut to
    ``data.text.max_chars`` before normalising; image bytes against ``data.image.max_bytes`` before
    decoding; image URIs are read only from S3 or under ``spec.image_uri_roots`` (regular files, size
    checked before reading), each fetch within ``fetch_timeout_s``, at most ``fetch_threads`` in flight,
    and each image is decoded as its fetch completes, so an actor holds at most ``fetch_threads``
    encoded images and one decode at a time, never a whole batch's bytes.

    Args:
        spec: what to read and how to transform it.
        tokenizer_files: file name -> bytes of a saved tokenizer (as in a checkpoint's ``tokenizer/``);
            shipped by value so actors on any node rebuild it without shared storage.
        fetch_threads: concurrent image-URI reads (``data.preprocess.fetch_threads``).
        fetch_attempts: tries per image URI on transient errors (``data.preprocess.fetch_attempts``).
        fetch_timeout_s: one image URI's time, all attempts (``data.preprocess.fetch_timeout_s``).
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        tokenizer_files: dict[str, bytes],
        fetch_threads: int = 8,
        fetch_attempts: int = 3,
        fetch_timeout_s: float = 30.0,
    ):
        self.spec = spec
        self.tokenize = TokenEncoder(tokenizer_files, spec.text.max_length)
        text = spec.text
        # One jieba dictionary per actor, shared by segmentation and tagging; from the spec's lines, so
        # scoring cuts words as training did without the user dictionary's file.
        jieba = text.segmenter == "jieba" or text.pos_tags
        segmenter = shared_segmenter(tuple(spec.user_dict_lines or ())) if jieba else None
        self.normalize_text = TextNormalizer(text, spec.storage, stopwords=spec.stopword_list, segmenter=segmenter)
        self.tag = PosTagger(segmenter, text.pos_model) if text.pos_tags else None
        self.fetch_threads, self.fetch_attempts, self.fetch_timeout_s = fetch_threads, fetch_attempts, fetch_timeout_s
        self._pool = ThreadPoolExecutor(fetch_threads) if spec.image_uri_column else None
        # Resolved on this node: a symlinked root is compared with the resolved paths of the files.
        self._roots = tuple(os.path.realpath(r) for r in spec.image_uri_roots or ())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec, n = self.spec, len(batch[self.spec.id_column])
        size, length = spec.image.size, spec.text.max_length
        out: dict[str, Any] = {
            ID: np.empty(n, dtype=object),
            PIXELS: np.zeros((n, 3, size, size), dtype=np.uint8),
            mask_key(IMAGE): np.zeros(n, dtype=np.float32),
            mask_key(TEXT): np.zeros(n, dtype=np.float32),
            ERROR: np.full(n, "", dtype=object),
            ERROR_COLUMN: np.full(n, "", dtype=object),
            ERROR_STAGE: np.full(n, "", dtype=object),
        }
        labels = {t.name: [t.empty_target()] * n for t in spec.tasks} if spec.with_labels else {}
        texts: list[str] = [""] * n
        fetched = self._fetch_images(batch, n)
        for i in range(n):
            try:
                out[ID][i] = self._row(batch, i, out, texts, labels, fetched)
            except Exception as e:  # one bad row must never fail the batch (and with it the job)
                error = (
                    e
                    if isinstance(e, _RowError)
                    else _RowError("preprocess", "", f"unexpected error: {type(e).__name__}: {e}")
                )
                self._flag(out, i, _id_str(batch[spec.id_column][i]), error)
                texts[i] = ""
        ids, attn, pos, failed = self._tokenize(texts, length)
        for i, reason in failed.items():
            self._flag(out, i, out[ID][i], _RowError("tokenize", spec.text_column, reason))
        out[INPUT_IDS], out[ATTENTION_MASK] = ids, attn
        if pos is not None:
            out[POS_IDS] = pos
        for t in spec.tasks if spec.with_labels else ():
            dtype = np.int64 if t.kind == "multiclass" else np.float32
            out[label_key(t.name)] = np.stack([np.asarray(v, dtype=dtype) for v in labels[t.name]])
        return out

    @staticmethod
    def _flag(out: dict[str, Any], i: int, row_id: str | None, e: _RowError) -> None:
        out[ID][i] = row_id
        out[ERROR][i], out[ERROR_COLUMN][i], out[ERROR_STAGE][i] = e.reason or "error", e.column, e.stage
        out[mask_key(IMAGE)][i] = out[mask_key(TEXT)][i] = 0.0
        out[PIXELS][i] = 0

    def _row(self, batch, i, out, texts, labels, fetched) -> str:
        spec = self.spec
        row_id = _id_str(batch[spec.id_column][i])
        if row_id is None:
            raise _RowError("preprocess", spec.id_column, "null id")
        text = self._text(batch[spec.text_column][i])
        pixels, image_column = self._image(batch, i, fetched)
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
            out[PIXELS][i] = pixels
            out[mask_key(IMAGE)][i] = 1.0
        if text:
            texts[i] = text
            out[mask_key(TEXT)][i] = 1.0
        return row_id

    def _text(self, raw: Any) -> str:
        """The normalised text; a value above ``max_bytes`` is refused, a long one cut to ``max_chars``
        first (NFKC, stopwords and the tokenizer's pre-tokenizer all scale with the input)."""
        if not isinstance(raw, str):
            return ""
        try:
            return self.normalize_text(bounded_text(raw, self.spec.text))
        except TextTooLarge as e:
            raise _RowError("preprocess", self.spec.text_column, str(e)) from None

    def _image(self, batch, i, fetched: dict[int, np.ndarray | _RowError]) -> tuple[np.ndarray | None, str]:
        spec = self.spec
        data, column = None, spec.image_column or spec.image_uri_column
        if spec.image_column is not None:
            data = batch[spec.image_column][i]
        if _present(data):
            result = self._decode(data, column)
        elif spec.image_uri_column is not None:
            column, result = spec.image_uri_column, fetched.get(i)
        else:
            result = None
        if isinstance(result, _RowError):
            raise result
        return result, column

    def _decode(self, data: bytes, column: str) -> np.ndarray | _RowError:
        image = self.spec.image
        if len(data) > image.max_bytes:
            return _RowError(
                "preprocess", column, f"image is {len(data)} bytes, above data.image.max_bytes={image.max_bytes}"
            )
        try:
            img = decode_image(bytes(data), image.pixel_limit, min_side=image.size)
        except ImageDecodeError as e:
            return _RowError("preprocess", column, str(e))
        return resize_uint8(img, image.size)

    def _fetch_images(self, batch, n: int) -> dict[int, np.ndarray | _RowError]:
        """Reads and decodes every image URI this batch needs: ``fetch_threads`` reads in flight (S3
        latency, not bandwidth, dominates), each decoded on this thread as soon as it arrives.

        A fetch still running after ``fetch_timeout_s`` is quarantined and abandoned (a thread cannot be
        killed); the pool is replaced so that later fetches are not queued behind it.
        """
        spec = self.spec
        if self._pool is None:
            return {}
        todo = []
        for i in range(n):
            if spec.image_column is not None and _present(batch[spec.image_column][i]):
                continue  # bytes win over the URI
            uri = batch[spec.image_uri_column][i]
            if isinstance(uri, str) and uri.strip() and _id_str(batch[spec.id_column][i]) is not None:
                todo.append((i, uri.strip()))
        todo.reverse()  # pop() from the end: rows in order
        results: dict[int, np.ndarray | _RowError] = {}
        running: dict[Future, tuple[int, str, float]] = {}  # future -> (row, uri, deadline)
        while todo or running:
            while todo and len(running) < self.fetch_threads:
                i, uri = todo.pop()
                running[self._pool.submit(self._fetch, uri)] = (i, uri, time.monotonic() + self.fetch_timeout_s)
            wait_s = max(0.0, min(deadline for _, _, deadline in running.values()) - time.monotonic())
            done, _ = wait(running, timeout=wait_s, return_when=FIRST_COMPLETED)
            for future in done:
                i, uri, _ = running.pop(future)
                data = future.result()
                results[i] = data if isinstance(data, _RowError) else self._decode(data, spec.image_uri_column)
                del data  # the encoded bytes go as soon as they are decoded
            late = [f for f, (_, _, deadline) in running.items() if deadline <= time.monotonic()]
            for future in late:
                i, uri, _ = running.pop(future)
                results[i] = _RowError(
                    "preprocess", spec.image_uri_column, f"image fetch timed out after {self.fetch_timeout_s:g}s: {uri}"
                )
            if late:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = ThreadPoolExecutor(self.fetch_threads)
        return results

    def _fetch(self, uri: str) -> bytes | _RowError:
        column, limit = self.spec.image_uri_column, self.spec.image.max_bytes
        if "://" not in uri and not os.path.isabs(uri):
            # Relative to what? Actors run in their own working directory, on any node.
            return _RowError("preprocess", column, f"relative image path {uri!r}: use an absolute path or s3://")
        try:
            return storage.fetch_bytes(
                uri, self.spec.storage, attempts=self.fetch_attempts, max_bytes=limit, local_roots=self._roots
            )
        except storage.NotAllowedError as e:
            return _RowError("preprocess", column, f"image URI {e}: {uri}")
        except storage.InvalidURIError as e:  # permanent: never "image fetch failed", which is retried
            return _RowError("preprocess", column, f"invalid image URI: {e}")
        except FileNotFoundError:
            return _RowError("preprocess", column, f"image not found: {uri}")
        except storage.TooLargeError as e:
            return _RowError("preprocess", column, f"image above data.image.max_bytes={limit} ({e}): {uri}")
        except Exception as e:  # OSError, or anything else: this row's problem only
            return _RowError("preprocess", column, f"image fetch failed: {uri}: {e}")

    def _tokenize(self, texts: list[str], length: int):
        """Token ids, attention masks and POS ids (None without ``pos_tags``); rows the tagger or the
        tokenizer rejects come back in the last value."""
        try:
            ids, attn, pos = self._encode(texts)
            return ids, attn, pos, {}
        except Exception:  # find the culprit rows; the rest of the batch is fine
            ids = np.zeros((len(texts), length), dtype=np.int64)
            attn = np.zeros((len(texts), length), dtype=np.int64)
            pos = np.zeros((len(texts), length), dtype=np.int64) if self.tag is not None else None
            failed = {}
            for i, text in enumerate(texts):
                try:
                    (ids[i],), (attn[i],), row_pos = self._encode([text])
                    if pos is not None:
                        pos[i] = row_pos[0]
                except Exception as e:
                    failed[i] = f"tokenizer failed: {type(e).__name__}: {e}"
            return ids, attn, pos, failed

    def _encode(self, texts: list[str]):
        if self.tag is None:
            return *self.tokenize(texts), None
        return self.tokenize.encode(texts, [self.tag(t) if t else [] for t in texts])


def _present(data: Any) -> bool:
    return data is not None and len(data) > 0


def _id_str(raw: Any) -> str | None:
    """A row id as a string; None when null (or NaN, as pandas writes a missing number)."""
    if raw is None or (isinstance(raw, (float, np.floating)) and np.isnan(raw)):
        return None
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).decode("utf-8", "replace")
    raw = raw.item() if isinstance(raw, np.generic) else raw
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))  # an integer id column with nulls reaches numpy batches as float64
    return str(raw)


def _py(v: Any) -> Any:
    """numpy scalars / arrays from Ray batches -> plain Python values for label encoding."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def keep_good(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows without an error, bookkeeping columns dropped (ready for ``iter_torch_batches``)."""
    good = batch[ERROR] == ""
    drop = (ERROR, ERROR_COLUMN, ERROR_STAGE)
    return {k: v[good] for k, v in batch.items() if k not in drop}
