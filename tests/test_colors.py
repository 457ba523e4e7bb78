"""Tests for style_transfer.colors: original colours (luminance-only transfer) and colour matching."""

from __future__ import annotations

import numpy as np
import pytest

from style_transfer.colors import COLOR_MATCH_MODES, match_colors, original_colors
from style_transfer.errors import StyleTransferError

# Written out here rather than taken from the code under test: ITU-R BT.601 luma and the YIQ chroma axes as
# given by Gatys et al. (2017). Other published YIQ variants round the I and Q rows differently but share the
# luma row and the grey axis, so luma-only transfer gives the same result with any of them.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ RGB_TO_YIQ[0]


def _chroma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ RGB_TO_YIQ[1:].T


# ------------------------------------------------------------------------------------------- original colours


def test_original_colors_keeps_content_chroma() -> None:
    rng = np.random.default_rng(3)
    stylized = rng.uniform(0.2, 0.8, (10, 12, 3))
    content = rng.uniform(0.3, 0.7, (10, 12, 3))
    out = original_colors(stylized.astype(np.float32), content.astype(np.float32))
    np.testing.assert_allclose(out @ RGB_TO_YIQ[1:].T, content @ RGB_TO_YIQ[1:].T, atol=1e-5)
    np.testing.assert_allclose(out @ RGB_TO_YIQ[0], stylized @ RGB_TO_YIQ[0], atol=1e-5)


def test_original_colors_exact_where_not_clipped() -> None:
    rng = np.random.default_rng(11)
    stylized = rng.uniform(0.0, 1.0, (24, 32, 3)).astype(np.float32)
    content = rng.uniform(0.0, 1.0, (24, 32, 3)).astype(np.float32)
    out = original_colors(stylized, content)
    assert out.dtype == np.float32 and out.shape == content.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    inside = ((out > 0.0) & (out < 1.0)).all(axis=-1)
    # The full range makes some pixels leave the RGB cube, so both kinds are present.
    assert 0.2 < inside.mean() < 1.0
    # Exact up to float32 rounding of the output.
    np.testing.assert_allclose(_chroma(out)[inside], _chroma(content)[inside], rtol=0, atol=1e-6)
    np.testing.assert_allclose(_luma(out)[inside], _luma(stylized)[inside], rtol=0, atol=1e-6)


def test_original_colors_moves_content_along_the_grey_axis() -> None:
    # With chroma fixed, only the grey component can change: the content plus the luma difference in every
    # channel.
    content = np.array([[[0.2, 0.5, 0.3], [0.6, 0.4, 0.5]]], dtype=np.float32)
    stylized = np.array([[[0.5, 0.5, 0.5], [0.1, 0.3, 0.2]]], dtype=np.float32)
    expected = content + (_luma(stylized) - _luma(content))[..., None]
    assert expected.min() > 0.0 and expected.max() < 1.0
    np.testing.assert_allclose(original_colors(stylized, content), expected, rtol=0, atol=1e-6)


