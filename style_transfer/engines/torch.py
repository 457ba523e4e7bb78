"""The PyTorch engine: the Caffe net rebuilt from torch operations; only the input gets a gradient."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from style_transfer.caffe_model.net import Layer, Net, concat_axis, conv_geometry, pool_geometry
from style_transfer.engines.base import Engine, Evaluation
from style_transfer.errors import EngineError, ModelError
from style_transfer.losses import Objective, content_loss_torch, style_loss_torch, tv_loss_torch


def resolve_device(gpu: int) -> tuple[torch.device, str | None]:
    """The torch device for the original `-g` flag, and a notice when the default GPU 0 falls back to the CPU."""
    if gpu < 0:
        return torch.device("cpu"), None
    if not torch.cuda.is_available():
        if gpu == 0:
            return torch.device("cpu"), "CUDA is not available; running on the CPU (use -g -1 to say so)"
        raise EngineError(f"GPU {gpu} requested but CUDA is not available (use -g -1 for the CPU)")
    count = torch.cuda.device_count()
    if gpu >= count:
        raise EngineError(f"GPU {gpu} does not exist; this machine has {count} CUDA device(s): 0..{count - 1}")
    return torch.device("cuda", gpu), None


class _Op:
    """One layer as a torch function of its input tensors."""

    def __init__(self, layer: Layer, pooling: str | None, weights: list[torch.Tensor]) -> None:
        self.layer = layer
        self.run = self._build(layer, pooling, weights)

    @staticmethod
    def _build(layer: Layer, pooling: str | None, weights: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        t = layer.type
        if t == "Convolution":
            g = conv_geometry(layer)
            weight = weights[0]
            bias = weights[1] if g.bias else None
            return lambda xs: F.conv2d(xs[0], weight, bias, g.stride, g.pad, g.dilation, g.group)
        if t == "ReLU":
            slope = float(layer.params.negative_slope) if layer.params is not None else 0.0
            if slope:
                return lambda xs: F.leaky_relu(xs[0], slope)
            return lambda xs: F.relu(xs[0])
        if t == "Pooling":
            p = pool_geometry(layer, pooling)

            def pool(xs: list[torch.Tensor]) -> torch.Tensor:
                x = xs[0]
                kernel, stride, pad = p.kernel, p.stride, p.pad
                if p.global_pooling:
                    kernel = (int(x.shape[2]), int(x.shape[3]))
                if p.method == "max":
                    return F.max_pool2d(x, kernel, stride, pad, ceil_mode=True)
                # Caffe divides by the window clipped to the padded input, padding included: torch's
                # count_include_pad with ceil_mode computes exactly that divisor.
                return F.avg_pool2d(x, kernel, stride, pad, ceil_mode=True, count_include_pad=True)

            return pool
        if t == "LRN":
            lp = layer.params
            size, alpha, beta, k = int(lp.local_size), float(lp.alpha), float(lp.beta), float(lp.k)
            if size % 2 == 0:
                raise ModelError(f"layer {layer.name!r}: LRN local_size must be odd, got {size}")
            if lp.norm_region == 0:
                return lambda xs: F.local_response_norm(xs[0], size, alpha, beta, k)

            def within(xs: list[torch.Tensor]) -> torch.Tensor:
                x = xs[0]
                mean_sq = F.avg_pool2d(x * x, size, 1, (size - 1) // 2, count_include_pad=True)
                return x * (1.0 + alpha * mean_sq).pow(-beta)

            return within
        if t == "Concat":
            axis = concat_axis(layer)
            return lambda xs: torch.cat(xs, dim=axis)
        if t in ("Dropout", "Split"):
            return lambda xs: xs[0]
        raise ModelError(f"layer {layer.name!r} has type {t!r}, which the torch engine cannot run")


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, net: Net, pooling: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(net, pooling, str(device))
        self.torch_device = torch.device(device)
        # float64 exists for gradient checks against finite differences; runs use float32.
        self.dtype = dtype
        override = None if pooling == "file" else pooling
        self._ops: list[_Op] = []
        for layer in net.layers:
            weights = [self._tensor(w) for w in net.weights.get(layer.name, [])]
            self._ops.append(_Op(layer, override, weights))
        self._objective: Objective | None = None
        self._content: dict[str, torch.Tensor] = {}
        self._style: dict[str, torch.Tensor] = {}
        self._blend = torch.ones(1)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.torch_device, dtype=self.dtype)

    def _forward(self, x: torch.Tensor, blobs: Sequence[str]) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {self.net.input_name: x}
        wanted = set(blobs)
        last = _last_needed(self._ops, wanted)
        for _i, op in enumerate(self._ops[: last + 1]):
            outs = op.run([values[b] for b in op.layer.bottoms])
            for top in op.layer.tops:
                values[top] = outs
        return {b: values[b][0] for b in blobs}

    def features(self, image: np.ndarray, blobs: Sequence[str]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self._forward(self._tensor(image)[None], blobs)
            return {b: v.detach().cpu().numpy() for b, v in out.items()}

    def set_objective(self, objective: Objective) -> None:
        self._objective = objective
        self._content = {k: self._tensor(v) for k, v in objective.content_targets.items()}
        self._style = {k: self._tensor(v) for k, v in objective.style_targets.items()}
        self._blend = self._tensor(objective.style_blend)

    def evaluate(self, image: np.ndarray) -> Evaluation:
        obj = self._objective
        if obj is None:
            raise RuntimeError("set_objective must be called before evaluate")
        x = self._tensor(image)
        x.requires_grad_(True)
        feats = self._forward(x[None], obj.layers)
        terms: dict[str, torch.Tensor] = {}
        for layer, w in obj.style_weights.items():
            terms[f"style:{layer}"] = (obj.ratio * w) * style_loss_torch(feats[layer], self._style[layer],
                                                                          self._blend)
        for layer, w in obj.content_weights.items():
            terms[f"content:{layer}"] = w * content_loss_torch(feats[layer], self._content[layer])
        style = sum((v for k, v in terms.items() if k.startswith("style:")), torch.zeros((), device=x.device))
        content = sum((v for k, v in terms.items() if k.startswith("content:")), torch.zeros((), device=x.device))
        tv = obj.tv_weight * tv_loss_torch(x) if obj.tv_weight else torch.zeros((), device=x.device)
        total = style + content + tv
        (grad,) = torch.autograd.grad(total, x)
        values = {k: float(v.detach()) for k, v in terms.items()}
        return Evaluation(loss=float(total.detach()), grad=grad.detach().cpu().numpy(),
                          style_loss=float(style.detach()), content_loss=float(content.detach()),
                          tv_loss=float(tv.detach()), layers=values)


def _last_needed(ops: list[_Op], wanted: set[str]) -> int:
    last = -1
    for i, op in enumerate(ops):
        if wanted.intersection(op.layer.tops):
            last = i
    return last
