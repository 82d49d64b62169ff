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
from PIL import Image, ImageFile

__all__ = ["FORMATS", "ImageDecodeError", "decode_image", "resize_uint8"]

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image
Image.init()
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN)


class ImageDecodeError(ValueError):
    """Raised for bytes that are not a decodable, safe image; the message is a short reason."""


def decode_image(data: bytes, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Decodes image bytes to an RGB PIL image, applying EXIF orientation.

    Memory stays near one decoded copy of the image: JPEG decodes at a reduced DCT scale (``draft``),
    other formats are box-reduced (``Image.reduce``) right after decoding, before any mode conversion,
    and conversions never make float64 copies. So a small file that declares a huge float or RGBA
    canvas costs at most ``max_pixels`` x 4 bytes, plus conversion of the (reduced) result.

    Args:
        data: encoded image (PNG, JPEG, WebP, GIF (first frame), BMP, TIFF, AVIF).
        max_pixels: refuse images that would decode to more pixels than this (decompression bombs);
            checked from the header, before any pixel is decoded. For JPEG it is the pixels decoded
            at the draft scale, so a large photo reduced to ``min_side`` passes.
        min_side: the caller only needs this many pixels on the shorter side; lets JPEG decode at a
            reduced scale (DCT scaling) and other formats be reduced by an integer factor, keeping
            the shorter side at least ``2 * min_side`` (the final antialiased resize does the rest).

    Raises:
        ImageDecodeError: empty, unknown-format, undecodable, truncated or oversized input.
    """
    if not data:
        raise ImageDecodeError("empty image bytes")
    # Pillow's own guard (a warning above MAX_IMAGE_PIXELS, an error above twice that) checks the
    # declared size; ours checks the size that will really be decoded (after a JPEG draft), exactly.
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" and the like: not fatal
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageDecodeError(f"invalid image size {w}x{h}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF/WebP/APNG, multi-page TIFF: the first frame
            if min_side and img.format in ("JPEG", "MPO"):
                _check_jpeg_buffer(img, data, max_pixels)
                img.draft("RGB", (min_side, min_side))  # keeps both sides >= min_side
            if img.size[0] * img.size[1] > max_pixels:
                raise ImageDecodeError(f"decompression bomb: {w}x{h} exceeds max_pixels={max_pixels}")
            img.load()
            orientation = _orientation(img)  # before reducing: a reduced copy has lost TIFF's tags
            if min_side:
                img = _reduce(_reducible(img), min_side)
            return _to_rgb(_orient(img, orientation))
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"unknown or unsupported image format (supported: {', '.join(FORMATS)})") from None
    except MemoryError:
        raise ImageDecodeError("image too large to decode in memory") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error ...)
        raise ImageDecodeError(_reason(e, data)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _check_jpeg_buffer(img: Image.Image, data: bytes, max_pixels: int) -> None:
    """Refuses a JPEG whose decoder must hold every coefficient at full size, over ``max_pixels``.

    A draft (DCT scaling) only reduces what is decoded when the file is one interleaved sequential scan:
    libjpeg then works a few block rows at a time. A progressive file, or one of several scans, is
    decoded from a whole-image coefficient buffer (2 bytes per sample at full size, whatever the
    draft), so a 4 MB progressive 32000x32000 file costs gigabytes while its 1/8 draft looks small.
    """
    w, h = img.size
    if w * h <= max_pixels:
        return
    progressive = bool(img.info.get("progressive") or img.info.get("progression"))
    scans = _jpeg_scans(data)
    if progressive or scans > 1:
        kind = "progressive" if progressive else f"{scans}-scan"
        raise ImageDecodeError(
            f"decompression bomb: {kind} JPEG {w}x{h} exceeds max_pixels={max_pixels} "
            "(its decoder holds every coefficient at full size)"
        )


def _jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS segments) of the first image in a JPEG stream.

    Walks the marker segments by their lengths (an EXIF thumbnail inside APP1 is skipped, not counted)
    and each scan's entropy-coded data to its end (there a 0xFF byte is followed by 0x00, a restart
    marker or fill, never a marker). Stops at the first EOI, so an MPO counts its first picture.
    """
    i, scans, n = 2, 0, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return scans  # malformed: the decoder reports it
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        while (i := data.find(b"\xff", i)) >= 0 and i + 1 < n:
            follower = data[i + 1]
            if follower == 0x00 or 0xD0 <= follower <= 0xD7:
                i += 2
            elif follower == 0xFF:
                i += 1
            else:
                break
        if i < 0:
            break
    return scans


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


# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block: the pixels are fine, keep them unrotated
        return 1


def _orient(img: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def _reducible(img: Image.Image) -> Image.Image:
    """The same pixels in a mode ``Image.reduce`` averages meaningfully (not palette indices, not bits)."""
    if img.mode.startswith("I;16"):
        # 16-bit greyscale: full-range scaling (65535 -> 255), the same for every image. Integer
        # arithmetic in place: round(x / 257) == (x + 128) // 257, never a float64 copy.
        arr = np.asarray(img).astype(np.uint32)
        arr += 128
        arr //= 257
        return Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    return img


def _reduce(img: Image.Image, min_side: int) -> Image.Image:
    """Box-reduces by the largest integer factor that keeps the shorter side >= ``2 * min_side``."""
    factor = min(img.size) // (2 * min_side)
    return img.reduce(factor) if factor >= 2 else img


def _to_rgb(img: Image.Image) -> Image.Image:
    img = _reducible(img)
    if img.mode in ("I", "F"):
        img = _stretch_to_l(img)
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # Transparent pixels become white, not whatever colour their (meaningless) RGB values hold.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _stretch_to_l(img: Image.Image) -> Image.Image:
    """32-bit integer / float pixels have no fixed range: the image's finite range stretched to 8 bit.

    One float32 copy, operated on in place (no float64, no masked copies of the finite values).
    """
    arr = np.asarray(img, dtype=np.float32)
    if not arr.flags.writeable:
        arr = arr.copy()
    finite = np.isfinite(arr)
    lo = float(np.min(arr, where=finite, initial=np.inf))
    hi = float(np.max(arr, where=finite, initial=-np.inf))
    if hi > lo:
        arr -= lo
        arr *= 255.0 / (hi - lo)
        np.nan_to_num(arr, copy=False, nan=0.0)  # NaN -> 0, +inf -> 255 and -inf -> 0 after the clip
        np.clip(arr, 0, 255, out=arr)
    else:
        arr[...] = 0
    return Image.fromarray(arr.astype(np.uint8), mode="L")


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
