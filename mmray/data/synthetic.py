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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

__all__ = [
    "LABELS",
    "SCHEMA",
    "encode_png_or_jpeg",
    "make_dataset",
    "make_image",
    "make_imbalanced_rows",
    "make_multitask_rows",
    "make_rows",
    "make_text",
    "write_splits",
]

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
    return encode_png_or_jpeg(img, rng, min_quality=70)


def encode_png_or_jpeg(img: Image.Image, rng: np.random.Generator, min_quality: int) -> bytes:
    """PNG or JPEG (quality ``min_quality``-95), each half of the time: both codecs in every dataset."""
    buf = io.BytesIO()
    if rng.random() < 0.5:
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=int(rng.integers(min_quality, 96)))
    return buf.getvalue()


def make_rows(n: int, seed: int, id_prefix: str = "r") -> dict[str, list]:
    """Generates ``n`` rows (columns id, text, image, label) deterministically from ``seed``."""
    return _rows(n, seed, id_prefix, make_text)


def _rows(n: int, seed: int, id_prefix: str, text: Callable[[str, np.random.Generator], str]) -> dict[str, list]:
    """Balanced, shuffled rows whose text names the animal (``text(animal, rng)``) and image shows the colour."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"id": [], "text": [], "image": [], "label": []}
    animals, colours = list(ANIMALS), list(COLOURS)
    for i in range(n):
        animal, colour = animals[i % 2], colours[(i // 2) % 2]  # exactly balanced classes
        rows["id"].append(f"{id_prefix}{i:07d}")
        rows["text"].append(text(animal, rng))
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
    return write_splits(make_rows(rows, seed), out_dir, files_per_split, SCHEMA)


# --------------------------------------------------------------------------------------------------
# Variants for model tests: an imbalanced (one modality much easier) and a multi-task dataset.
# --------------------------------------------------------------------------------------------------

_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "zo", "pa", "ne", "vi", "su", "do", "fe", "gu", "ha", "ji", "wo"]


def _pseudo_words(count: int, seed: int) -> list[str]:
    """``count`` distinct made-up three-syllable words (rare tokens a tokenizer cannot know)."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < count:
        w = "".join(_SYLLABLES[j] for j in rng.integers(len(_SYLLABLES), size=3))
        if w not in words:
            words.append(w)
    return words


def make_imbalanced_rows(
    n: int, seed: int, id_prefix: str = "h", synonyms: int = 16, filler_words: int = 8
) -> dict[str, list]:
    """Like ``make_rows`` (label = animal_colour, text decides the animal, image the colour), but the
    text is much harder to learn than the image: the animal is named by one of ``synonyms`` made-up
    words per class, hidden among ``filler_words`` made-up filler words, while the image colour is
    learned in a few steps. Each modality still carries half of the label, so a model that leans on
    the image alone is capped at 50% accuracy.
    """
    vocab = _pseudo_words(2 * synonyms + 200, seed=12345)  # fixed: every split shares the vocabulary
    names = {"cat": vocab[:synonyms], "dog": vocab[synonyms : 2 * synonyms]}
    filler = vocab[2 * synonyms :]

    def text(animal: str, rng: np.random.Generator) -> str:
        words = [filler[j] for j in rng.integers(len(filler), size=filler_words)]
        words.insert(int(rng.integers(len(words) + 1)), names[animal][rng.integers(synonyms)])
        return " ".join(words)

    return _rows(n, seed, id_prefix, text)


def make_multitask_rows(n: int, seed: int, id_prefix: str = "m") -> dict[str, list]:
    """``make_rows`` plus ``tags``, a multilabel column: the text's script (``en``/``zh``) and the
    image's colour, so the two tasks (``label`` multiclass, ``tags`` multilabel) share both modalities."""
    rows = make_rows(n, seed, id_prefix)
    rows["tags"] = [
        ["zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en", label.split("_")[1]]
        for text, label in zip(rows["text"], rows["label"])
    ]
    return rows


def write_splits(
    data: dict[str, list], out_dir: str | os.PathLike, files_per_split: int = 2, schema: pa.Schema | None = None
) -> dict:
    """Writes rows (column -> values, already shuffled) as 70/15/15 ``train/``, ``val/``, ``test/`` Parquet.

    Returns:
        split name -> {"path": folder, "rows": count}.
    """
    rows = len(data["id"])
    n_train, n_val = int(rows * 0.7), int(rows * 0.15)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, rows)}
    table = pa.table(data, schema=schema)
    out = {}
    for split, (lo, hi) in bounds.items():
        folder = Path(out_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        part = table.slice(lo, hi - lo)
        for j, idx in enumerate(np.array_split(np.arange(part.num_rows), files_per_split)):
            if len(idx):
                pq.write_table(part.slice(int(idx[0]), len(idx)), folder / f"part-{j:05d}.parquet")
        out[split] = {"path": str(folder), "rows": part.num_rows}
    return out
