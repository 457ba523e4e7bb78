"""The objective of Gatys et al. as the original tool wrote it, in PyTorch (autograd) and NumPy (explicit gradients).

Per style layer with C channels and H x W positions, F the C x HW features and G = F F^T (not normalised):
    ratio * w / (4 C^2 (HW)^2) * sum_s b_s * sum (G - A_s)^2       (A_s: Gram matrix of style image s, b_s its blend)
Per content layer:
    w / 2 * sum (F - P)^2                                          (P: the content image's features)
Total variation of the image x (3 x H x W), optional:
    tv * sum ((x[:, i+1, j] - x[:, i, j])^2 + (x[:, i, j+1] - x[:, i, j])^2)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Objective:
    """Targets and weights; the engines read it and keep their own copies of the targets."""

    content_weights: dict[str, float]
    style_weights: dict[str, float]
    ratio: float
    content_targets: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> C x H x W
    style_targets: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> S x C x C
    style_blend: np.ndarray = field(default_factory=lambda: np.ones(1, dtype=np.float64))  # S weights, sum 1
    tv_weight: float = 0.0

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([*self.style_weights, *self.content_weights]))


def gram_numpy(features: np.ndarray) -> np.ndarray:
    f = features.reshape(features.shape[0], -1)
    return f @ f.T


def gram_torch(features: torch.Tensor) -> torch.Tensor:
    f = features.reshape(features.shape[0], -1)
    return f @ f.T


def style_scale(features_shape: tuple[int, ...]) -> float:
    c = features_shape[0]
    hw = int(np.prod(features_shape[1:]))
    return 1.0 / (4.0 * c * c * hw * hw)


def style_loss_torch(features: torch.Tensor, targets: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
    """Unweighted per-layer style loss; targets S x C x C, blend S."""
    diff = gram_torch(features).unsqueeze(0) - targets
    per_style = diff.pow(2).sum(dim=(1, 2))
    return style_scale(tuple(features.shape)) * (per_style * blend).sum()


def content_loss_torch(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (features - target).pow(2).sum()


def tv_loss_torch(image: torch.Tensor) -> torch.Tensor:
    dh = image[:, 1:, :] - image[:, :-1, :]
    dw = image[:, :, 1:] - image[:, :, :-1]
    return dh.pow(2).sum() + dw.pow(2).sum()


def style_loss_numpy(features: np.ndarray, targets: np.ndarray, blend: np.ndarray) -> tuple[float, np.ndarray]:
    """Unweighted per-layer style loss and its gradient with respect to `features` (same shape)."""
    c = features.shape[0]
    f = features.reshape(c, -1)
    diff = (f @ f.T)[None] - targets
    scale = style_scale(features.shape)
    loss = scale * float(np.sum(blend * np.sum(np.square(diff, dtype=np.float64), axis=(1, 2))))
    weighted = np.tensordot(blend.astype(features.dtype), diff, axes=1)
    # d/dF sum (G - A)^2 = 4 (G - A) F for symmetric G - A.
    grad = (4.0 * scale) * (weighted @ f)
    return loss, grad.reshape(features.shape).astype(features.dtype, copy=False)


def content_loss_numpy(features: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    diff = features - target
    return 0.5 * float(np.sum(np.square(diff, dtype=np.float64))), diff


def tv_loss_numpy(image: np.ndarray) -> tuple[float, np.ndarray]:
    dh = image[:, 1:, :] - image[:, :-1, :]
    dw = image[:, :, 1:] - image[:, :, :-1]
    loss = float(np.sum(np.square(dh, dtype=np.float64)) + np.sum(np.square(dw, dtype=np.float64)))
    grad = np.zeros_like(image)
    grad[:, 1:, :] += 2 * dh
    grad[:, :-1, :] -= 2 * dh
    grad[:, :, 1:] += 2 * dw
    grad[:, :, :-1] -= 2 * dw
    return loss, grad
