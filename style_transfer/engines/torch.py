"""The PyTorch engine: the Caffe net rebuilt from torch operations; only the input gets a gradient.

Why the code is shaped as it is (each choice is a `Tuning` switch, measured in BENCHMARKS.md): an evaluation is a
forward pass and an input-gradient backward pass, nearly all of it convolution, so the aim is to spend as little
time as the convolutions allow, and nothing elsewhere.

- Winograd convolutions (NNPACK, CPU float32) for 3 x 3 stride-1 layers on feature maps large enough to repay
  NNPACK's per-call kernel transform: they need several times fewer multiplications than direct convolution. Used
  when such layers carry most of a net's work (VGG) and the net has no max pooling; the activations are then NCHW,
  as NNPACK requires.
- Otherwise activations are channels-last on the CPU: oneDNN's direct convolutions run at sgemm speed on NHWC and
  well below it on NCHW, especially for the wide, shallow early layers.
- The style and content terms are differentiated by hand (losses.terms_and_feature_grads) and the gradients are
  injected into autograd at the feature blobs: one matrix product per style layer instead of autograd's two, and no
  graph through the Gram matrices.
- Freed activations are kept by the C allocator instead of being returned to the kernel (glibc only, engines/cpu.py):
  otherwise each evaluation maps its activations afresh and pays a page fault per page.
- ReLUs run in place (a convolution's input gradient needs its weights, not its output): less memory.
- Across-channel LRN is a 1 x 1 convolution with a banded matrix instead of torch's 5-D pooling.
- On CUDA: cuDNN autotuning, TF32 convolutions, and opt-in bf16/fp16 autocast with float32 Gram matrices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from style_transfer import flops
from style_transfer.caffe_model.layers import RUNNABLE, Layer, concat_axis, conv_geometry, lrn_size, pool_geometry
from style_transfer.caffe_model.net import Net
from style_transfer.engines.base import (
    PRECISIONS,
    Engine,
    Evaluation,
    Evaluator,
    FeatureGradEvaluator,
    FeatureGrads,
    InputTerm,
)
from style_transfer.engines.cpu import keep_freed_memory, use_physical_cores
from style_transfer.errors import EngineError, ModelError
from style_transfer.losses import (
    Objective,
    TorchTargets,
    is_nhwc,
    temporal_term_torch,
    tv_loss_torch,
    weighted_terms_torch,
)

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


@dataclass(frozen=True)
class Tuning:
    """Speed choices, each measured in bench/torch_variants.py; None means the engine's default for the device.

    All False gives the plain implementation the measurements start from.
    """

    channels_last: bool | None = None
    inplace_relu: bool = True
    manual_loss_grad: bool = True
    keep_freed_memory: bool = True
    physical_core_threads: bool = True
    winograd: bool | None = None

    @staticmethod
    def plain() -> Tuning:
        return Tuning(channels_last=False, inplace_relu=False, manual_loss_grad=False, keep_freed_memory=False,
                      physical_core_threads=False, winograd=False)


Run = Callable[[list[torch.Tensor]], torch.Tensor]


class _Op:
    """One layer as a torch function of its input tensors."""

    def __init__(self, layer: Layer, pooling: str | None, weights: list[torch.Tensor], inplace_relu: bool,
                 winograd: bool = False) -> None:
        self.layer, self.pooling, self.weights = layer, pooling, weights
        self.inplace_relu, self.winograd = inplace_relu, winograd
        build = _BUILDERS.get(layer.type)
        if build is None:
            raise ModelError(f"layer {layer.name!r} has type {layer.type!r}, which the torch engine cannot run")
        self.run = build(self)


def _convolution(op: _Op) -> Run:
    g = conv_geometry(op.layer)
    weight = op.weights[0]
    bias = op.weights[1] if g.bias else None
    if op.winograd:
        # The input gradient of a stride-1 convolution is the convolution of the output gradient with the flipped,
        # transposed kernel, padded by k - 1 - pad: the same fast path serves the backward pass.
        flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
        back_pad = (g.kernel[0] - 1 - g.pad[0], g.kernel[1] - 1 - g.pad[1])

        def conv(xs: list[torch.Tensor]) -> torch.Tensor:
            x = xs[0]
            if x.shape[2] * x.shape[3] >= _WINOGRAD_MIN_PIXELS:
                return _WinogradConv.apply(x, weight, bias, flipped, g.pad, back_pad)
            return F.conv2d(x, weight, bias, g.stride, g.pad, g.dilation, g.group)

        return conv
    return lambda xs: F.conv2d(xs[0], weight, bias, g.stride, g.pad, g.dilation, g.group)


def _relu(op: _Op) -> Run:
    layer = op.layer
    slope = float(layer.params.negative_slope) if layer.params is not None else 0.0
    # In place only when Caffe's blob is in place too: then the value before the ReLU is never read again
    # (a convolution's input gradient needs its weights, not its output).
    in_place = op.inplace_relu and layer.tops[0] == layer.bottoms[0]
    if slope:
        return lambda xs: F.leaky_relu(xs[0], slope, inplace=in_place)
    if in_place:
        return lambda xs: xs[0].relu_()
    return lambda xs: F.relu(xs[0])


def _pooling(op: _Op) -> Run:
    p = pool_geometry(op.layer, op.pooling)

    def pool(xs: list[torch.Tensor]) -> torch.Tensor:
        x = xs[0]
        kernel = (int(x.shape[2]), int(x.shape[3])) if p.global_pooling else p.kernel
        if p.method == "max":
            return F.max_pool2d(x, kernel, p.stride, p.pad, ceil_mode=True)
        # Caffe divides by the window clipped to the padded input, padding included: torch's count_include_pad
        # with ceil_mode computes exactly that divisor.
        return F.avg_pool2d(x, kernel, p.stride, p.pad, ceil_mode=True, count_include_pad=True)

    return pool


def _lrn(op: _Op) -> Run:
    lp = op.layer.params
    size, alpha, beta, k = lrn_size(op.layer), float(lp.alpha), float(lp.beta), float(lp.k)
    if lp.norm_region == 0:
        return _across_channels_lrn(size, alpha, beta, k)

    def within(xs: list[torch.Tensor]) -> torch.Tensor:
        x = xs[0]
        mean_sq = F.avg_pool2d(x * x, size, 1, (size - 1) // 2, count_include_pad=True)
        return x * (1.0 + alpha * mean_sq).pow(-beta)

    return within


def _concat(op: _Op) -> Run:
    axis = concat_axis(op.layer)
    return lambda xs: torch.cat(xs, dim=axis)


def _identity(op: _Op) -> Run:
    return lambda xs: xs[0]


_BUILDERS: dict[str, Callable[[_Op], Run]] = {
    "Convolution": _convolution, "ReLU": _relu, "Pooling": _pooling, "LRN": _lrn, "Concat": _concat,
    "Dropout": _identity, "Split": _identity,
}
assert set(_BUILDERS) == RUNNABLE, "the torch engine must run exactly the layer types the table marks as runnable"


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, net: Net, pooling: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, precision: str = "fp32", tuning: Tuning | None = None) -> None:
        super().__init__(net, pooling, str(device))
        self.torch_device = torch.device(device)
        # float64 exists for gradient checks against finite differences; runs use float32.
        self.dtype = dtype
        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and dtype != torch.float32:
            raise EngineError(f"precision {precision} needs float32 weights, not {dtype}")
        self.precision = precision
        self.tuning = tuning or Tuning()
        cpu = self.torch_device.type == "cpu"
        if cpu and self.tuning.physical_core_threads:
            use_physical_cores()
        if cpu and self.tuning.keep_freed_memory:
            keep_freed_memory()
        wino_layers: set[str] = set()
        plain_fp32_cpu = cpu and dtype == torch.float32 and precision == "fp32"
        override = None if pooling == "file" else pooling
        if self.tuning.winograd is not False and plain_fp32_cpu and self.tuning.channels_last is not True:
            wino_layers = _winograd_layers(net, override, forced=bool(self.tuning.winograd))
        cl = self.tuning.channels_last
        if cl is None:
            # On the CPU oneDNN's float32 kernels want NHWC (BENCHMARKS.md); on CUDA NHWC pays off with tensor cores,
            # which the half precisions use. float64 has no oneDNN kernels, so it stays in the plain layout.
            cl = dtype == torch.float32 and (cpu or precision != "fp32") and not wino_layers
        self.memory_format = torch.channels_last if cl else torch.contiguous_format
        self._ops: list[_Op] = []
        for layer in net.layers:
            weights = [self._tensor(w) for w in net.weights.get(layer.name, [])]
            if cl and layer.type == "Convolution":
                weights[0] = weights[0].contiguous(memory_format=torch.channels_last)
            self._ops.append(_Op(layer, override, weights, self.tuning.inplace_relu, layer.name in wino_layers))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.torch_device, dtype=self.dtype)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Autocast for the half precisions; on CUDA, cuDNN autotuning (each size is tuned once) and TF32
        convolutions in fp32 mode. Gram matrices are computed outside autocast, in float32."""
        with contextlib.ExitStack() as stack:
            if self.precision != "fp32":
                stack.enter_context(torch.autocast(self.torch_device.type, dtype=_HALF[self.precision]))
            if self.torch_device.type == "cuda":
                # TF32 (float32's range, a 10-bit mantissa) is PyTorch's default for cuDNN convolutions and is made
                # explicit here; the Gram matrices are plain matmuls, for which PyTorch keeps TF32 off, so they stay
                # in full float32. Speed and parity with float32 on a GPU: BENCHMARKS.md.
                cudnn = torch.backends.cudnn
                for flag in ("benchmark", "allow_tf32"):  # restored on leaving
                    stack.callback(setattr, cudnn, flag, getattr(cudnn, flag))
                    setattr(cudnn, flag, True)
            yield

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).contiguous(memory_format=self.memory_format)

    def _forward(self, x: torch.Tensor, blobs: Sequence[str]) -> dict[str, torch.Tensor]:
        """Blob values with the batch axis (1 x C x H x W), in the engine's memory format."""
        values: dict[str, torch.Tensor] = {self.net.input_name: x}
        wanted = set(blobs)
        last = _last_needed(self._ops, wanted)
        ops = self._ops[: last + 1]
        # The last reader of each blob, so that inference can free activations as soon as they are consumed.
        last_read = {b: i for i, op in enumerate(ops) for b in op.layer.bottoms}
        for i, op in enumerate(ops):
            result = op.run([values[b] for b in op.layer.bottoms])
            for b in op.layer.bottoms:
                if last_read.get(b) == i and b not in wanted and b not in op.layer.tops:
                    values.pop(b, None)
            for top in op.layer.tops:
                values[top] = result
        return {b: values[b] for b in blobs}

    def features(self, image: np.ndarray, blobs: Sequence[str]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), self._running():
            out = self._forward(self._input(self._tensor(image)), blobs)
            return {b: _numpy(v[0], self.dtype) for b, v in out.items()}

    def bind(self, objective: Objective) -> Evaluator:
        targets = TorchTargets.of(objective, self._tensor, self.memory_format)
        if self.tuning.manual_loss_grad:
            return FeatureGradEvaluator(self, objective, targets, self.dtype)
        return _AutogradEvaluator(self, objective, targets)

    def vjp(self, image: np.ndarray, blobs: Sequence[str], fn: FeatureGrads,
            input_term: InputTerm | None = None) -> tuple[dict[str, float], float, np.ndarray]:
        x = self._tensor(image).requires_grad_()
        scale = 1.0
        for attempt in range(4):
            with self._running():
                feats = self._forward(self._input(x), blobs)
            terms, feature_grads = fn(feats)
            roots, grads = [feats[b] for b in feature_grads], list(feature_grads.values())
            del feats
            extra = torch.zeros((), dtype=self.dtype, device=x.device)
            if input_term is not None:
                extra = input_term(x)
                roots.append(extra)
                grads.append(torch.ones((), dtype=extra.dtype, device=extra.device))
            if self.precision == "fp16":
                # float16 overflows at 65504: the injected gradients are scaled by a power of two to a largest
                # magnitude of 2^(10 - 8 * attempt), leaving headroom for growth through the backward pass.
                if attempt == 0:
                    scale = _power_of_two_scale(grads, 2.0**10)
                grads = [g * scale for g in grads]
            (grad,) = torch.autograd.grad(roots, x, [g.to(r.dtype) for r, g in zip(roots, grads, strict=True)])
            if self.precision != "fp16" or bool(torch.isfinite(grad).all()):
                break
            scale /= 256.0
        if scale != 1.0:
            grad = grad / scale
        return terms, float(extra.detach()), _numpy(grad, self.dtype)


