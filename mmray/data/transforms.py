"""Device-side image transforms: uint8 pixels from the preprocessing actors -> model inputs.

They run where the model runs (trainer workers, scoring actors), on whole batches: normalisation on
every batch, random augmentation on training batches, so cached uint8 pixels get fresh crops each
epoch.
"""

from __future__ import annotations

import torch

__all__ = ["augment", "normalize"]


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float ``[B, 3, H, W]`` normalised, on the tensor's device."""
    x = pixels.float().div_(255.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def augment(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop (scale 0.6-1) and horizontal flip per sample, on uint8 or float batches."""
    from torchvision.transforms.v2 import functional as F  # pulls torch._dynamo: only where augmenting

    b, _, h, w = pixels.shape
    out = torch.empty_like(pixels)
    rand = torch.rand(b, 4, generator=generator)
    for i in range(b):
        scale = 0.6 + 0.4 * rand[i, 0].item()
        ch, cw = max(1, int(h * scale**0.5)), max(1, int(w * scale**0.5))
        top = int(rand[i, 1].item() * (h - ch + 1))
        left = int(rand[i, 2].item() * (w - cw + 1))
        crop = F.resized_crop(pixels[i], top, left, ch, cw, [h, w], antialias=True)
        out[i] = F.horizontal_flip(crop) if rand[i, 3] < 0.5 else crop
    return out
