"""A generated bad-input corpus: good synthetic rows plus one row of every broken kind.

Each broken row has an id that says what is wrong with it, and ``EXPECTED`` says how it must come out:
quarantined with (stage, column, reason prefix), or kept with a modality mask. Tests assert on these.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmray.data.synthetic import make_rows

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("image", pa.binary()),
        ("image_uri", pa.string()),
        ("label", pa.string()),
    ]
)

# id -> (stage, column, reason prefix) for rows that must be quarantined.
QUARANTINED = {
    "bad-undecodable": ("preprocess", "image", "unknown or unsupported image format"),
    "bad-truncated": ("preprocess", "image", "truncated image"),
    "bad-bomb": ("preprocess", "image", "decompression bomb"),
    "bad-uri-missing": ("preprocess", "image_uri", "image not found"),
    "bad-uri-relative": ("preprocess", "image_uri", "relative image path"),
    "bad-both-missing": ("preprocess", "text,image_uri", "both modalities missing"),
    "bad-null-label": ("label", "label", "null label"),
}
NULL_ID = (None, "preprocess", "id", "null id")  # quarantined with a null id
UNKNOWN_LABEL = ("bad-unknown-label", "label", "label", "label 'unicorn' in column 'label' is not in the label map")
# Rows kept with one modality masked out: id -> (text present, image present).
KEPT_PARTIAL = {
    "ok-no-text": (0.0, 1.0),
    "ok-blank-text": (0.0, 1.0),
    "ok-no-image": (1.0, 0.0),
    "ok-by-uri": (1.0, 1.0),
}


def png_bomb(side: int = 12_000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels in a few KB (header-checked, never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"\x00" * (side * ((side + 7) // 8 + 1))  # filter byte + packed bits, every row
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def encoded(colour: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def make_corpus(
    folder: Path, good: int, seed: int, with_labels: bool = True, unknown_label: bool = False, files: int = 2
) -> dict:
    """Writes good synthetic rows plus every broken kind as Parquet under ``folder``.

    Returns:
        {"path": folder, "rows": total rows, "bad": number of rows that must be quarantined,
         "good_ids": ids that must be used}
    """
    folder.mkdir(parents=True, exist_ok=True)
    images = folder.parent / f"{folder.name}-images"
    images.mkdir(exist_ok=True)
    rows = make_rows(good, seed, id_prefix=f"{folder.name}-")
    rows["image_uri"] = [None] * good
    blue = encoded((30, 60, 200))
    by_uri = images / "by-uri.png"
    by_uri.write_bytes(blue)
    jpeg = encoded((200, 30, 30), "JPEG", (64, 64))
    broken = [
        # id, text, image, image_uri, label
        ("bad-undecodable", "a photo of my cat", b"this is not an image", None, "cat_red"),
        ("bad-truncated", "a photo of my dog", jpeg[: len(jpeg) // 2], None, "dog_red"),
        ("bad-bomb", "a photo of my cat", png_bomb(), None, "cat_red"),
        ("bad-uri-missing", "a photo of my dog", None, str(images / "does-not-exist.png"), "dog_blue"),
        ("bad-uri-relative", "a photo of my dog", None, "images/relative.png", "dog_blue"),
        ("bad-both-missing", None, None, None, "cat_blue"),
        (None, "a photo of my cat", blue, None, "cat_blue"),
        ("ok-no-text", None, blue, None, "cat_blue"),
        ("ok-blank-text", " \t\u200b ", blue, None, "dog_blue"),
        ("ok-no-image", "a photo of my dog", None, None, "dog_red"),
        ("ok-by-uri", "小狗在公园 🐾", None, str(by_uri), "dog_blue"),
    ]
    if with_labels:
        broken.append(("bad-null-label", "a photo of my cat", blue, None, None))
    if unknown_label:
        broken.append((UNKNOWN_LABEL[0], "a photo of my cat", blue, None, "unicorn"))
    for row in broken:
        for key, value in zip(("id", "text", "image", "image_uri", "label"), row):
            rows[key].append(value)
    order = np.random.default_rng(seed).permutation(len(rows["id"]))
    table = pa.table({k: [rows[k][i] for i in order] for k in SCHEMA.names}, schema=SCHEMA)
    if not with_labels:
        table = table.drop_columns(["label"])
    for j, idx in enumerate(np.array_split(np.arange(table.num_rows), files)):
        pq.write_table(table.take(idx), folder / f"part-{j:05d}.parquet")
    bad = len(QUARANTINED) - (0 if with_labels else 1) + 1 + int(unknown_label)  # + the null id row
    good_ids = [i for i in table.column("id").to_pylist() if i is not None and not i.startswith("bad-")]
    return {"path": str(folder), "rows": table.num_rows, "bad": bad, "good_ids": good_ids}
