"""Retrieval metrics (``mmray ablate --retrieval``): text->image and image->text Recall@1/5/10 of an
aligned checkpoint (``model.align``) over a split.

Each row's aligned unit vectors come from the checkpoint's own forward pass (``"aligned"``), read,
preprocessed and quarantined as scoring does (``open_checkpoint``, the same pools as ``mmray
evaluate``); the driver keeps only the vectors of the rows that count (100k rows x 2 x 64 floats: 51 MB)
and computes the exact recalls blockwise (``mmray.retrieval``). A row counts when it has both modalities
and, where the split has the label ``model.align.pairs`` names (the command line's, else the
checkpoint's), when that label says its caption describes its image. With ``same_caption`` every image
of a caption that tokenizes alike is correct for it (generated data repeats captions). A checkpoint
without alignment has no joint space to search, and is refused before any work.

Example:
    mmray ablate --retrieval --checkpoint runs/<name>/checkpoint_... --input work/data/test
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmray.checkpoint import open_checkpoint
from mmray.config import Config, StorageConfig
from mmray.data import pipeline, storage
from mmray.data.labels import Task, pair_class
from mmray.data.schema import ERROR, ERROR_COLUMN, ERROR_STAGE, ID, IMAGE, INPUT_IDS, QUARANTINE_SCHEMA, TEXT, label_key
from mmray.retrieval import retrieval_recalls
from mmray.runtime import actor_device
from mmray.score.predictor import model_inputs

__all__ = ["AlignedVectors", "PairLabel", "pair_label", "run_retrieval"]

_MAX_QUARANTINE_SAMPLES = 20
COUNTED = "_counted"  # the row is a caption-image pair that retrieval scores
KEY = "_key"  # 64 bits of a hash of the row's token ids: one caption, one key (a collision: 2^-64 a pair)


@dataclasses.dataclass(frozen=True)
class PairLabel:
    """The label that makes a row a true pair: ``task``'s target is class ``index``."""

    task: Task
    index: int

    def rows(self, targets: np.ndarray) -> np.ndarray:
        return targets[:, self.index] > 0.5 if self.task.kind == "multilabel" else targets.astype(int) == self.index


def pair_label(spec: str, tasks: tuple[Task, ...]) -> PairLabel | None:
    """``model.align.pairs`` ("all": None, or "TASK=VALUE") against the checkpoint's label maps.

    Raises:
        ValueError: an unknown task or label, naming the key.
    """
    found = pair_class(spec, tasks)
    return None if found is None else PairLabel(*found)


class AlignedVectors:
    """Callable class for ``map_batches``: each row's aligned text and image vectors (zeros where it
    does not count), whether it counts (``COUNTED``), its caption key (``KEY``) and its bookkeeping.

    Args:
        checkpoint_uri: local or ``s3://`` checkpoint; each actor fetches its own copy.
        store: S3 endpoint/region.
        device: ``"cpu"`` or ``"cuda"``.
        pairs: the label that makes a row a true pair (its column preprocessed), or None: every row.
    """

    def __init__(self, checkpoint_uri: str, store: StorageConfig, device: str = "cpu", pairs: PairLabel | None = None):
        self.device, self.pairs = torch.device(device), pairs
        with open_checkpoint(checkpoint_uri, store) as checkpoint:
            self.model = checkpoint.load_model(device)
        self.dim = self.model.align.proj[TEXT].out_features

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[ID])
        out = {k: np.asarray(batch[k]) for k in (ID, ERROR, ERROR_COLUMN, ERROR_STAGE)}
        out.update({m: np.zeros((n, self.dim), np.float32) for m in (TEXT, IMAGE)})
        out[COUNTED], out[KEY] = np.zeros(n, bool), np.zeros(n, np.int64)
        good = np.flatnonzero(out[ERROR] == "")
        if not len(good):
            return out
        result = self.model(model_inputs(batch, good, self.device))
        counted = np.ones(len(good), bool)
        for m in (TEXT, IMAGE):
            out[m][good] = result["aligned"][m].float().cpu().numpy()
            counted &= result["masks"][m].cpu().numpy() > 0
        if self.pairs is not None:
            counted &= self.pairs.rows(np.asarray(batch[label_key(self.pairs.task.name)])[good])
        out[COUNTED][good] = counted & np.isfinite(out[TEXT][good]).all(1) & np.isfinite(out[IMAGE][good]).all(1)
        out[KEY][good] = [_key(ids) for ids in np.asarray(batch[INPUT_IDS])[good]]
        return out


