"""Image decoding (any common format and mode -> RGB uint8 ``[3, S, S]``) for preprocessing actors.

Decoding happens in preprocessing actors and ships uint8 pixels through the object store (4x less
than float32); normalisation and random augmentation run on the training/scoring device
(``mmray.data.transforms``). This module needs only Pillow and numpy: an actor that imported torch
and torchvision would pay ~7 CPU-s and ~0.7 GB before its first row.

Only the formats in ``FORMATS`` are opened: Pillow can parse dozens more (EPS hands the file to
Ghostscript, PSD/FITS/... are rarely what a dataset means), and each extra parser is attack surface
for bytes that come from users.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = ["FORMATS", "ImageDecodeError", "decode_image", "resize_uint8"]

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image
Image.init()
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN)


class ImageDecodeError(ValueError):
    """Raised for bytes that are not a decodable, safe image; the message is a short reason."""


def decode_image(data: bytes, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Decodes image bytes to an RGB PIL image, applying EXIF orientation.

    Args:
        data: encoded image (PNG, JPEG, WebP, GIF (first frame), BMP, TIFF, AVIF).
        max_pixels: refuse images with more pixels than this (decompression bombs); checked from the
            header, before any pixel is decoded.
        min_side: the caller only needs this many pixels on the shorter side; lets JPEG decode at a
            reduced scale (DCT scaling), several times faster for photos.

    Raises:
        ImageDecodeError: empty, unknown-format, undecodable, truncated or oversized input.
    """
    if not data:
        raise ImageDecodeError("empty image bytes")
    # Pillow's own guard raises above twice MAX_IMAGE_PIXELS (and only warns above it); tie it to ours,
    # which checks the exact limit below, for this call only.
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our exact check follows
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" and the like: not fatal
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageDecodeError(f"invalid image size {w}x{h}")
            if w * h > max_pixels:
                raise ImageDecodeError(f"decompression bomb: {w}x{h} exceeds max_pixels={max_pixels}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF/WebP/APNG, multi-page TIFF: the first frame
            if min_side and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (min_side, min_side))  # keeps both sides >= min_side
            img.load()
            img = _orient(img)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"decompression bomb: more than twice max_pixels={max_pixels}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"unknown or unsupported image format (supported: {', '.join(FORMATS)})") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error ...)
        raise ImageDecodeError(_reason(e, data)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _reason(e: Exception, data: bytes) -> str:
    message = str(e)
    if "truncated" in message.lower() or _declared_longer(data) or isinstance(e, EOFError):
        return "truncated image"
    return f"undecodable image: {type(e).__name__}: {message}"[:200]


def _declared_longer(data: bytes) -> bool:
    """True when a RIFF (WebP) header declares more bytes than there are: libwebp only says 'no decoder'."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return struct.unpack("<I", data[4:8])[0] + 8 > len(data)
    return False


def _orient(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: the pixels are fine, keep them unrotated
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        # 16-bit greyscale: full-range scaling (65535 -> 255), the same for every image.
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        # 32-bit integer / float pixels have no fixed range: stretch the image's finite range to 8 bit.
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(np.nan_to_num(arr, nan=0.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, not whatever colour their (meaningless) RGB values hold.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize_uint8(img: Image.Image, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` (antialiased bilinear) and center-crops: uint8 ``[3, size, size]``.

    The same geometry as torchvision's ``resize([size])`` + ``center_crop``: the longer side is
    truncated to ``int(size * long / short)``, the crop offset rounded.
    """
    w, h = img.size
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    pixels = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)  # [S, S, 3]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
