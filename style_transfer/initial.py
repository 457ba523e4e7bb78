"""Starting images for the optimisation: the content, a content/style mix, 1/f^N noise, or a file."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pink_noise(height: int, width: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """RGB noise in [0, 1] whose amplitude spectrum falls as 1/f^exponent (0: white noise, 1: pink, 2: brown).

    The original drew such noise for its numeric --init; random phases under a power-law amplitude give a
    natural-image-like start. options.py has checked that `exponent` is finite and >= 0.
    """
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freq = np.sqrt(fy * fy + fx * fx)
    freq[0, 0] = 1.0
    amplitude = freq ** (-exponent)
    amplitude[0, 0] = 0.0  # no DC: the mean is set by the normalisation below
    # One draw of three planes takes the same numbers from `rng` as three draws of one, so seeds keep their images.
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(3, *amplitude.shape))
    noise = np.moveaxis(np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width)), 0, -1)
    noise -= noise.min()
    peak = noise.max()
    if peak > 0:
        noise /= peak
    return np.ascontiguousarray(noise, dtype=np.float32)


def initial_image(init: str | float | np.ndarray, content: np.ndarray, styles: Sequence[np.ndarray],
                  blend: np.ndarray, seed: int | None) -> np.ndarray:
    """The starting image at the content's size: the content, the mix, 1/f^N noise, or a given image resized."""
    from style_transfer import images

    h, w = content.shape[:2]
    if isinstance(init, np.ndarray):
        return images.resize_to(init, h, w)
    if init == "content":
        return content
    if init == "mixed":  # the original's: 95% content, 5% of the main style resized to the content's size
        style = images.resize_to(styles[int(np.argmax(blend))], h, w)
        return (0.95 * content + 0.05 * style).astype(np.float32)
    return pink_noise(h, w, float(init), np.random.default_rng(seed))
