"""The objective of Gatys, Ecker & Bethge (2016, "Image Style Transfer Using Convolutional Neural Networks") as the
original Caffe tool (Frank Liu's style.py) wrote it, in two forms: torch expressions for autograd (the plain
formulation), and torch with hand-written feature gradients, which both engines run (the Caffe engine on its blobs'
memory, without a copy).

Per style layer with C channels and H x W positions, F the C x HW features and G = F F^T (not normalised):
    ratio * w / (4 C^2 (HW)^2) * sum_s b_s * sum (G - A_s)^2       (A_s: Gram matrix of style image s, b_s its blend)
Per content layer:
    w / 2 * sum (F - P)^2                                          (P: the content image's features)
Total variation of the image x (3 x H x W), optional:
    tv * sum ((x[:, i+1, j] - x[:, i, j])^2 + (x[:, i, j+1] - x[:, i, j])^2)
Temporal consistency of a video frame x with the previous stylized frame warped onto it, w, optional:
    temporal * sum_{c, i, j} m[i, j] (x[c, i, j] - w[c, i, j])^2    (m: 1 where the flow is reliable, 0 elsewhere)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Objective:
    """Targets and weights; each evaluator bound to it keeps its own copies of the targets."""

    content_weights: dict[str, float]
    style_weights: dict[str, float]
    ratio: float
    content_targets: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> C x H x W
    style_targets: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> S x C x C
    style_blend: np.ndarray = field(default_factory=lambda: np.ones(1, dtype=np.float64))  # S weights, sum 1
    tv_weight: float = 0.0
    # Ruder et al.'s short-term temporal term (see temporal_loss_torch); off unless all three are set.
    temporal_weight: float = 0.0
    temporal_target: np.ndarray | None = None  # 3 x H x W, preprocessed like the image
    temporal_mask: np.ndarray | None = None  # H x W weights in [0, 1]

    @property
    def has_temporal(self) -> bool:
        return bool(self.temporal_weight) and self.temporal_target is not None and self.temporal_mask is not None

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([*self.style_weights, *self.content_weights]))


def gram_numpy(features: np.ndarray) -> np.ndarray:
    """G = F F^T of C x H x W features, not normalised (as the original)."""
    f = features.reshape(features.shape[0], -1)
    return f @ f.T


def style_scale(features_shape: tuple[int, ...]) -> float:
    """1 / (4 C^2 (HW)^2): the original's c/4 with c = 1 / (N_l^2 M_l^2), Gatys et al.'s E_l normalisation."""
    c = features_shape[0]
    hw = int(np.prod(features_shape[1:]))
    return 1.0 / (4.0 * c * c * hw * hw)


def style_loss_torch(features: torch.Tensor, targets: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
    """Unweighted style loss of one layer, 1 / (4 C^2 (HW)^2) * sum_s b_s sum (G - A_s)^2; targets S x C x C,
    blend S (Gatys et al. eq. 4; style.py's `_compute_style_gradient`)."""
    f = features.reshape(features.shape[0], -1)
    diff = (f @ f.T).unsqueeze(0) - targets
    per_style = diff.pow(2).sum(dim=(1, 2))
    return style_scale(tuple(features.shape)) * (per_style * blend).sum()


def content_loss_torch(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unweighted content loss of one layer, 1/2 sum (F - P)^2 (Gatys et al. eq. 1; style.py's
    `_compute_content_gradient`)."""
    return 0.5 * (features - target).pow(2).sum()


def tv_loss_torch(image: torch.Tensor) -> torch.Tensor:
    """Unweighted total variation, the sum of squared differences of vertical and horizontal neighbours (the
    beta = 2 regulariser of Mahendran & Vedaldi 2015, without the square root)."""
    dh = image[:, 1:, :] - image[:, :-1, :]
    dw = image[:, :, 1:] - image[:, :, :-1]
    return dh.pow(2).sum() + dw.pow(2).sum()


def temporal_loss_torch(image: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unweighted temporal loss, sum m (x - w)^2 over channels and pixels: Ruder, Dosovitskiy & Brox 2016
    ("Artistic style transfer for videos", eq. 7) with the same mask c on every channel, on the preprocessed
    (0-255) scale. The paper divides by the number of values; this sum does not, like the content and TV terms
    here, so that the term keeps its balance with the content term at any frame size."""
    return (mask * (image - target).pow(2)).sum()


def temporal_term_torch(obj: Objective, targets: TorchTargets, image: torch.Tensor) -> torch.Tensor | None:
    """The weighted temporal term of `image` (3 x H x W), or None when the objective has none."""
    if targets.temporal is None:
        return None
    target, mask = targets.temporal
    if target.shape != image.shape:
        raise ValueError(f"temporal target {tuple(target.shape)} does not match the image {tuple(image.shape)}")
    return obj.temporal_weight * temporal_loss_torch(image, target.to(image.dtype), mask.to(image.dtype))


class PixelTerms:
    """The objective's terms on the image itself (total variation, the temporal term) as one input term for
    `Engine.vjp`, remembering each one's value for the report."""

    def __init__(self, obj: Objective, targets: TorchTargets) -> None:
        self.obj, self.targets = obj, targets
        self.any = bool(obj.tv_weight) or targets.temporal is not None
        self.values: dict[str, torch.Tensor] = {}

    def term(self, image: torch.Tensor) -> torch.Tensor:
        if self.obj.tv_weight:
            self.values["tv"] = self.obj.tv_weight * tv_loss_torch(image)
        temporal = temporal_term_torch(self.obj, self.targets, image)
        if temporal is not None:
            self.values["temporal"] = temporal
        return sum(self.values.values(), torch.zeros((), dtype=image.dtype, device=image.device))

    def value(self, name: str) -> float:
        return float(self.values[name].detach()) if name in self.values else 0.0


@dataclass(frozen=True)
class TorchTargets:
    """An objective's targets as tensors of one engine (device, dtype; the content targets in the memory layout of
    the features they meet, so differences run over contiguous memory)."""

    content: dict[str, torch.Tensor]  # 1 x C x H x W
    style: dict[str, torch.Tensor]  # S x C x C
    style_mean: dict[str, torch.Tensor]  # sum_s b_s A_s, C x C
    blend: torch.Tensor  # S
    blend_sum: float
    temporal: tuple[torch.Tensor, torch.Tensor] | None = None  # target 3 x H x W, mask H x W

    @classmethod
    def of(cls, objective: Objective, tensor: Callable[[np.ndarray], torch.Tensor],
           memory_format: torch.memory_format) -> TorchTargets:
        with torch.no_grad():
            content = {k: tensor(v).unsqueeze(0).contiguous(memory_format=memory_format)
                       for k, v in objective.content_targets.items()}
            style = {k: tensor(v) for k, v in objective.style_targets.items()}
            blend = tensor(objective.style_blend)
            # sum_s b_s (G - A_s) = (sum b) G - sum_s b_s A_s: the gradient needs only the blended target.
            style_mean = {k: torch.tensordot(blend, v, dims=1) for k, v in style.items()}
            temporal = None
            if objective.has_temporal:
                assert objective.temporal_target is not None and objective.temporal_mask is not None
                # np.array copies: the evaluator keeps targets of its own even where `tensor` would share memory.
                temporal = (tensor(np.array(objective.temporal_target)), tensor(np.array(objective.temporal_mask)))
        return cls(content, style, style_mean, blend, float(np.sum(objective.style_blend)), temporal)


def weighted_terms_torch(obj: Objective, targets: TorchTargets, feats: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each weighted term ("style:<blob>", "content:<blob>") as a torch expression of C x H x W features, for
    autograd: ratio * w * style_loss_torch, w * content_loss_torch."""
    terms: dict[str, torch.Tensor] = {}
    for layer, w in obj.style_weights.items():
        terms[f"style:{layer}"] = (obj.ratio * w) * style_loss_torch(feats[layer].to(dtype), targets.style[layer],
                                                                      targets.blend)
    for layer, w in obj.content_weights.items():
        terms[f"content:{layer}"] = w * content_loss_torch(feats[layer].to(dtype), targets.content[layer][0])
    return terms


def style_value_and_weight(gram: torch.Tensor, targets: TorchTargets, layer: str, s: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted style term s sum_s b_s sum (G - A_s)^2 of one layer from its Gram matrix G, and the matrix
    W = 4 s ((sum b) G - sum_s b_s A_s) with dL/dF = W F (F as C x HW). `gram` is overwritten by W. The Gram matrix
    may be a sum over parts of the positions (tiling.py): the gradient at any position needs only the whole G."""
    diff = gram.unsqueeze(0) - targets.style[layer]
    per_style = torch.linalg.vector_norm(diff, dim=(1, 2)) ** 2
    value = (per_style * targets.blend).sum() * s
    weighted = gram.mul_(targets.blend_sum).sub_(targets.style_mean[layer]).mul_(4.0 * s)
    return value, weighted


def terms_and_feature_grads(obj: Objective, targets: TorchTargets, feats: dict[str, torch.Tensor],
                            dtype: torch.dtype) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Each weighted term's value, and the gradient of the style and content terms with respect to each feature
    blob (1 x C x H x W, NCHW or NHWC), by blob name. `feats` are only read, never written.

    Differentiated by hand, as the original did: with s = ratio * w / (4 C^2 (HW)^2),
        d/dF  s sum_s b_s sum (G - A_s)^2 = 4 s ((sum b) G - sum_s b_s A_s) F      (G - A symmetric)
        d/dF  w/2 sum (F - P)^2 = w (F - P)
    One matrix product per style layer instead of autograd's two, and no graph through the Gram matrices. The
    Gram matrices of half-precision features are computed in `dtype`.
    """
    values: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer, w in obj.style_weights.items():
            f = feats[layer].detach().to(dtype)
            n, c, h, wd = f.shape
            s = style_scale((c, h, wd)) * obj.ratio * w
            nhwc = is_nhwc(f)
            # NHWC memory is an HW x C matrix: G = F^T F and dL/dF = F (4 s (G - A)) need no transposed copy.
            fm = f.permute(0, 2, 3, 1).reshape(n * h * wd, c) if nhwc else f.reshape(c, h * wd)
            gram = torch.mm(fm.t(), fm) if nhwc else torch.mm(fm, fm.t())
            values[f"style:{layer}"], weighted = style_value_and_weight(gram, targets, layer, s)
            if nhwc:
                grads[layer] = torch.mm(fm, weighted).reshape(n, h, wd, c).permute(0, 3, 1, 2)
            else:
                grads[layer] = torch.mm(weighted, fm).reshape(n, c, h, wd)
        for layer, w in obj.content_weights.items():
            f = feats[layer].detach().to(dtype)
            diff = f - targets.content[layer]
            values[f"content:{layer}"] = 0.5 * w * torch.linalg.vector_norm(diff) ** 2
            diff.mul_(w)
            grads[layer] = grads[layer].add_(diff) if layer in grads else diff
        # One transfer for all the values (one synchronisation on a GPU).
        numbers = torch.stack(list(values.values())).tolist() if values else []
    return dict(zip(values, (float(v) for v in numbers), strict=True)), grads


def is_nhwc(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also contiguous, as 1 x 1 maps are in both layouts)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