class _AutogradEvaluator(Evaluator):
    """The plain formulation (`Tuning.manual_loss_grad` off): the losses as torch expressions, everything
    differentiated by autograd."""

    def __init__(self, engine: TorchEngine, objective: Objective, targets: TorchTargets) -> None:
        self.engine, self.objective, self.targets = engine, objective, targets

    def evaluate(self, image: np.ndarray) -> Evaluation:
        engine, obj = self.engine, self.objective
        x = engine._tensor(image).requires_grad_()
        with engine._running():
            feats = {k: v[0] for k, v in engine._forward(engine._input(x), obj.layers).items()}
        terms = weighted_terms_torch(obj, self.targets, feats, engine.dtype)
        tv = obj.tv_weight * tv_loss_torch(x) if obj.tv_weight else torch.zeros((), dtype=engine.dtype, device=x.device)
        temporal = temporal_term_torch(obj, self.targets, x)
        total = sum(terms.values(), tv) if temporal is None else sum(terms.values(), tv + temporal)
        (grad,) = torch.autograd.grad(total, x)
        values = {k: float(v.detach()) for k, v in terms.items()}
        return Evaluation.of(values, float(tv.detach()), _numpy(grad, engine.dtype),
                             float(temporal.detach()) if temporal is not None else 0.0)


