"""Image decoding: every common format and mode to RGB, EXIF orientation, bombs, truncation, fuzzing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmray.data.image import ImageDecodeError, decode_image, resize_uint8
from tests.data.corpus import png_bomb

RED = (200, 30, 30)
BIG = 10**8


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def centre(img: Image.Image) -> tuple[int, int, int]:
    return img.getpixel((img.width // 2, img.height // 2))


def close(a, b, tol: int = 8) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def grey(value: int) -> tuple[int, int, int]:
    return (value, value, value)


RGB = Image.new("RGB", (40, 30), RED)
GREY_OF_RED = RGB.convert("L").getpixel((0, 0))  # ITU-R 601 luma of RED

# (format, source image, colour the decoder must produce at the centre)
CASES = [
    ("PNG", RGB, RED),
    ("JPEG", RGB, RED),
    ("WEBP", RGB, RED),
    ("GIF", RGB, RED),
    ("BMP", RGB, RED),
    ("TIFF", RGB, RED),
    ("AVIF", RGB, RED),
    ("AVIF", RGB.convert("RGBA"), RED),
    ("AVIF", RGB.convert("L"), grey(GREY_OF_RED)),
    ("PNG", RGB.convert("L"), grey(GREY_OF_RED)),
    ("JPEG", RGB.convert("L"), grey(GREY_OF_RED)),
    ("PNG", RGB.convert("LA"), grey(GREY_OF_RED)),
    ("TIFF", RGB.convert("LA"), grey(GREY_OF_RED)),
    ("PNG", RGB.convert("P"), RED),
    ("BMP", RGB.convert("P"), RED),
    ("TIFF", RGB.convert("P"), RED),
    ("PNG", RGB.convert("RGBA"), RED),
    ("WEBP", RGB.convert("RGBA"), RED),
    ("TIFF", RGB.convert("RGBA"), RED),
    ("JPEG", RGB.convert("CMYK"), RED),
    ("TIFF", RGB.convert("CMYK"), RED),
    ("PNG", Image.fromarray(np.full((30, 40), 40_000, dtype=np.uint16)), grey(156)),  # I;16: 40000/257
    ("TIFF", Image.fromarray(np.full((30, 40), 40_000, dtype=np.uint16)), grey(156)),
    ("PNG", Image.new("1", (40, 30), 1), grey(255)),
    ("TIFF", Image.new("1", (40, 30), 0), grey(0)),
]


@pytest.mark.parametrize("fmt, img, colour", CASES, ids=[f"{f}-{i.mode}" for f, i, _ in CASES])
def test_formats_and_modes_decode_to_rgb(fmt, img, colour):
    data = encode(img, fmt)
    out = decode_image(data, BIG)
    assert out.mode == "RGB" and out.size == (40, 30)
    # P mode quantizes, JPEG/WebP are lossy: a small tolerance.
    assert close(centre(out), colour, tol=30 if img.mode == "P" else 10), (fmt, img.mode, centre(out))


def test_transparent_pixels_become_white_not_their_hidden_colour():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    assert centre(decode_image(encode(rgba, "PNG"), BIG)) == (255, 255, 255)
    la = Image.new("LA", (10, 10), (0, 0))
    assert centre(decode_image(encode(la, "PNG"), BIG)) == (255, 255, 255)


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), (30, 60, 200))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert close(centre(decode_image(data, BIG)), RED)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), RED)
    img.paste((30, 60, 200), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()), BIG)
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 5)), RED, tol=20) and close(out.getpixel((10, 35)), (30, 60, 200), tol=20)


def test_malformed_exif_keeps_the_pixels():
    img = Image.new("RGB", (16, 16), RED)
    data = encode(img, "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff")
    assert close(centre(decode_image(data, BIG)), RED)


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(png_bomb(12_000), 89_478_485)  # 144 MP: Pillow's own limit would warn here
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(png_bomb(20_000), 89_478_485)  # 400 MP: Pillow's own limit would raise here


def test_max_pixels_is_exact_and_configurable():
    data = encode(Image.new("RGB", (40, 30), RED), "PNG")
    assert decode_image(data, 1200).size == (40, 30)
    with pytest.raises(ImageDecodeError, match="40x30 exceeds max_pixels=1199"):
        decode_image(data, 1199)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_truncated_files_are_refused(fmt):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated image"):
        decode_image(data[: len(data) // 2], BIG)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty image bytes"),
        (b"definitely not an image", "unknown or unsupported image format"),
        (
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            "unknown or unsupported image format",
        ),  # no Ghostscript
    ],
)
def test_unusable_bytes_get_a_short_stable_reason(data, reason):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, BIG)
    assert str(e.value).startswith(reason) and "0x" not in str(e.value)  # no object addresses in reasons


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_draft_keeps_at_least_the_requested_side(mode):
    source = Image.new("RGB", (800, 600), RED).convert(mode)
    out = decode_image(encode(source, "JPEG"), BIG, min_side=64)
    assert min(out.size) >= 64 and out.size[0] < 800  # decoded at a reduced DCT scale
    assert out.mode == "RGB" and close(centre(out), centre(source.convert("RGB")))
    assert resize_uint8(out, 64).shape == (3, 64, 64)


def test_a_progressive_jpeg_over_max_pixels_is_refused_though_its_draft_would_fit():
    """libjpeg holds a progressive file's coefficients at full size: the draft's size says nothing."""
    source = Image.new("L", (800, 600), 90)
    progressive = encode(source, "JPEG", progressive=True, quality=5)
    with pytest.raises(
        ImageDecodeError, match=r"decompression bomb: progressive JPEG 800x600 exceeds max_pixels=400000"
    ):
        decode_image(progressive, 400_000, min_side=64)  # the 1/8 draft is 100x75: it passed before
    assert min(decode_image(progressive, 480_000, min_side=64).size) >= 64  # within the bound: decoded
    baseline = encode(source, "JPEG", quality=5)  # one interleaved scan: the draft really bounds memory
    assert min(decode_image(baseline, 400_000, min_side=64).size) >= 64


def test_an_exif_thumbnail_is_not_a_second_scan():
    thumb = encode(Image.new("RGB", (16, 16), RED), "JPEG")
    exif = Image.Exif()
    exif[0x010E] = "x"  # ImageDescription: the APP1 segment carries it and the thumbnail's bytes
    app1 = exif.tobytes() + thumb
    data = encode(Image.new("RGB", (800, 600), RED), "JPEG", exif=app1)
    assert data.count(b"\xff\xda") == 2  # a naive count would see two scans
    assert min(decode_image(data, 400_000, min_side=64).size) >= 64


def test_resize_center_crops_to_uint8_square():
    img = Image.new("RGB", (80, 40), RED)
    img.paste((0, 0, 0), (0, 0, 20, 40))  # left quarter black: cropped away by the center crop
    px = resize_uint8(img, 16)
    assert px.shape == (3, 16, 16) and px.dtype == np.uint8
    assert close(tuple(int(v) for v in px[:, 8, 8]), RED, tol=2) and px[0].min() > 150


@pytest.mark.parametrize("width, height", [(80, 40), (37, 91), (640, 480), (16, 16), (9, 30)])
def test_resize_has_torchvisions_geometry_and_close_pixels(width, height):
    """Same output as torchvision's resize + center_crop (the reference), without importing torch in actors."""
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(width * height)
    base = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)  # smooth, not flat
    ours = resize_uint8(img, 16).astype(np.int16)
    reference = F.center_crop(F.resize(F.pil_to_tensor(img), [16], antialias=True), [16, 16]).numpy()
    assert ours.shape == reference.shape == (3, 16, 16)
    assert np.abs(ours - reference.astype(np.int16)).mean() < 1.5  # rounding differs, content does not


def test_decoding_and_resizing_never_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, io; from PIL import Image; from mmray.data.image import decode_image, resize_uint8; "
        "b = io.BytesIO(); Image.new('RGB', (40, 30)).save(b, 'PNG'); "
        "resize_uint8(decode_image(b.getvalue(), 10**6), 8); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _decodes_or_refuses(data: bytes) -> None:
    try:
        img = decode_image(data, 1_000_000, min_side=16)
    except ImageDecodeError as e:
        assert str(e) and len(str(e)) <= 200
        return
    assert img.mode == "RGB" and img.width * img.height <= 1_000_000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_the_decoder(data):
    _decodes_or_refuses(data)


_SEEDS = {
    fmt: encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)), fmt)
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(_SEEDS)),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.integers(0, 10**6),
)
def test_corrupted_real_images_never_crash_the_decoder(fmt, flips, cut):
    data = bytearray(_SEEDS[fmt])
    for pos, value in flips:
        data[pos % len(data)] = value
    _decodes_or_refuses(bytes(data[: max(1, cut % (len(data) + 1))]))
