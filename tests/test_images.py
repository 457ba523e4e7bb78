"""Tests for style_transfer.images.

Every image file is generated here, in tmp_path, so that nothing binary lives in the
repository and each test states exactly what its input contains.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import re
import stat
import struct
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageCms, ImageOps, features

from style_transfer import images
from style_transfer.errors import ImageError
from style_transfer.images import (
    DEFAULT_MAX_PIXELS,
    MEAN_BGR,
    MIN_SIDE,
    check_output_path,
    deprocess,
    load_image,
    pixel_bounds,
    preprocess,
    resize_long_side,
    resize_to,
    save_image,
)

TOL_8BIT = 1.5 / 255  # one 8-bit step plus float slack


def _save(image: Image.Image, path: Path, **params: Any) -> Path:
    image.save(path, **params)
    return path


def _pixel(array: np.ndarray, y: int = 0, x: int = 0) -> tuple[float, ...]:
    return tuple(float(v) for v in array[y, x])


def _assert_valid(array: np.ndarray) -> None:
    assert array.dtype == np.float32
    assert array.ndim == 3 and array.shape[2] == 3
    assert array.flags["C_CONTIGUOUS"]
    assert np.isfinite(array).all()
    assert array.min() >= 0.0 and array.max() <= 1.0


def _srgb_profile_bytes() -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return profile.tobytes()


def _lut_profile(space: bytes, inputs: int, corner_colour: Callable[[tuple[int, ...]], tuple[int, ...]]) -> bytes:
    """A minimal ICC v2 input profile whose A2B0 is a 2-point-per-axis lut8.

    ImageCms can only synthesise sRGB, Lab and XYZ profiles, so CMYK (and deliberately
    non-sRGB RGB) profiles are assembled by hand.  ``corner_colour`` gives the sRGB
    colour each corner of the device cube (0 or 1 per input channel) should map to.
    """
    corners = list(itertools.product((0, 1), repeat=inputs))  # first input slowest
    strip = Image.new("RGB", (len(corners), 1))
    for i, corner in enumerate(corners):
        strip.putpixel((i, 0), corner_colour(corner))
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(strip, to_lab)
    assert lab is not None
    # getpixel reports L*a*b* with a*/b* offset by 128, which is also the lut8 encoding
    # (tobytes would give Pillow's signed raw form instead).
    clut = bytes(v for i in range(len(corners)) for v in lab.getpixel((i, 0)))  # type: ignore[union-attr]

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    identity = b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ramp = bytes(range(256))
    lut = b"mft1" + bytes(4) + bytes([inputs, 3, 2, 0]) + identity
    lut += ramp * inputs + clut + ramp * 3
    text = b"hand-made test profile\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8 + 3 + 67)
    d50 = s15(0.9642) + s15(1.0) + s15(0.8249)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"A2B0", lut)]

    data_start = 128 + 4 + 12 * len(tags)
    table = struct.pack(">I", len(tags))
    body = b""
    for signature, content in tags:
        body += bytes(-(data_start + len(body)) % 4)
        table += signature + struct.pack(">II", data_start + len(body), len(content))
        body += content
    header = (
        struct.pack(">I", data_start + len(body))
        + bytes(4)
        + struct.pack(">I", 0x02100000)
        + b"scnr"
        + space
        + b"Lab "
        + bytes(12)
        + b"acsp"
        + bytes(28)  # platform, flags, device maker and model, attributes, intent
        + d50  # illuminant
        + bytes(48)  # creator, profile ID, reserved
    )
    assert len(header) == 128
    return header + table + body


def _naive_cmyk_swapped(corner: tuple[int, ...]) -> tuple[int, ...]:
    # Plain CMYK -> RGB with red and blue exchanged, so the test can tell whether the
    # profile or Pillow's built-in conversion produced the result.
    c, m, y, k = corner
    red, green, blue = (255 * (1 - c) * (1 - k), 255 * (1 - m) * (1 - k), 255 * (1 - y) * (1 - k))
    return (blue, green, red)


def _rgb_swapped(corner: tuple[int, ...]) -> tuple[int, ...]:
    red, green, blue = (255 * v for v in corner)
    return (blue, green, red)


# ---------------------------------------------------------------------- Caffe layout


def test_mean_is_the_caffe_imagenet_mean_and_read_only() -> None:
    assert MEAN_BGR.dtype == np.float32
    np.testing.assert_allclose(MEAN_BGR, [104.00699, 116.66877, 122.67891], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        MEAN_BGR[0] = 0


def test_preprocess_layout_and_bgr_order() -> None:
    image = np.zeros((4, 5, 3), dtype=np.float32)
    image[..., 0] = 1.0  # pure red
    x = preprocess(image)
    assert x.shape == (3, 4, 5)
    assert x.dtype == np.float32
    assert x.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(x[2], 255 - 122.67891, atol=1e-4)  # red is last in BGR
    np.testing.assert_allclose(x[1], -116.66877, atol=1e-4)
    np.testing.assert_allclose(x[0], -104.00699, atol=1e-4)


def test_preprocess_deprocess_round_trip() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((7, 9, 3), dtype=np.float32)
    back = deprocess(preprocess(image))
    assert back.shape == image.shape
    assert back.dtype == np.float32
    assert back.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(back, image, atol=1e-5)


def test_deprocess_clips_overshoot() -> None:
    x = np.full((3, 2, 2), 1000.0, dtype=np.float32)
    x[:, 0, 0] = -1000.0
    out = deprocess(x)
    assert out[0, 0].tolist() == [0.0, 0.0, 0.0]
    assert out[1, 1].tolist() == [1.0, 1.0, 1.0]


def test_pixel_bounds_match_black_and_white() -> None:
    lower, upper = pixel_bounds(3, 4)
    for bound in (lower, upper):
        assert bound.shape == (3, 3, 4)
        assert bound.dtype == np.float32
        assert bound.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(lower, preprocess(np.zeros((3, 4, 3), np.float32)), atol=1e-4)
    np.testing.assert_allclose(upper, preprocess(np.ones((3, 4, 3), np.float32)), atol=1e-4)
    np.testing.assert_allclose(lower[:, 0, 0], -MEAN_BGR)
    np.testing.assert_allclose(upper[:, 0, 0], 255 - MEAN_BGR)
    lower[...] = 0  # the bounds are fresh arrays, not views of the constant
    assert MEAN_BGR[0] > 100


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 4), (3, 4, 4)])
def test_preprocess_rejects_wrong_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="HxWx3"):
        preprocess(np.zeros(shape, np.float32))


# -------------------------------------------------------------------------- resizing


def test_resize_long_side_keeps_aspect_ratio() -> None:
    image = np.random.default_rng(2).random((200, 300, 3), dtype=np.float32)
    out = resize_long_side(image, 512)
    assert out.shape == (341, 512, 3)  # 200 * 512 / 300 = 341.33
    _assert_valid(out)
    portrait = resize_long_side(image.transpose(1, 0, 2), 100)
    assert portrait.shape == (100, 67, 3)  # 66.67 rounds up


def test_resize_keeps_float_precision() -> None:
    # 0.3337 is not a multiple of 1/255; an 8-bit detour would land on 85/255 = 0.33333.
    image = np.full((40, 60, 3), 0.3337, dtype=np.float32)
    out = resize_long_side(image, 100)
    np.testing.assert_allclose(out, 0.3337, atol=1e-5)


def test_resize_clips_lanczos_ringing() -> None:
    checker = (np.indices((32, 32)).sum(axis=0) % 2).astype(np.float32)
    image = np.repeat(checker[:, :, None], 3, axis=2)
    for out in (resize_long_side(image, 77), resize_to(image, 20, 50)):
        _assert_valid(out)


def test_resize_to_exact_size() -> None:
    image = np.random.default_rng(3).random((50, 40, 3), dtype=np.float32)
    out = resize_to(image, 30, 70)
    assert out.shape == (30, 70, 3)
    _assert_valid(out)


def test_resize_to_same_size_is_unchanged() -> None:
    image = np.random.default_rng(4).random((20, 30, 3), dtype=np.float32)
    np.testing.assert_array_equal(resize_to(image, 20, 30), image)


def test_one_pixel_tall_image_is_refused() -> None:
    with pytest.raises(ImageError, match=f"at least {MIN_SIDE} px"):
        resize_long_side(np.zeros((1, 300, 3), np.float32), 512)


def test_tiny_target_length_is_refused() -> None:
    with pytest.raises(ImageError, match="at least"):
        resize_long_side(np.zeros((1, 1, 3), np.float32), MIN_SIDE - 1)


def test_extreme_aspect_ratio_message() -> None:
    with pytest.raises(ImageError) as caught:
        resize_long_side(np.zeros((3, 2000, 3), np.float32), 512)
    assert str(caught.value) == ("image 2000x3 px would be 512x1 px at --length 512; each side must be at least 16 px")


def test_resize_to_below_minimum_is_refused() -> None:
    with pytest.raises(ImageError, match="at least"):
        resize_to(np.zeros((40, 40, 3), np.float32), 8, 40)


# ---------------------------------------------------------------------- loading modes


def test_rgb_png_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    out = load_image(_save(Image.fromarray(data), tmp_path / "rgb.png"))
    _assert_valid(out)
    np.testing.assert_allclose(out, data / 255.0, atol=1e-6)


def test_accepts_str_and_pathlike(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (3, 2), (10, 20, 30)), tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(str(path)), load_image(path))


def test_grayscale_gives_three_equal_channels(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("L", (5, 4), 100), tmp_path / "l.png"))
    _assert_valid(out)
    assert out.shape == (4, 5, 3)
    np.testing.assert_allclose(out, 100 / 255, atol=1e-6)


def test_bilevel(tmp_path: Path) -> None:
    image = Image.new("1", (4, 2), 0)
    image.putpixel((3, 1), 1)
    out = load_image(_save(image, tmp_path / "bw.png"))
    assert _pixel(out, 0, 0) == (0.0, 0.0, 0.0)
    assert _pixel(out, 1, 3) == (1.0, 1.0, 1.0)


def test_gray_alpha_composited(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("LA", (4, 4), (0, 128)), tmp_path / "la.png"))
    np.testing.assert_allclose(out, 1 - 128 / 255, atol=1e-6)


def test_palette_without_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([255, 0, 0, 0, 0, 255])
    out = load_image(_save(image, tmp_path / "p.png"))
    np.testing.assert_allclose(out, np.broadcast_to([0, 0, 1], out.shape), atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_transparency_composited(tmp_path: Path, suffix: str) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.putpixel((1, 1), 1)
    path = _save(image, tmp_path / f"pt{suffix}", transparency=0)
    out = load_image(path, background=(0, 0, 255))
    assert _pixel(out, 0, 0) == pytest.approx((0, 0, 1))  # transparent index -> background
    assert _pixel(out, 1, 1) == pytest.approx((0, 1, 0))


def test_rgba_half_alpha_on_white_and_black(tmp_path: Path) -> None:
    path = _save(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), tmp_path / "rgba.png")
    a = 128 / 255
    on_white = load_image(path)
    assert _pixel(on_white) == pytest.approx((1.0, 1 - a, 1 - a), abs=1e-6)
    assert _pixel(on_white) == pytest.approx((1.0, 0.5, 0.5), abs=0.01)
    on_black = load_image(path, background=(0, 0, 0))
    assert _pixel(on_black) == pytest.approx((a, 0.0, 0.0), abs=1e-6)


def test_rgb_colour_key_transparency(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    image.putpixel((2, 2), (200, 100, 50))
    path = _save(image, tmp_path / "key.png", transparency=(10, 20, 30))
    out = load_image(path, background=(0, 255, 0))
    assert _pixel(out, 0, 0) == pytest.approx((0, 1, 0))
    assert _pixel(out, 2, 2) == pytest.approx((200 / 255, 100 / 255, 50 / 255))


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I;16", ".tif"), ("I;16B", ".tif")])
def test_16_bit_gray_uses_full_range(tmp_path: Path, mode: str, suffix: str) -> None:
    image = Image.new(mode, (4, 2), 32768)
    image.putpixel((1, 0), 1000)
    image.putpixel((2, 0), 1001)
    out = load_image(_save(image, tmp_path / f"g16{suffix}"))
    _assert_valid(out)
    assert _pixel(out, 1, 0) == pytest.approx((32768 / 65535,) * 3, abs=1e-6)
    # Neighbouring 16-bit levels stay apart: no detour through 8 bits.
    assert out[0, 1, 0] == pytest.approx(1000 / 65535, abs=1e-7)
    assert out[0, 2, 0] > out[0, 1, 0]


def test_32_bit_int_in_16_bit_range(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("I", (3, 3), 32768), tmp_path / "i.tif"))
    np.testing.assert_allclose(out, 32768 / 65535, atol=1e-6)


def test_32_bit_int_out_of_range_is_stretched(tmp_path: Path) -> None:
    image = Image.new("I", (3, 1), -5000)
    image.putpixel((2, 0), 200000)
    notices: list[str] = []
    out = load_image(_save(image, tmp_path / "wide.tif"), notices=notices)
    _assert_valid(out)
    assert out[0, 0, 0] == 0.0 and out[0, 2, 0] == 1.0
    assert any("stretched" in n for n in notices)


def test_float_in_unit_range(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("F", (3, 3), 0.25), tmp_path / "f.tif"))
    np.testing.assert_allclose(out, 0.25, atol=1e-7)


def test_float_out_of_range_is_stretched(tmp_path: Path) -> None:
    image = Image.new("F", (3, 1), 0.0)
    image.putpixel((1, 0), 500.0)
    image.putpixel((2, 0), 1000.0)
    notices: list[str] = []
    out = load_image(_save(image, tmp_path / "hdr.tif"), notices=notices)
    np.testing.assert_allclose(out[0, :, 0], [0.0, 0.5, 1.0], atol=1e-6)
    assert any("stretched" in n for n in notices)


@pytest.mark.parametrize("mode", ["YCbCr", "LAB"])
def test_other_colour_spaces(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(6)
    rgb = Image.fromarray(rng.integers(30, 220, (4, 6, 3), dtype=np.uint8))
    converted = rgb.convert(mode)
    out = load_image(_save(converted, tmp_path / f"{mode}.tif"))
    _assert_valid(out)
    expected = np.asarray(converted.convert("RGB")) / 255.0
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # 8-bit L*a*b* is coarse in the shadows, hence the loose bound on the round trip.
    np.testing.assert_allclose(out, np.asarray(rgb) / 255.0, atol=8 / 255)


def test_hsv_mode() -> None:
    # No common file format stores HSV, so the conversion step is fed directly.
    hsv = Image.new("RGB", (2, 2), (255, 0, 0)).convert("HSV")
    out = images._to_unit_rgb(hsv, (255, 255, 255), "hsv", [])
    assert _pixel(out) == pytest.approx((1.0, 0.0, 0.0), abs=TOL_8BIT)


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_without_profile(tmp_path: Path, suffix: str) -> None:
    path = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / f"c{suffix}")
    notices: list[str] = []
    out = load_image(path, notices=notices)
    _assert_valid(out)
    assert _pixel(out, 4, 4) == pytest.approx((1.0, 0.0, 0.0), abs=4 / 255)
    assert notices == []


def test_cmyk_with_cmyk_profile_uses_it(tmp_path: Path) -> None:
    profile = _lut_profile(b"CMYK", 4, _naive_cmyk_swapped)
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    cyan.putpixel((0, 0), (0, 0, 0, 0))
    path = _save(cyan, tmp_path / "cmyk_icc.tif", icc_profile=profile)
    notices: list[str] = []
    out = load_image(path, notices=notices)
    _assert_valid(out)
    assert notices == []
    # Pillow alone would give cyan (0, 1, 1); the profile maps cyan to yellow.
    red, green, blue = _pixel(out, 4, 4)
    assert red > 0.9 and green > 0.9 and blue < 0.1
    assert _pixel(out, 0, 0) == pytest.approx((1.0, 1.0, 1.0), abs=3 / 255)


def test_cmyk_jpeg_with_rgb_profile_falls_back(tmp_path: Path) -> None:
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    path = _save(image, tmp_path / "mismatch.jpg", icc_profile=_srgb_profile_bytes())
    notices: list[str] = []
    out = load_image(path, notices=notices)
    _assert_valid(out)
    assert _pixel(out, 4, 4) == pytest.approx((1.0, 0.0, 0.0), abs=4 / 255)
    assert any("colour profile could not be applied" in n for n in notices)


def test_rgb_with_srgb_profile(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    path = _save(Image.fromarray(data), tmp_path / "srgb.png", icc_profile=_srgb_profile_bytes())
    notices: list[str] = []
    out = load_image(path, notices=notices)
    np.testing.assert_allclose(out, data / 255.0, atol=2 / 255)
    assert notices == []


def test_rgb_with_other_profile_is_converted(tmp_path: Path) -> None:
    profile = _lut_profile(b"RGB ", 3, _rgb_swapped)
    path = _save(Image.new("RGB", (4, 4), (255, 0, 0)), tmp_path / "other.png", icc_profile=profile)
    red, green, blue = _pixel(load_image(path))
    assert blue > 0.9 and red < 0.1 and green < 0.1


def test_rgba_with_other_profile_keeps_alpha(tmp_path: Path) -> None:
    profile = _lut_profile(b"RGB ", 3, _rgb_swapped)
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (255, 0, 0, 0))
    path = _save(image, tmp_path / "other_alpha.png", icc_profile=profile)
    out = load_image(path, background=(0, 255, 0))
    assert _pixel(out, 0, 0) == pytest.approx((0, 1, 0), abs=1e-6)
    red, green, blue = _pixel(out, 2, 2)
    assert blue > 0.9 and red < 0.1 and green < 0.1


def test_gray_with_rgb_profile_falls_back(tmp_path: Path) -> None:
    path = _save(Image.new("L", (4, 4), 51), tmp_path / "g.png", icc_profile=_srgb_profile_bytes())
    notices: list[str] = []
    out = load_image(path, notices=notices)
    np.testing.assert_allclose(out, 0.2, atol=1e-6)
    assert len(notices) == 1 and "g.png" in notices[0]


def test_damaged_profile_falls_back(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (4, 4), (0, 0, 255)), tmp_path / "bad.png", icc_profile=b"junk" * 40)
    notices: list[str] = []
    out = load_image(path, notices=notices)
    assert _pixel(out) == pytest.approx((0, 0, 1))
    assert any("colour profile" in n for n in notices)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (20, 10), (255, 0, 0))
    stored.paste((0, 0, 255), (10, 0, 20, 10))  # left half red, right half blue
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # display rotated 90 degrees clockwise
    out = load_image(_save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95))
    assert out.shape == (20, 10, 3)
    # Turning clockwise brings the stored left edge to the top.
    assert _pixel(out, 3, 5) == pytest.approx((1, 0, 0), abs=0.1)
    assert _pixel(out, 16, 5) == pytest.approx((0, 0, 1), abs=0.1)


# How the upright picture follows from the stored pixels for each EXIF orientation, written from the TIFF/EXIF
# description of where the stored 0th row and 0th column belong (not from Pillow's own table).
UPRIGHT_FROM_STORED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,  # row 0 at the top, column 0 at the left
    2: lambda a: a[:, ::-1],  # row 0 top, column 0 right: mirrored left to right
    3: lambda a: a[::-1, ::-1],  # row 0 bottom, column 0 right: turned half round
    4: lambda a: a[::-1, :],  # row 0 bottom, column 0 left: mirrored top to bottom
    5: lambda a: a.transpose(1, 0, 2),  # row 0 left, column 0 top
    6: lambda a: np.rot90(a, k=-1),  # row 0 right, column 0 top: turned clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
    8: lambda a: np.rot90(a, k=1),  # row 0 left, column 0 bottom: turned anticlockwise
}


def _with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("orientation", sorted(UPRIGHT_FROM_STORED))
def test_every_exif_orientation_exactly(tmp_path: Path, orientation: int, suffix: str) -> None:
    # 5 wide, 3 high, every pixel a different colour: any wrong flip or turn moves some colour.
    stored = np.array(
        [[(17 * k, 255 - 17 * k, (53 * k) % 256) for k in range(row * 5, row * 5 + 5)] for row in range(3)],
        dtype=np.uint8,
    )
    assert len({tuple(p) for p in stored.reshape(-1, 3)}) == 15
    path = _save(Image.fromarray(stored), tmp_path / f"o{orientation}{suffix}", exif=_with_orientation(orientation))
    out = load_image(path)
    _assert_valid(out)
    expected = UPRIGHT_FROM_STORED[orientation](stored).astype(np.float32) / np.float32(255.0)
    assert out.shape == expected.shape == ((3, 5, 3) if orientation <= 4 else (5, 3, 3))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("orientation", sorted(UPRIGHT_FROM_STORED))
def test_every_exif_orientation_in_jpeg(tmp_path: Path, orientation: int) -> None:
    # JPEG is lossy, so each of the 5 x 3 cells is a 16 px block of a saturated colour, told apart at its centre.
    palette = np.array(
        [
            (255, 0, 0),
            (0, 255, 0),
            (0, 0, 255),
            (255, 255, 0),
            (0, 255, 255),
            (255, 0, 255),
            (0, 0, 0),
            (255, 255, 255),
            (128, 0, 0),
            (0, 128, 0),
            (0, 0, 128),
            (128, 128, 0),
            (0, 128, 128),
            (128, 0, 128),
            (128, 128, 128),
        ],
        dtype=np.uint8,
    )
    cells = palette.reshape(3, 5, 3)
    block = 16
    stored = np.repeat(np.repeat(cells, block, axis=0), block, axis=1)
    path = _save(
        Image.fromarray(stored), tmp_path / f"o{orientation}.jpg", exif=_with_orientation(orientation), quality=95
    )
    out = load_image(path)
    expected_cells = UPRIGHT_FROM_STORED[orientation](cells).astype(np.float32) / np.float32(255.0)
    rows, cols = expected_cells.shape[:2]
    assert out.shape == (rows * block, cols * block, 3)
    centres = out[block // 2 :: block, block // 2 :: block]
    np.testing.assert_allclose(centres, expected_cells, rtol=0, atol=0.1)


def test_profile_survives_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    profile = _lut_profile(b"RGB ", 3, _rgb_swapped)
    path = _save(Image.new("RGB", (20, 10), (255, 0, 0)), tmp_path / "both.png", icc_profile=profile, exif=exif)
    out = load_image(path)
    assert out.shape == (20, 10, 3)
    red, green, blue = _pixel(out)
    assert blue > 0.9 and red < 0.1 and green < 0.1


def test_pillow_warnings_become_notices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_transpose = ImageOps.exif_transpose

    def chatty_transpose(image: Image.Image) -> Image.Image:
        warnings.warn("Corrupt EXIF data.", UserWarning, stacklevel=1)
        warnings.warn("some future change", DeprecationWarning, stacklevel=1)
        return real_transpose(image)

    monkeypatch.setattr(ImageOps, "exif_transpose", chatty_transpose)
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "chatty.png")
    notices: list[str] = []
    # Only Pillow's remarks to the user become notices; developer warnings pass through.
    with pytest.warns(DeprecationWarning, match="future"):
        load_image(path, notices=notices)
    assert notices == [f"{path}: Corrupt EXIF data."]


ANIMATIONS = [
    pytest.param(".gif", {}, id="gif"),
    pytest.param(".png", {}, id="apng"),
    pytest.param(
        ".webp",
        {"lossless": True},
        id="webp",
        marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP support"),
    ),
]


@pytest.mark.parametrize(("suffix", "params"), ANIMATIONS)
def test_animation_uses_first_frame(tmp_path: Path, suffix: str, params: dict[str, Any]) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **params)
    notices: list[str] = []
    out = load_image(path, notices=notices)
    assert _pixel(out, 8, 8) == pytest.approx((1, 0, 0), abs=TOL_8BIT)
    assert len(notices) == 1
    assert "3 frames" in notices[0] and "first" in notices[0] and path.name in notices[0]


def test_still_gif_gives_no_notice(tmp_path: Path) -> None:
    notices: list[str] = []
    load_image(_save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "still.gif"), notices=notices)
    assert notices == []


# ---------------------------------------------------------------------- load errors


def _load_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert path.name in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _load_error(tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "pics.png"
    folder.mkdir()
    assert "folder" in _load_error(folder)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    assert "empty" in _load_error(path)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_file(tmp_path: Path, image_format: str) -> None:
    rng = np.random.default_rng(8)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, image_format)
    path = tmp_path / f"cut.{image_format.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "truncated" in _load_error(path)


def test_text_renamed_to_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not the pixels you are looking for\n" * 20)
    assert "not an image" in _load_error(path)


def test_postscript_is_not_opened(tmp_path: Path) -> None:
    # Pillow would hand EPS to Ghostscript; the loader refuses it before that can happen.
    path = tmp_path / "drawing.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert "not an image" in _load_error(path)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "secret.png")
    path.chmod(0)
    assert "permission" in _load_error(path)


@pytest.mark.parametrize("limit", [5000, 6000], ids=["over-2x", "between-1x-and-2x"])
def test_decompression_bomb_guard(tmp_path: Path, limit: int) -> None:
    # Pillow itself errors above 2x its limit but only warns between 1x and 2x.
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    message = _load_error(path, max_pixels=limit)
    assert "--max-pixels" in message and "100x100" in message
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # the swapped-in limit was put back


def test_pixel_limit_can_be_raised_past_pillows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # far below 2x of this image
    assert load_image(path, max_pixels=20_000).shape == (100, 100, 3)
    assert load_image(path, max_pixels=None).shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_default_limit_is_pillows() -> None:
    assert DEFAULT_MAX_PIXELS == 1024 * 1024 * 1024 // 4 // 3


def test_bad_arguments(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "ok.png")
    with pytest.raises(ValueError):
        load_image(path, max_pixels=0)
    with pytest.raises(ValueError):
        load_image(path, background=(0, 0, 256))


# --------------------------------------------------------------------------- saving


SAVE_FORMATS = [
    (".png", "PNG"),
    (".jpg", "JPEG"),
    (".jpeg", "JPEG"),
    (".JPG", "JPEG"),
    (".tif", "TIFF"),
    (".tiff", "TIFF"),
    (".bmp", "BMP"),
    (".gif", "GIF"),
    pytest.param(
        ".webp",
        "WEBP",
        marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP support"),
    ),
]


@pytest.mark.parametrize(("suffix", "expected"), SAVE_FORMATS)
def test_save_formats(tmp_path: Path, suffix: str, expected: str) -> None:
    image = np.random.default_rng(9).random((12, 20, 3), dtype=np.float32)
    path = tmp_path / f"out{suffix}"
    save_image(path, image)
    with Image.open(path) as written:
        assert written.format == expected
        assert written.size == (20, 12)
    assert os.listdir(tmp_path) == [path.name]


def test_png_round_trip_rounds(tmp_path: Path) -> None:
    image = np.random.default_rng(10).random((9, 11, 3), dtype=np.float32)
    image[0, 0] = [100.6 / 255, 100.4 / 255, 1.7]  # rounds to 101, 100 and clips to 255
    path = tmp_path / "exact.png"
    save_image(path, image)
    with Image.open(path) as written:
        data = np.asarray(written)
    np.testing.assert_array_equal(data, np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8))
    assert data[0, 0].tolist() == [101, 100, 255]


def test_jpeg_quality_is_used(tmp_path: Path) -> None:
    image = np.random.default_rng(11).random((64, 64, 3), dtype=np.float32)
    save_image(tmp_path / "low.jpg", image, quality=10)
    save_image(tmp_path / "high.jpg", image, quality=95)
    assert (tmp_path / "low.jpg").stat().st_size < (tmp_path / "high.jpg").stat().st_size
    with pytest.raises(ImageError, match="quality"):
        save_image(tmp_path / "bad.jpg", image, quality=0)


def test_save_replaces_existing_file_with_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "again.png"
    path.write_bytes(b"old")
    old_mask = os.umask(0o022)
    try:
        save_image(path, np.zeros((4, 4, 3), np.float32))
    finally:
        os.umask(old_mask)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if sys.platform != "win32":
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("name", ["out.xyz", "out", "out.pgm", "out.pdf"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    with pytest.raises(ImageError, match="extension"):
        save_image(tmp_path / name, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match="extension"):
        check_output_path(tmp_path / name)
    assert os.listdir(tmp_path) == []


TEMP_NAME = re.compile(r"^\.result\.png\.tmp-")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_save_is_atomic_when_the_disk_fills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool) -> None:
    path = tmp_path / "result.png"
    if existing:
        path.write_bytes(b"previous result")
    seen_during_write: list[str] = []

    def full_disk(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        seen_during_write.extend(os.listdir(tmp_path))
        fp.write(b"\x89PNG\r\n\x1a\n" + bytes(100))  # a partial image...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ...then the disk is full

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(ImageError) as caught:
        save_image(path, np.zeros((8, 8, 3), np.float32))
    assert "result.png" in str(caught.value)
    assert os.strerror(errno.ENOSPC) in str(caught.value)
    assert any(TEMP_NAME.match(name) for name in seen_during_write)
    if existing:
        assert path.read_bytes() == b"previous result"
        assert os.listdir(tmp_path) == ["result.png"]
    else:
        assert os.listdir(tmp_path) == []


def test_save_cleans_up_on_interrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        fp.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(tmp_path / "result.png", np.zeros((8, 8, 3), np.float32))
    assert os.listdir(tmp_path) == []


def test_save_into_vanished_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="gone does not exist"):
        save_image(tmp_path / "gone" / "out.png", np.zeros((4, 4, 3), np.float32))
    assert os.listdir(tmp_path) == []


def test_save_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_image(tmp_path / "x.png", np.zeros((4, 4), np.float32))


def test_check_output_path_creates_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c" / "out.jpg"
    assert check_output_path(str(target)) == target
    assert target.parent.is_dir()
    assert os.listdir(target.parent) == []  # the write probe cleaned up after itself


def test_check_output_path_under_a_file(tmp_path: Path) -> None:
    # Fails for root too, unlike a permission-based test.
    blocker = tmp_path / "plain.txt"
    blocker.write_text("x")
    with pytest.raises(ImageError) as caught:
        check_output_path(blocker / "sub" / "out.png")
    assert "\n" not in str(caught.value) and "plain.txt" in str(caught.value)


def test_check_output_path_rejects_a_folder(tmp_path: Path) -> None:
    (tmp_path / "out.png").mkdir()
    with pytest.raises(ImageError, match="folder"):
        check_output_path(tmp_path / "out.png")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_path_unwritable_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ImageError, match="locked"):
            check_output_path(locked / "out.png")
    finally:
        locked.chmod(0o700)


# -------------------------------------------------------------------- property test


def _sample_encodings() -> list[bytes]:
    rng = np.random.default_rng(12)
    picture = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    encoded = []
    for image_format in ("PNG", "JPEG", "GIF"):
        buffer = io.BytesIO()
        picture.save(buffer, image_format)
        encoded.append(buffer.getvalue())
    return encoded


SAMPLES = _sample_encodings()


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 6))):
        # Headers hold sizes, lengths and modes, where damage is most interesting.
        position = draw(st.one_of(st.integers(0, 40), st.integers(0, len(data))))
        position = min(position, len(data))
        action = draw(st.sampled_from(["set", "cut", "insert"]))
        if action == "set" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            data = data[: max(position, 1)]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    content=st.one_of(st.binary(max_size=512), damaged_files()),
    suffix=st.sampled_from([".png", ".jpg", ".gif", ".bin"]),
)
def test_any_bytes_load_or_fail_cleanly(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    try:
        out = load_image(path, max_pixels=1_000_000)
    except ImageError as error:
        assert "\n" not in str(error) and path.name in str(error)
    else:
        _assert_valid(out)
