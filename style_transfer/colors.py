"""Colour control: keep the content's colours (luminance-only transfer) or recolour the style to match the content."""

from __future__ import annotations

import numpy as np
from skimage import color, exposure

from style_transfer.errors import StyleTransferError

COLOR_MATCH_MODES = ("none", "meancov", "histogram")


def original_colors(stylized: np.ndarray, content: np.ndarray) -> np.ndarray:
    """The stylized image's luminance with the content's chroma (both H x W x 3 RGB in [0, 1], same size).

    Luminance is ITU-R BT.601 luma (the Y of YIQ), chroma the I and Q of YIQ, as in Gatys et al. (2017)
    "Controlling perceptual factors in neural style transfer".
    """
    if stylized.shape != content.shape:
        raise ValueError(f"shapes differ: {stylized.shape} vs {content.shape}")
    # float64 so that skimage computes in double precision; it would keep float32 inputs in float32.
    y = color.rgb2yiq(stylized.astype(np.float64))[..., :1]
    iq = color.rgb2yiq(content.astype(np.float64))[..., 1:]
    rgb = color.yiq2rgb(np.concatenate([y, iq], axis=-1))
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def match_colors(style: np.ndarray, content: np.ndarray, mode: str = "meancov") -> np.ndarray:
    """The style image recoloured so its colour statistics match the content's.

    "meancov": an affine map giving the style pixels the content's mean and covariance (the symmetric square-root
    solution, which changes colours least); "histogram": each RGB channel's histogram matched to the content's
    (skimage.exposure.match_histograms: equal style values stay equal, each goes to the content value at the
    same cumulative share of pixels).
    """
    if mode == "none":
        return style
    if mode == "meancov":
        s = style.reshape(-1, 3).astype(np.float64)
        c = content.reshape(-1, 3).astype(np.float64)
        # A touch of ridge keeps flat (e.g. grayscale) images invertible without visibly changing others.
        cov_s = np.cov(s, rowvar=False)
        cov_s += 1e-6 * (np.trace(cov_s) / 3 + 1e-12) * np.eye(3)
        transform = _sqrtm(np.cov(c, rowvar=False)) @ np.linalg.inv(_sqrtm(cov_s))
        out = (s - s.mean(0)) @ transform.T + c.mean(0)
        return np.clip(out, 0.0, 1.0).reshape(style.shape).astype(np.float32)
    if mode == "histogram":
        matched = exposure.match_histograms(style, content, channel_axis=-1)
        return np.asarray(matched, dtype=np.float32)
    raise StyleTransferError(f"--color-match must be one of {', '.join(COLOR_MATCH_MODES)}, got {mode!r}")


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