def _across_channels_lrn(size: int, alpha: float, beta: float, k: float) -> Run:
    """Caffe's ACROSS_CHANNELS LRN, x / (k + alpha / size * sum of x^2 over `size` neighbouring channels)^beta.

    The window sum is a 1 x 1 convolution with a banded 0/1 matrix: a small matrix product that runs at full speed
    in either memory layout, where torch's local_response_norm goes through a 5-D average pooling that took a large
    share of a GoogLeNet evaluation (BENCHMARKS.md).
    """
    bands: dict[tuple[int, torch.dtype, torch.device, bool], torch.Tensor] = {}
    half = (size - 1) // 2

    def lrn(xs: list[torch.Tensor]) -> torch.Tensor:
        x = xs[0]
        c = int(x.shape[1])
        nhwc = is_nhwc(x)
        key = (c, x.dtype, x.device, nhwc)
        if key not in bands:
            # A normal tensor even when first made under inference mode, as autograd will save it later.
            with torch.inference_mode(False):
                idx = torch.arange(c, device=x.device)
                band = ((idx[:, None] - idx[None, :]).abs() <= half).to(x.dtype).view(c, c, 1, 1)
                bands[key] = band.contiguous(memory_format=torch.channels_last) if nhwc else band
        window = F.conv2d(x * x, bands[key])
        return x * (window * (alpha / size) + k).pow(-beta)

    return lrn


