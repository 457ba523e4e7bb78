"""Colour control: keep the content's colours (luminance-only transfer) or recolour the style to match the content."""

from __future__ import annotations

import numpy as np

from style_transfer.errors import StyleTransferError

# ITU-R BT.601 luma and the YIQ chroma axes, as in Gatys et al. (2017) "Controlling perceptual factors".
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.595716, -0.274453, -0.321263],
                        [0.211456, -0.522591, 0.311135]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)

COLOR_MATCH_MODES = ("none", "meancov", "histogram")


def original_colors(stylized: np.ndarray, content: np.ndarray) -> np.ndarray:
    """The stylized image's luminance with the content's chroma (both H x W x 3 RGB in [0, 1], same size)."""
    if stylized.shape != content.shape:
        raise ValueError(f"shapes differ: {stylized.shape} vs {content.shape}")
    y = stylized.astype(np.float64) @ _RGB_TO_YIQ[0]
    iq = content.astype(np.float64) @ _RGB_TO_YIQ[1:].T
    yiq = np.concatenate([y[..., None], iq], axis=-1)
    return np.clip(yiq @ _YIQ_TO_RGB.T, 0.0, 1.0).astype(np.float32)


def match_colors(style: np.ndarray, content: np.ndarray, mode: str = "meancov") -> np.ndarray:
    """The style image recoloured so its colour statistics match the content's.

    "meancov": an affine map giving the style pixels the content's mean and covariance (the symmetric square-root
    solution, which changes colours least); "histogram": each RGB channel's histogram matched to the content's.
    """
    if mode == "none":
        return style
    if mode == "meancov":
        s = style.reshape(-1, 3).astype(np.float64)
        c = content.reshape(-1, 3).astype(np.float64)
        mu_s, mu_c = s.mean(0), c.mean(0)
        # A touch of ridge keeps flat (e.g. grayscale) images invertible without visibly changing others.
        cov_s = np.cov(s, rowvar=False)
        cov_s += 1e-6 * (np.trace(cov_s) / 3 + 1e-12) * np.eye(3)
        cov_c = np.cov(c, rowvar=False)
        transform = _sqrtm(cov_c) @ np.linalg.inv(_sqrtm(cov_s))
        out = (s - mu_s) @ transform.T + mu_c
        return np.clip(out, 0.0, 1.0).reshape(style.shape).astype(np.float32)
    if mode == "histogram":
        out = np.empty_like(style, dtype=np.float32)
        for ch in range(3):
            src = style[..., ch].ravel()
            ref = np.sort(content[..., ch].ravel())
            ranks = np.argsort(np.argsort(src, kind="stable"), kind="stable")
            quantiles = (ranks + 0.5) / src.size
            out[..., ch] = np.interp(quantiles, (np.arange(ref.size) + 0.5) / ref.size, ref).reshape(
                style.shape[:2])
        return out
    raise StyleTransferError(f"--color-match must be one of {', '.join(COLOR_MATCH_MODES)}, got {mode!r}")


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
