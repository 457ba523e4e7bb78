"""What every engine offers: features of an image, and the objective's value and input gradient."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from style_transfer.caffe_model.net import Net

if TYPE_CHECKING:  # the CLI imports this module before torch loads (see style_transfer/openmp.py)
    import torch

    from style_transfer.losses import Objective, TorchTargets

# Blob values (1 x C x H x W tensors) -> (named loss terms, gradient of their sum with respect to some of the blobs,
# same shapes). What `Engine.vjp` injects into the net's backward pass.
FeatureGrads = Callable[["dict[str, torch.Tensor]"], "tuple[dict[str, float], dict[str, torch.Tensor]]"]
# A scalar function of the 3 x H x W input tensor whose gradient is added to the input gradient (total variation).
InputTerm = Callable[["torch.Tensor"], "torch.Tensor"]

# Arithmetic of the torch engine's convolutions: float32, or bfloat16/float16 autocast with Gram matrices in float32.
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Evaluation:
    loss: float
    grad: np.ndarray  # float32, 3 x H x W, d loss / d image
    style_loss: float  # ratio and layer weights included
    content_loss: float
    tv_loss: float
    layers: dict[str, float]  # per-layer weighted terms, keys "style:<blob>" and "content:<blob>"
    temporal_loss: float = 0.0  # the video's temporal term (losses.temporal_loss_torch), weight included

    @classmethod
    def of(cls, layers: dict[str, float], tv_loss: float, grad: np.ndarray,
           temporal_loss: float = 0.0) -> Evaluation:
        """The evaluation whose style and content losses are the sums of the per-layer terms."""
        style = sum((v for k, v in layers.items() if k.startswith("style:")), 0.0)
        content = sum((v for k, v in layers.items() if k.startswith("content:")), 0.0)
        return cls(style + content + tv_loss + temporal_loss, grad, style, content, tv_loss, layers, temporal_loss)


class Evaluator(ABC):
    """An objective bound to an engine: the objective's value and input gradient at any image size. It holds its
    own copies of the targets, so evaluators bound from one engine may be used in turn."""

    @abstractmethod
    def evaluate(self, image: np.ndarray) -> Evaluation:
        """Objective value and its gradient with respect to the preprocessed 3 x H x W image."""

    def __call__(self, image: np.ndarray) -> Evaluation:
        return self.evaluate(image)


class FeatureGradEvaluator(Evaluator):
    """An objective on `Engine.vjp`: the net runs forward, losses.py gives the terms and their feature gradients,
    and the engine's backward pass takes those to the input. `targets` are tensors the engine's blobs can meet."""

    def __init__(self, engine: Engine, objective: Objective, targets: TorchTargets, dtype: torch.dtype) -> None:
        self.engine, self.objective, self.targets, self.dtype = engine, objective, targets, dtype

    def evaluate(self, image: np.ndarray) -> Evaluation:
        from style_transfer.losses import PixelTerms, terms_and_feature_grads  # loads torch, which an engine has

        obj = self.objective
        pixels = PixelTerms(obj, self.targets)
        terms, _, grad = self.engine.vjp(image, obj.layers,
                                         lambda feats: terms_and_feature_grads(obj, self.targets, feats, self.dtype),
                                         pixels.term if pixels.any else None)
        return Evaluation.of(terms, pixels.value("tv"), grad, pixels.value("temporal"))


class Engine(ABC):
    """A net ready to run on one device. `net` has weights attached and may be truncated to the blobs in use."""

    name: str = "?"
    precision: str = "fp32"

    def __init__(self, net: Net, pooling: str, device: str) -> None:
        self.net = net
        self.pooling = pooling
        self.device = device

    @abstractmethod
    def features(self, image: np.ndarray, blobs: Sequence[str]) -> dict[str, np.ndarray]:
        """Blob values (C x H x W float32) for a preprocessed 3 x H x W image."""

    @abstractmethod
    def bind(self, objective: Objective) -> Evaluator:
        """An evaluator of `objective` on this engine."""

    @abstractmethod
    def vjp(self, image: np.ndarray, blobs: Sequence[str], fn: FeatureGrads,
            input_term: InputTerm | None = None) -> tuple[dict[str, float], float, np.ndarray]:
        """Forward a preprocessed 3 x H x W image to `blobs`, let `fn` turn their values into loss terms and feature
        gradients, and backpropagate those gradients to the input: returns (`fn`'s terms, the value of
        `input_term`, or 0, and the float32 3 x H x W input gradient, `input_term`'s included).

        `fn` sees each blob as a 1 x C x H x W tensor in the engine's memory layout, valid only during the call (the
        Caffe engine's are views of its blobs), and must not write to them. Every evaluator is built on this, and
        so is the tiled evaluation (tiling.py), which injects the gradients of a tile's interior positions only."""
