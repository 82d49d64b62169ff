"""Malicious inputs, generated (never binaries in git): each row attacks one bound of preprocessing.

``make_hostile(folder)`` writes ``folder/input/part-*.parquet`` (good synthetic rows plus one row per
attack), ``folder/images/`` (the only directory allowed for local image URIs: a FIFO, an escaping
symlink, a 1 GiB sparse file, a small float TIFF that decodes to 64 MB) and ``folder/private/``
(outside the roots). ``QUARANTINED`` says how each attack must come out; ``KEPT`` lists the hostile
rows that must be used all the same, bounded.

Run it by hand to look at the files: ``python -m tests.hostile.corpus /tmp/hostile``.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

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

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example key: two '/'
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SIDE = 4000  # 16 M pixels: just under the default data.image.max_pixels (4096^2)
BOMB_SIDE = 4200  # 17.6 M pixels: just over it
# A progressive JPEG of ~1 MB whose 1/8 draft (2000^2) passes max_pixels, while libjpeg would hold its
# full-size coefficients: 512 MB for one grey channel (it was accepted; its decode alone peaked at 0.5 GB).
JPEG_BOMB_SIDE = 16000
TEXT_LIMIT = 1 << 20  # data.text.max_bytes default
IMAGE_LIMIT = 32 << 20  # data.image.max_bytes default
NOT_ALLOWED = "image URI not allowed (local paths must be regular files under data.image_uri_roots): "

# id -> (stage, column, reason prefix); "{root}" is filled in with the folder.
QUARANTINED = {
    "h-text-2mib": ("preprocess", "text", f"text is {2 << 20} bytes, above data.text.max_bytes={TEXT_LIMIT}"),
    "h-etc-passwd": ("preprocess", "image_uri", f"{NOT_ALLOWED}/etc/passwd"),
    "h-file-scheme": ("preprocess", "image_uri", f"{NOT_ALLOWED}file:///etc/passwd"),
    "h-etc-absent": ("preprocess", "image_uri", f"{NOT_ALLOWED}/etc/no-such-file"),  # same as existing
    "h-dev-zero": ("preprocess", "image_uri", f"{NOT_ALLOWED}/dev/zero"),
    "h-proc-environ": ("preprocess", "image_uri", f"{NOT_ALLOWED}/proc/self/environ"),
    "h-fifo": ("preprocess", "image_uri", f"{NOT_ALLOWED}{{root}}/images/fifo.png"),
    "h-symlink-escape": ("preprocess", "image_uri", f"{NOT_ALLOWED}{{root}}/images/escape.png"),
    "h-dotdot": ("preprocess", "image_uri", f"{NOT_ALLOWED}{{root}}/images/../private/secret.png"),
    "h-sparse-1gib": ("preprocess", "image_uri", f"image above data.image.max_bytes={IMAGE_LIMIT} ({1 << 30} bytes"),
    "h-inline-32mib": ("preprocess", "image", f"image is {IMAGE_LIMIT + 1} bytes, above data.image.max_bytes="),
    "h-float-tiff-bomb": ("preprocess", "image", f"decompression bomb: {BOMB_SIDE}x{BOMB_SIDE} exceeds max_pixels="),
    "h-rgba-png-bomb": ("preprocess", "image", f"decompression bomb: {BOMB_SIDE}x{BOMB_SIDE} exceeds max_pixels="),
    "h-credentials-uri": ("preprocess", "image_uri", "invalid image URI: s3:// URIs must not embed credentials"),
    "h-progressive-jpeg-bomb": (
        "preprocess",
        "image",
        f"decompression bomb: progressive JPEG {JPEG_BOMB_SIDE}x{JPEG_BOMB_SIDE} exceeds max_pixels=",
    ),
}
# Attacks on the label column: quarantined where labels are read (training), scored where not.
LABEL_ATTACKS = {
    "h-credentials-label": ("label", "label", "label 'https://***@labels.internal/x' in column 'label'"),
    "h-label-many-schemes": ("label", "label", "label 'a://a://a://"),  # 200 KB through the linear redact
}
# Hostile rows that must be used, within bounds: id -> (text present, image present).
KEPT = {"h-text-600kb": (1.0, 0.0), "h-float-tiff-16mp": (1.0, 1.0), "h-rgba-png-16mp": (1.0, 1.0)}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def float_tiff(side: int) -> bytes:
    """A deflate-compressed 32-bit float TIFF: a few KB on disk, ``side^2 * 4`` bytes decoded."""
    img = Image.new("F", (side, side), 0.0)
    img.paste(1.0, (0, 0, side // 2, side))  # two values, so the decoder's range stretch has work to do
    return _encode(img, "TIFF", compression="tiff_adobe_deflate")


def progressive_jpeg(side: int) -> bytes:
    """A grey progressive JPEG of ``side`` x ``side`` at the lowest quality: small on disk."""
    return _encode(Image.new("L", (side, side)), "JPEG", progressive=True, quality=5)


def rgba_png(side: int) -> bytes:
    """An 8-bit RGBA PNG of ``side`` x ``side`` written row by row (never a whole canvas in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes([200, 30, 30, 128]) * side  # filter byte + half-transparent red pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_hostile(folder: Path, good: int = 40, seed: int = 11) -> dict:
    """Writes the corpus under ``folder`` (see the module docstring).

    Returns:
        {"input": Parquet folder, "root": the allowed image root, "rows": total rows, "good_ids": the
         synthetic ids, "quarantined": id -> (stage, column, reason prefix) with paths filled in}
    """
    images, private, data = folder / "images", folder / "private", folder / "input"
    for d in (images, private, data):
        d.mkdir(parents=True, exist_ok=True)
    (private / "secret.png").write_bytes(_encode(Image.new("RGB", (8, 8)), "PNG"))
    (images / "escape.png").symlink_to(private / "secret.png")
    os.mkfifo(images / "fifo.png")
    with open(images / "huge.png", "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB by stat, nothing on disk
    (images / "float.tif").write_bytes(float_tiff(SIDE))
    photo = "a photo of my cat"
    hostile = [  # id, text, image, image_uri, label
        ("h-text-2mib", "a" * (2 << 20), None, None, "cat_red"),
        ("h-text-600kb", "a photo of my cat " * 34_000, None, None, "cat_red"),
        ("h-etc-passwd", photo, None, "/etc/passwd", "cat_red"),
        ("h-file-scheme", photo, None, "file:///etc/passwd", "cat_red"),
        ("h-etc-absent", photo, None, "/etc/no-such-file", "cat_red"),
        ("h-dev-zero", photo, None, "/dev/zero", "cat_red"),
        ("h-proc-environ", photo, None, "/proc/self/environ", "cat_red"),
        ("h-fifo", photo, None, f"{images}/fifo.png", "cat_red"),
        ("h-symlink-escape", photo, None, f"{images}/escape.png", "cat_red"),
        ("h-dotdot", photo, None, f"{images}/../private/secret.png", "cat_red"),
        ("h-sparse-1gib", photo, None, f"{images}/huge.png", "cat_red"),
        ("h-inline-32mib", photo, b"\x00" * (IMAGE_LIMIT + 1), None, "cat_red"),
        ("h-float-tiff-bomb", photo, float_tiff(BOMB_SIDE), None, "cat_red"),
        ("h-rgba-png-bomb", photo, rgba_png(BOMB_SIDE), None, "cat_red"),
        ("h-progressive-jpeg-bomb", photo, progressive_jpeg(JPEG_BOMB_SIDE), None, "cat_red"),
        ("h-float-tiff-16mp", photo, None, f"{images}/float.tif", "cat_red"),
        ("h-rgba-png-16mp", photo, rgba_png(SIDE), None, "cat_red"),
        ("h-credentials-uri", photo, None, f"s3://{ACCESS_KEY}:{SECRET}@bucket/x.png", "cat_red"),
        ("h-credentials-label", photo, None, None, f"https://admin:{SECRET}@labels.internal/x"),
        ("h-label-many-schemes", photo, None, None, "a://" * 50_000),
    ]
    rows = make_rows(good, seed, id_prefix="good-")
    rows["image_uri"] = [None] * good
    for row in hostile:
        for key, value in zip(SCHEMA.names, row):
            rows[key].append(value)
    table = pa.table({k: rows[k] for k in SCHEMA.names}, schema=SCHEMA)
    half = table.num_rows // 2  # two files, so the attacks cross file and batch boundaries
    pq.write_table(table.slice(0, half), data / "part-00000.parquet")
    pq.write_table(table.slice(half), data / "part-00001.parquet")
    quarantined = {
        k: (stage, column, reason.replace("{root}", str(folder))) for k, (stage, column, reason) in QUARANTINED.items()
    }
    return {
        "input": str(data),
        "root": str(images),
        "rows": table.num_rows,
        "good_ids": rows["id"][:good],
        "quarantined": quarantined,
    }


if __name__ == "__main__":
    print(make_hostile(Path(sys.argv[1])))
