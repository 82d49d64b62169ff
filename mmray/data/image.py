"""Image decoding (any common format and mode -> RGB uint8) and device-side normalisation/augmentation.

Decoding happens in preprocessing actors and ships uint8 ``[3, S, S]`` pixels through the object store
(4x less than float32); normalisation and random augmentation run on the training/scoring device.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import v2

__all__ = ["ImageDecodeError", "augment", "decode_image", "normalize", "resize_uint8"]

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


class ImageDecodeError(ValueError):
    """Raised for bytes that are not a decodable, safe image; the message is a short reason."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes image bytes to an RGB PIL image, applying EXIF orientation.

    Args:
        data: encoded image (PNG, JPEG, WebP, GIF (first frame), BMP, TIFF ...).
        max_pixels: refuse images with more pixels than this (decompression bombs).

    Raises:
        ImageDecodeError: empty, undecodable, truncated or oversized input.
    """
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: checked before any pixel is decoded
            if w * h > max_pixels:
                raise ImageDecodeError(f"decompression bomb: {w}x{h} exceeds max_pixels={max_pixels}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError ...)
        reason = "truncated image" if "truncated" in str(e).lower() else f"undecodable image: {e}"
        raise ImageDecodeError(reason[:200]) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize_uint8(img: Image.Image, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` and center-crops: uint8 ``[3, size, size]``."""
    t = v2.functional.pil_to_tensor(img)
    t = v2.functional.resize(t, [size], antialias=True)
    t = v2.functional.center_crop(t, [size, size])
    return t.numpy()


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float ``[B, 3, H, W]`` normalised, on the tensor's device."""
    x = pixels.float().div_(255.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def augment(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop (scale 0.6-1) and horizontal flip per sample, on uint8 or float batches."""
    b, _, h, w = pixels.shape
    out = torch.empty_like(pixels)
    rand = torch.rand(b, 4, generator=generator)
    for i in range(b):
        scale = 0.6 + 0.4 * rand[i, 0].item()
        ch, cw = max(1, int(h * scale**0.5)), max(1, int(w * scale**0.5))
        top = int(rand[i, 1].item() * (h - ch + 1))
        left = int(rand[i, 2].item() * (w - cw + 1))
        crop = v2.functional.resized_crop(pixels[i], top, left, ch, cw, [h, w], antialias=True)
        out[i] = v2.functional.horizontal_flip(crop) if rand[i, 3] < 0.5 else crop
    return out
