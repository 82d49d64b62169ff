"""Synthetic text-image dataset where the label needs BOTH modalities.

Generating rule (``make_dataset``):
    * The text names an animal, ``cat`` or ``dog``, in English or Chinese (猫/小猫, 狗/小狗, ...), inside
      varied templates with distractor words and the odd emoji. Half the rows are Chinese or mixed.
    * The image shows a shape (circle, square or triangle: uninformative) whose colour is ``red`` or
      ``blue`` (with random shade), on a noisy grey background; sizes vary (20-72 px), encoded as PNG or
      JPEG at random.
    * label = f"{animal}_{colour}": 4 balanced classes. The text alone decides the animal and the image
      alone decides the colour, so a text-only or image-only model is capped at 50% accuracy (chance
      25%), while a model that fuses both can reach ~100%.

Splits: ``train/`` (70%), ``val/`` (15%), ``test/`` (15%), each written as Parquet with columns
``id`` (string), ``text`` (string), ``image`` (binary), ``label`` (string).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

__all__ = ["LABELS", "make_dataset", "make_image", "make_rows", "make_text"]

ANIMALS = {
    "cat": ["cat", "kitten", "kitty", "猫", "小猫", "猫咪"],
    "dog": ["dog", "puppy", "hound", "狗", "小狗", "狗狗"],
}
COLOURS = {"red": (200, 30, 30), "blue": (30, 60, 200)}
LABELS = tuple(f"{a}_{c}" for a in ANIMALS for c in COLOURS)

_EN = [
    "a photo of my {a} at the {p}",
    "look at this {a} sitting near the {p}",
    "the {a} slept all afternoon by the {p}",
    "our neighbour's {a} visited the {p} today",
]
_ZH = [
    "这是我家的{a}，在{p}旁边",
    "今天{a}在{p}玩了一整天",
    "看看这只{a}，它很可爱",
    "{a}在{p}睡觉了",
]
_PLACES_EN = ["garden", "window", "sofa", "park", "kitchen", "door"]
_PLACES_ZH = ["花园", "窗户", "沙发", "公园", "厨房", "门口"]
_EMOJI = ["", "", "", " 😊", " 🐾", " ❤️"]


def make_text(animal: str, rng: np.random.Generator) -> str:
    word = ANIMALS[animal][rng.integers(len(ANIMALS[animal]))]
    if rng.random() < 0.5:
        text = _ZH[rng.integers(len(_ZH))].format(a=word, p=_PLACES_ZH[rng.integers(len(_PLACES_ZH))])
    else:
        text = _EN[rng.integers(len(_EN))].format(a=word, p=_PLACES_EN[rng.integers(len(_PLACES_EN))])
    return text + _EMOJI[rng.integers(len(_EMOJI))]


def make_image(colour: str, rng: np.random.Generator) -> bytes:
    w, h = (int(x) for x in rng.integers(20, 73, size=2))
    grey = int(rng.integers(90, 170))
    noise = rng.normal(0, 12, size=(h, w, 3))
    img = Image.fromarray(np.clip(grey + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    shade = np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, size=3), 0, 255)
    fill = tuple(int(v) for v in shade)
    cx, cy, r = w / 2 + rng.uniform(-w / 8, w / 8), h / 2 + rng.uniform(-h / 8, h / 8), min(w, h) * 0.35
    shape = rng.integers(3)
    if shape == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == 1:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    buf = io.BytesIO()
    if rng.random() < 0.5:
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    return buf.getvalue()


def make_rows(n: int, seed: int, id_prefix: str = "r") -> dict[str, list]:
    """Generates ``n`` rows (columns id, text, image, label) deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"id": [], "text": [], "image": [], "label": []}
    animals, colours = list(ANIMALS), list(COLOURS)
    for i in range(n):
        animal, colour = animals[i % 2], colours[(i // 2) % 2]  # exactly balanced classes
        rows["id"].append(f"{id_prefix}{i:07d}")
        rows["text"].append(make_text(animal, rng))
        rows["image"].append(make_image(colour, rng))
        rows["label"].append(f"{animal}_{colour}")
    order = rng.permutation(n)
    return {k: [v[j] for j in order] for k, v in rows.items()}


SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.binary()), ("label", pa.string())])


def make_dataset(out_dir: str | os.PathLike, rows: int = 2000, seed: int = 0, files_per_split: int = 2) -> dict:
    """Writes ``train/``, ``val/`` and ``test/`` Parquet folders under ``out_dir``.

    Returns:
        split name -> {"path": folder, "rows": count}.
    """
    data = make_rows(rows, seed)
    n_train, n_val = int(rows * 0.7), int(rows * 0.15)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, rows)}
    out = {}
    for split, (lo, hi) in bounds.items():
        folder = Path(out_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.table({k: v[lo:hi] for k, v in data.items()}, schema=SCHEMA)
        chunks = np.array_split(np.arange(table.num_rows), files_per_split)
        for j, idx in enumerate(chunks):
            if len(idx):
                pq.write_table(table.slice(int(idx[0]), len(idx)), folder / f"part-{j:05d}.parquet")
        out[split] = {"path": str(folder), "rows": table.num_rows}
    return out
