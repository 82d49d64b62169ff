"""Scoring fixtures: tiny checkpoints built without Ray (unit tests), one trained checkpoint per session
(integration tests), and Parquet inputs with a chosen number of bad rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmray.checkpoint import CheckpointInfo, save_checkpoint
from mmray.config import (
    AlignConfig,
    DataConfig,
    ImageConfig,
    ImageEncoderConfig,
    ModelConfig,
    StorageConfig,
    TextConfig,
    TextEncoderConfig,
)
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.data.synthetic import SCHEMA, make_rows
from mmray.data.text import train_wordpiece
from mmray.models.builder import build_model
from tests.helpers import REPO

CLASSES = ("cat_blue", "cat_red", "dog_blue", "dog_red")
TASK = Task("label", "multiclass", CLASSES)


def make_checkpoint(
    directory: Path, tasks: list[Task], seed: int = 0, align: AlignConfig | None = None, **data: object
) -> Path:
    """A real, loadable checkpoint of an untrained tiny model (deterministic weights); ``align``: its
    image-text alignment (default none); ``data``: more ``DataConfig`` fields (e.g. ``image_uri_column``)."""
    text, image = TextConfig(max_length=16), ImageConfig(size=16)
    model_cfg = ModelConfig(
        hidden_dim=16,
        text_encoder=TextEncoderConfig(dim=16, heads=2),
        image_encoder=ImageEncoderConfig(dim=16),
        align=align or AlignConfig(),
    )
    tok_dir = directory / "_tok"
    train_wordpiece(make_rows(60, seed=1)["text"], vocab_size=200, out_dir=tok_dir)
    tokenizer_files = {p.name: p.read_bytes() for p in tok_dir.iterdir() if p.is_file()}
    torch.manual_seed(seed)
    model = build_model(model_cfg, text, image, tasks, vocab_size=200)
    spec = PreprocessSpec.from_config(DataConfig(text=text, image=image, **data), StorageConfig(), tasks=tasks)
    ckpt = directory / "ckpt"
    save_checkpoint(ckpt, model, CheckpointInfo(model_cfg, spec.to_dict(), tuple(tasks), 200, 0, {}), tokenizer_files)
    return ckpt


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), [TASK])


def write_input(folder: Path, rows: int, seed: int, prefix: str, bad: int = 0, files: int = 2) -> dict:
    """Writes synthetic rows as Parquet; the first ``bad`` rows get undecodable images and no text.

    Returns:
        {"path", "ids" (all ids), "bad_ids"}.
    """
    data = make_rows(rows, seed, id_prefix=prefix)
    for i in range(bad):
        data["image"][i], data["text"][i] = b"not an image", None
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(data, schema=SCHEMA)
    for j, idx in enumerate(np.array_split(np.arange(rows), files)):
        pq.write_table(table.slice(int(idx[0]), len(idx)), folder / f"part-{j:05d}.parquet")
    return {"path": str(folder), "ids": list(data["id"]), "bad_ids": list(data["id"][:bad])}


@pytest.fixture(scope="session")
def trained(ray_session, tmp_path_factory) -> dict:
    """One checkpoint trained by the real launcher (1 worker, 1 epoch), shared by the integration tests.

    Returns:
        {"checkpoint", "storage_path" (holds latest.json), "config" (overrides that reproduce it)}.
    """
    from mmray.config import load_config
    from mmray.data.synthetic import make_dataset
    from mmray.train.launcher import run_training

    root = tmp_path_factory.mktemp("trained")
    splits = make_dataset(root / "data", rows=160, seed=5)
    overrides = [
        f"data.train={splits['train']['path']}",
        f"data.val={splits['val']['path']}",
        f"train.storage_path={root / 'runs'}",
        "train.epochs=1",
        "train.num_workers=1",
    ]
    result = run_training(load_config(REPO / "configs" / "demo.yaml", overrides))
    return {"checkpoint": result["checkpoint"], "storage_path": str(root / "runs")}
