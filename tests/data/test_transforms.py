"""Device-side transforms: normalisation and seeded augmentation of uint8 batches."""

from __future__ import annotations

import torch

from mmray.data.transforms import augment, normalize


def test_normalize_on_device_matches_the_formula():
    px = torch.tensor([[[[0]], [[255]], [[51]]]], dtype=torch.uint8)
    out = normalize(px, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
    assert torch.allclose(out.flatten(), torch.tensor([-1.0, 2.0, 0.0]), atol=1e-6)


def test_augment_keeps_shape_dtype_and_is_seeded():
    px = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    a = augment(px, torch.Generator().manual_seed(0))
    b = augment(px, torch.Generator().manual_seed(0))
    assert a.shape == px.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, px)