def test_original_colors_of_itself_is_itself() -> None:
    image = np.random.default_rng(5).uniform(0, 1, (8, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(original_colors(image, image), image, rtol=0, atol=1e-6)


def test_original_colors_needs_equal_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        original_colors(np.zeros((4, 5, 3), np.float32), np.zeros((5, 4, 3), np.float32))


# ------------------------------------------------------------------------------------------- colour matching


def test_color_match_statistics() -> None:
    rng = np.random.default_rng(4)
    # Ranges chosen so the colour map needs no clipping to [0, 1].
    style = rng.uniform(0.4, 0.6, (20, 20, 3)).astype(np.float32) * [1.0, 0.9, 0.8]
    content = rng.uniform(0.3, 0.7, (16, 24, 3)).astype(np.float32)
    matched = match_colors(style.astype(np.float32), content, "meancov").reshape(-1, 3)
    np.testing.assert_allclose(matched.mean(0), content.reshape(-1, 3).mean(0), atol=1e-4)
    np.testing.assert_allclose(np.cov(matched, rowvar=False), np.cov(content.reshape(-1, 3), rowvar=False), atol=1e-4)
    hist = match_colors(style.astype(np.float32), content, "histogram")
    for ch in range(3):
        assert np.median(hist[..., ch]) == pytest.approx(np.median(content[..., ch]), abs=0.02)


def test_meancov_gives_content_mean_and_covariance() -> None:
    rng = np.random.default_rng(8)
    # Correlated channels on both sides, in ranges that need no clipping to [0, 1].
    mix_s = np.array([[1.0, 0.4, 0.1], [0.0, 0.8, 0.3], [0.2, 0.0, 0.6]])
    mix_c = np.array([[0.5, -0.2, 0.0], [0.3, 0.6, 0.0], [0.0, 0.3, 0.4]])
    style = (0.5 + 0.1 * rng.standard_normal((30, 40, 3)) @ mix_s.T).astype(np.float32)
    content = (0.5 + 0.1 * rng.standard_normal((25, 20, 3)) @ mix_c.T).astype(np.float32)
    matched = match_colors(style, content, "meancov")
    assert matched.shape == style.shape and matched.dtype == np.float32
    assert matched.min() > 0.0 and matched.max() < 1.0
    pixels = matched.reshape(-1, 3).astype(np.float64)
    reference = content.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(pixels.mean(0), reference.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.cov(pixels, rowvar=False), np.cov(reference, rowvar=False), rtol=0, atol=1e-6)


def test_histogram_equal_sizes_gives_reference_values_in_source_order() -> None:
    rng = np.random.default_rng(6)
    style = rng.uniform(0, 1, (12, 10, 3)).astype(np.float32)
    content = (rng.uniform(0, 1, (8, 15, 3)) ** 2).astype(np.float32)  # same pixel count, another shape
    matched = match_colors(style, content, "histogram")
    assert matched.shape == style.shape and matched.dtype == np.float32
    for ch in range(3):
        src, out = style[..., ch].ravel(), matched[..., ch].ravel()
        # Exactly the reference's values, and the k-th darkest style pixel gets the k-th darkest value.
        np.testing.assert_array_equal(out[np.argsort(src)], np.sort(content[..., ch].ravel()))


def test_histogram_gives_reference_quantiles() -> None:
    rng = np.random.default_rng(7)
    style = rng.uniform(0, 1, (10, 10, 3)).astype(np.float32)
    content = rng.beta(2, 5, (20, 20, 3)).astype(np.float32)  # four reference pixels per style pixel
    matched = match_colors(style, content, "histogram")
    for ch in range(3):
        ref = np.sort(content[..., ch].ravel())
        # The k-th of n style pixels takes the reference value with the share (k + 1) / n of pixels at or
        # below it, the (4k + 4)-th of 4n.
        np.testing.assert_array_equal(np.sort(matched[..., ch].ravel()), ref[3::4])


def test_histogram_keeps_equal_values_equal() -> None:
    rng = np.random.default_rng(9)
    style = rng.uniform(0, 1, (10, 10, 3)).astype(np.float32)
    style[:4, :5] = 1.0  # a clipped highlight: twenty tied pixels in every channel
    content = rng.uniform(0, 1, (10, 10, 3)).astype(np.float32)
    matched = match_colors(style, content, "histogram")
    for ch in range(3):
        # All of them go to one value, the reference's brightest, whatever their position.
        assert np.unique(matched[:4, :5, ch]).tolist() == [content[..., ch].max()]


def test_histogram_channels_are_independent() -> None:
    rng = np.random.default_rng(10)
    style = rng.uniform(0, 1, (9, 9, 3)).astype(np.float32)
    content = rng.uniform(0, 1, (9, 9, 3)).astype(np.float32)
    swapped = match_colors(style[..., ::-1].copy(), content[..., ::-1].copy(), "histogram")
    np.testing.assert_array_equal(swapped[..., ::-1], match_colors(style, content, "histogram"))


def test_none_returns_style_unchanged() -> None:
    style = np.random.default_rng(1).uniform(0, 1, (5, 6, 3)).astype(np.float32)
    assert match_colors(style, np.zeros((4, 4, 3), np.float32), "none") is style


def test_unknown_mode_is_a_user_error() -> None:
    assert COLOR_MATCH_MODES == ("none", "meancov", "histogram")
    with pytest.raises(StyleTransferError, match="--color-match must be one of none, meancov, histogram"):
        match_colors(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 3), np.float32), "lab")