def _numpy(grad: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A C-contiguous array the caller owns; a no-copy view when the gradient is already laid out so."""
    return grad.detach().to(dtype).contiguous().cpu().numpy()


def _power_of_two_scale(grads: list[torch.Tensor], target: float) -> float:
    largest = max((float(g.abs().max()) for g in grads if g.numel()), default=0.0)
    if not np.isfinite(largest) or largest == 0.0:
        return 1.0
    return float(2.0 ** np.floor(np.log2(target / largest)))


def _last_needed(ops: list[_Op], wanted: set[str]) -> int:
    return max((i for i, op in enumerate(ops) if wanted.intersection(op.layer.tops)), default=-1)


# NNPACK transforms the whole kernel (C_in x C_out x 8 x 8) on every call, a cost that does not shrink with the
# image: on small feature maps direct convolution wins (the break-even sizes are in BENCHMARKS.md).
_WINOGRAD_MIN_PIXELS = 1024


class _WinogradConv(torch.autograd.Function):
    """A stride-1 convolution through NNPACK's Winograd kernels, forward and input-gradient backward; no weight
    gradients. Inputs and output gradients are NCHW."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                flipped: torch.Tensor, pad: tuple[int, int], back_pad: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(flipped)
        ctx.back_pad = back_pad
        return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, pad, (1, 1))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None]:  # type: ignore[override]
        (flipped,) = ctx.saved_tensors
        gx = torch._nnpack_spatial_convolution(grad.contiguous(), flipped, None, ctx.back_pad, (1, 1))
        return gx, None, None, None, None, None


def _winograd_layers(net: Net, pooling: str | None, forced: bool = False) -> set[str]:
    """The convolutions NNPACK's Winograd path serves (3 x 3, stride and dilation 1, one group), if they carry at
    least three quarters of the net's convolution work; otherwise none. The rest of such a net runs in NCHW, where
    oneDNN's direct convolutions are slower than in NHWC, so a net needs most of its work in Winograd layers to
    gain: VGG (all of it) does, GoogLeNet and CaffeNet do not (BENCHMARKS.md).

    Unless `forced`, nets with max pooling keep direct convolutions: their gradient follows each window's argmax,
    and Winograd's larger rounding error moves near-ties often enough to put the gradient outside the parity
    tolerance with Caffe's on VGG16 (BENCHMARKS.md).
    """
    if not forced and any(pool_geometry(layer, pooling).method == "max" for layer in net.layers
                          if layer.type == "Pooling"):
        return set()
    try:
        available = bool(torch._nnpack_available())  # also initialises NNPACK, which its kernels need first
    except (AttributeError, RuntimeError):
        available = False
    if not available:
        return set()
    try:
        work = flops.count(net, 224, 224)
    except ModelError:
        return set()
    geometries = {layer.name: conv_geometry(layer) for layer in net.layers if layer.type == "Convolution"}
    chosen = {name for name, g in geometries.items() if g.kernel == (3, 3) and g.stride == (1, 1)
              and g.dilation == (1, 1) and g.group == 1 and max(g.pad) <= 2}
    total = work.conv_forward_macs
    eligible = sum(w.forward_macs for w in work.layers if w.name in chosen)
    return chosen if total and eligible * 4 >= total * 3 else set()