def _key(token_ids: np.ndarray) -> int:
    digest = hashlib.blake2b(token_ids.astype(np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def run_retrieval(
    cfg: Config, checkpoint: str, input_uri: str, same_caption: bool = False, key_column: str | None = None
) -> dict[str, Any]:
    """Recall@1/5/10 of ``checkpoint`` on the Parquet at ``input_uri`` (text, image; the pairs label if
    the split has it); Ray must be initialised, but a checkpoint without alignment is refused first.

    Which images are correct for a caption: its own; with ``same_caption`` every image of an identical
    caption; with ``key_column`` every image whose row has the same value in that column (e.g. the
    attributes an image shows, whatever words or language its caption uses). Rows are matched to the
    column by id (ids that repeat take one of their values).

    Returns:
        ``{"checkpoint", "input", "rows_in", "rows_quarantined", "retrieval": {"text_to_image":
        {"R@1", "R@5", "R@10"}, "image_to_text": {...}, "rows", "pairs", "same_caption"}, "quarantine":
        [up to 20 records], "quarantine_reasons"}``.

    Raises:
        ValueError: no alignment in the checkpoint, a pairs label it does not know, or no row to score.
    """
    with open_checkpoint(checkpoint, cfg.storage) as opened:
        info, tokenizer_files = opened.info, opened.tokenizer_files()
    if info.model.align.weight <= 0:
        raise ValueError(
            f"{storage.redact(checkpoint)} has no image-text alignment (model.align.weight = 0): "
            "it has no joint space to retrieve in"
        )
    pairs_spec = cfg.model.align.pairs if cfg.model.align.pairs != "all" else info.model.align.pairs
    pairs = pair_label(pairs_spec, info.tasks)
    spec = info.preprocess_spec(with_labels=False, storage=cfg.storage, image_uri_roots=cfg.data.image_uri_roots)
    files = pipeline.input_files(input_uri, spec.input_columns(), cfg.storage)
    if same_caption and key_column:
        raise ValueError("retrieval: --same-caption and --key-column each say which images are correct: give one")
    if key_column and not _has_column(input_uri, files[0], key_column, cfg.storage):
        raise ValueError(f"--key-column: {storage.redact(input_uri)} has no column {key_column!r}")
    if pairs is not None and _has_column(input_uri, files[0], pairs.task.name, cfg.storage):
        spec = dataclasses.replace(spec, tasks=(pairs.task,), with_labels=True)
        files = pipeline.input_files(input_uri, spec.input_columns(), cfg.storage)
    else:
        pairs, pairs_spec = None, "all"
    sc = cfg.score
    source = pipeline.read_input(input_uri, files, cfg.storage, list(spec.input_columns()))
    preprocessed = pipeline.preprocess(source, spec, tokenizer_files, cfg.data.preprocess)
    args = (checkpoint, cfg.storage, actor_device(sc.num_gpus), pairs)
    vectors = pipeline.map_with_actors(
        preprocessed, AlignedVectors, args, sc.batch_size, sc.concurrency, sc.num_cpus, sc.num_gpus
    )
    gathered, quarantine, rows_in = {TEXT: [], IMAGE: [], KEY: [], ID: []}, [], 0
    for batch in vectors.iter_batches(batch_format="numpy", batch_size=None):
        rows_in += len(batch[ID])
        quarantine.append(pipeline.quarantine_records(batch))
        for k in gathered:
            gathered[k].append(np.array(batch[k][batch[COUNTED]]))
    text, image, keys = (torch.from_numpy(np.concatenate(gathered[k])) for k in (TEXT, IMAGE, KEY))
    if key_column:
        keys = _column_keys(input_uri, files, key_column, np.concatenate(gathered[ID]), cfg.storage)
    if not len(keys):
        raise ValueError(
            f"retrieval: no row of {storage.redact(input_uri)} has both text and image"
            + (f" and {pairs_spec}" if pairs is not None else "")
        )
    records = pa.concat_tables(quarantine) if quarantine else QUARANTINE_SCHEMA.empty_table()
    reasons = pipeline.ranked_reasons(records)
    return {
        "checkpoint": storage.redact(checkpoint),
        "input": storage.redact(input_uri),
        "rows_in": rows_in,
        "rows_quarantined": records.num_rows,
        "retrieval": {
            **retrieval_recalls(text, image, keys if same_caption or key_column else None),
            "rows": len(keys),
            "pairs": pairs_spec,
            "same_caption": same_caption,
            "key_column": key_column,
        },
        "quarantine": records.slice(0, _MAX_QUARANTINE_SAMPLES).to_pylist(),
        "quarantine_reasons": {f"{column}: {reason}": n for (column, reason), n in reasons},
    }


def _column_keys(uri: str, files: list[str], column: str, ids: np.ndarray, store: StorageConfig) -> torch.Tensor:
    """One int64 key per row of ``ids``: equal values of ``column`` in the input, equal keys."""
    fs, _ = storage.resolve(uri, store)
    values: dict[str, str] = {}
    for path in files:
        table = pq.read_table(path, filesystem=fs, columns=[ID, column])
        values.update(zip(map(str, table[ID].to_pylist()), map(str, table[column].to_pylist())))
    codes: dict[str, int] = {}
    return torch.tensor([codes.setdefault(values[str(i)], len(codes)) for i in ids], dtype=torch.int64)


def _has_column(uri: str, path: str, column: str, store: StorageConfig) -> bool:
    """Whether the input's first file has ``column`` (``input_files`` then checks every file for it)."""
    fs, _ = storage.resolve(uri, store)
    return column in pq.read_schema(path, filesystem=fs).names
