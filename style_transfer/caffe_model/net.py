"""A Caffe net as the tool sees it: layers in order, blob shapes, weights, and truncation to the blobs in use."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from style_transfer.errors import ModelError

# Layer types the engines can run; anything else is rejected when it is actually needed.
SUPPORTED_TYPES = frozenset({"Convolution", "ReLU", "Pooling", "LRN", "Concat", "Dropout", "Split"})


class WeightSource(Protocol):
    """Learned blobs by layer name: a dict, or a caffemodel that converts blobs on demand."""

    def __contains__(self, name: object, /) -> bool: ...

    def __getitem__(self, name: str, /) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Layer:
    """One layer, with the current layout's string type whatever layout it came from."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    # The protobuf sub-message holding the type's parameters (ConvolutionParameter, ...), or None.
    params: Any = None


@dataclass(frozen=True)
class ConvGeometry:
    num_output: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int]
    group: int
    bias: bool


@dataclass(frozen=True)
class PoolGeometry:
    method: str  # "max" or "avg"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    global_pooling: bool


@dataclass
class Net:
    """A parsed net: its input blob, the input shape the file declares (if any), and its layers in order."""

    name: str
    input_name: str
    input_shape: tuple[int, ...] | None
    layers: list[Layer]
    weights: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def blob_names(self) -> list[str]:
        names = [self.input_name]
        for layer in self.layers:
            names.extend(t for t in layer.tops if t not in names)
        return names

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def _pair(values: Sequence[int], single_h: int | None, single_w: int | None, default: int, what: str,
          layer: str) -> tuple[int, int]:
    if single_h is not None or single_w is not None:
        if single_h is None or single_w is None:
            raise ModelError(f"layer {layer!r}: {what}_h and {what}_w must be given together")
        return int(single_h), int(single_w)
    if len(values) == 0:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise ModelError(f"layer {layer!r}: {len(values)} values of {what}; only 2-D convolution is supported")


def conv_geometry(layer: Layer) -> ConvGeometry:
    p = layer.params
    if p is None or not p.HasField("num_output"):
        raise ModelError(f"layer {layer.name!r}: convolution_param.num_output is missing")
    if p.axis != 1:
        raise ModelError(f"layer {layer.name!r}: convolution over axis {p.axis} is not supported (only axis 1)")
    kh = p.kernel_h if p.HasField("kernel_h") else None
    kw = p.kernel_w if p.HasField("kernel_w") else None
    if kh is None and kw is None and len(p.kernel_size) == 0:
        raise ModelError(f"layer {layer.name!r}: convolution_param has no kernel_size")
    sh = p.stride_h if p.HasField("stride_h") else None
    sw = p.stride_w if p.HasField("stride_w") else None
    ph = p.pad_h if p.HasField("pad_h") else None
    pw = p.pad_w if p.HasField("pad_w") else None
    geometry = ConvGeometry(
        num_output=int(p.num_output),
        kernel=_pair(p.kernel_size, kh, kw, 0, "kernel", layer.name),
        stride=_pair(p.stride, sh, sw, 1, "stride", layer.name),
        pad=_pair(p.pad, ph, pw, 0, "pad", layer.name),
        dilation=_pair(p.dilation, None, None, 1, "dilation", layer.name),
        group=int(p.group),
        bias=bool(p.bias_term),
    )
    if min(geometry.kernel) < 1 or min(geometry.stride) < 1 or min(geometry.dilation) < 1 or geometry.group < 1:
        raise ModelError(f"layer {layer.name!r}: kernel, stride, dilation and group must be positive")
    if geometry.num_output % geometry.group:
        raise ModelError(f"layer {layer.name!r}: num_output {geometry.num_output} is not divisible by group "
                         f"{geometry.group}")
    return geometry


def pool_geometry(layer: Layer, override: str | None = None) -> PoolGeometry:
    """The pooling parameters; `override` ("max"/"avg") replaces the file's method, as the original's avg option did."""
    p = layer.params
    if p is None:
        raise ModelError(f"layer {layer.name!r}: pooling_param is missing")
    methods = {0: "max", 1: "avg"}
    if p.pool not in methods:
        raise ModelError(f"layer {layer.name!r}: stochastic pooling is not supported")
    kh = p.kernel_h if p.HasField("kernel_h") else None
    kw = p.kernel_w if p.HasField("kernel_w") else None
    if not p.global_pooling and kh is None and kw is None and not p.HasField("kernel_size"):
        raise ModelError(f"layer {layer.name!r}: pooling_param has no kernel_size")
    kernel = _pair([p.kernel_size] if p.HasField("kernel_size") else [], kh, kw, 0, "kernel", layer.name)
    sh = p.stride_h if p.HasField("stride_h") else None
    sw = p.stride_w if p.HasField("stride_w") else None
    ph = p.pad_h if p.HasField("pad_h") else None
    pw = p.pad_w if p.HasField("pad_w") else None
    stride = _pair([p.stride], sh, sw, 1, "stride", layer.name)
    pad = _pair([p.pad], ph, pw, 0, "pad", layer.name)
    if p.global_pooling:
        pad, stride = (0, 0), (1, 1)
    elif min(kernel) < 1 or min(stride) < 1:
        raise ModelError(f"layer {layer.name!r}: pooling kernel and stride must be positive")
    elif pad[0] >= kernel[0] or pad[1] >= kernel[1]:
        raise ModelError(f"layer {layer.name!r}: pooling pad {pad} must be smaller than the kernel {kernel}")
    return PoolGeometry(override or methods[p.pool], kernel, stride, pad, bool(p.global_pooling))


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    # Caffe rounds up, then drops a last window that would start inside the padding only.
    out = math.ceil((size + 2 * pad - kernel) / stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def infer_shapes(net: Net, input_shape: tuple[int, int, int, int], pooling: str | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Each blob's shape (N, C, H, W) at this input shape, with errors that name the layer."""
    shapes: dict[str, tuple[int, ...]] = {net.input_name: tuple(input_shape)}
    for layer in net.layers:
        for bottom in layer.bottoms:
            if bottom not in shapes:
                raise ModelError(f"layer {layer.name!r} reads blob {bottom!r}, which no earlier layer makes")
        ins = [shapes[b] for b in layer.bottoms]
        outs = _layer_output_shapes(layer, ins, pooling)
        for top, shape in zip(layer.tops, outs, strict=True):
            if min(shape) < 1:
                raise ModelError(f"layer {layer.name!r} would produce an empty blob {top!r} of shape "
                                 f"{_fmt(shape)} from input {_fmt(input_shape)}: the image is too small for this net")
            shapes[top] = shape
    return shapes


def _fmt(shape: Iterable[int]) -> str:
    return "x".join(str(d) for d in shape)


def _layer_output_shapes(layer: Layer, ins: list[tuple[int, ...]], pooling: str | None) -> list[tuple[int, ...]]:
    t = layer.type
    if t in ("ReLU", "Dropout"):
        _expect_bottoms(layer, 1)
        return [ins[0]]
    if t == "Split":
        _expect_bottoms(layer, 1)
        return [ins[0]] * len(layer.tops)
    if t == "LRN":
        _expect_bottoms(layer, 1)
        return [ins[0]]
    if t == "Convolution":
        _expect_bottoms(layer, 1)
        n, c, h, w = ins[0]
        g = conv_geometry(layer)
        if c % g.group:
            raise ModelError(f"layer {layer.name!r}: {c} input channels are not divisible by group {g.group}")
        return [(n, g.num_output,
                 conv_output_size(h, g.kernel[0], g.stride[0], g.pad[0], g.dilation[0]),
                 conv_output_size(w, g.kernel[1], g.stride[1], g.pad[1], g.dilation[1]))]
    if t == "Pooling":
        _expect_bottoms(layer, 1)
        n, c, h, w = ins[0]
        p = pool_geometry(layer, pooling)
        if p.global_pooling:
            return [(n, c, 1, 1)]
        return [(n, c, pool_output_size(h, p.kernel[0], p.stride[0], p.pad[0]),
                 pool_output_size(w, p.kernel[1], p.stride[1], p.pad[1]))]
    if t == "InnerProduct":
        _expect_bottoms(layer, 1)
        p_ip = layer.params
        if p_ip is None or not p_ip.HasField("num_output") or p_ip.axis != 1 or p_ip.transpose:
            raise ModelError(f"layer {layer.name!r}: only plain InnerProduct layers (axis 1, num_output) are supported")
        return [(ins[0][0], int(p_ip.num_output))]
    if t == "Softmax":
        _expect_bottoms(layer, 1)
        return [ins[0]]
    if t == "Concat":
        axis = concat_axis(layer)
        first = ins[0]
        for other in ins[1:]:
            if len(other) != len(first) or any(a != b for i, (a, b) in enumerate(zip(first, other, strict=True))
                                                if i != axis):
                raise ModelError(f"layer {layer.name!r}: cannot concatenate shapes "
                                 f"{', '.join(_fmt(s) for s in ins)} along axis {axis}")
        out = list(first)
        out[axis] = sum(s[axis] for s in ins)
        return [tuple(out)]
    raise ModelError(f"layer {layer.name!r} has type {t!r}, which this tool cannot run "
                     f"(supported: Input, {', '.join(sorted(SUPPORTED_TYPES))})")


def concat_axis(layer: Layer) -> int:
    p = layer.params
    if p is None:
        return 1
    axis = int(p.axis) if p.HasField("axis") or not p.HasField("concat_dim") else int(p.concat_dim)
    if axis < 0:
        axis += 4
    if not 0 <= axis < 4:
        raise ModelError(f"layer {layer.name!r}: concat axis {axis} is out of range")
    return axis


def _expect_bottoms(layer: Layer, count: int) -> None:
    if len(layer.bottoms) != count or len(layer.tops) < 1:
        raise ModelError(f"layer {layer.name!r} ({layer.type}) needs {count} input blob(s) and an output, "
                         f"has {len(layer.bottoms)} and {len(layer.tops)}")


def truncate(net: Net, blobs: Iterable[str]) -> Net:
    """The smallest prefix of the net that computes `blobs` (each blob's value after the net's last write to it).

    Layers past the deepest needed blob, and side branches nothing needed reads, are dropped, so a caffemodel without
    fc layers serves a prototxt that has them.
    """
    wanted = list(dict.fromkeys(blobs))
    known = set(net.blob_names())
    missing = [b for b in wanted if b not in known]
    if missing:
        raise ModelError(f"the net has no blob {', '.join(repr(b) for b in missing)}; available: "
                         f"{', '.join(net.blob_names()[1:])}")
    last_write: dict[str, int] = {}
    for i, layer in enumerate(net.layers):
        for top in layer.tops:
            last_write[top] = i
    end = max((last_write.get(b, -1) for b in wanted), default=-1)
    needed = set(wanted)
    kept: list[Layer] = []
    for layer in reversed(net.layers[: end + 1]):
        if needed.intersection(layer.tops):
            kept.append(layer)
            needed.update(layer.bottoms)
    kept.reverse()
    return replace(net, layers=kept, weights={k: v for k, v in net.weights.items()
                                               if k in {layer.name for layer in kept}})


def expected_param_shapes(layer: Layer, bottom_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of the learned blobs a layer needs, given its input shape."""
    if layer.type == "InnerProduct":
        n_out = int(layer.params.num_output)
        ip_shapes: list[tuple[int, ...]] = [(n_out, int(np.prod(bottom_shape[1:])))]
        if layer.params.bias_term:
            ip_shapes.append((n_out,))
        return ip_shapes
    if layer.type != "Convolution":
        return []
    g = conv_geometry(layer)
    shapes: list[tuple[int, ...]] = [(g.num_output, bottom_shape[1] // g.group, *g.kernel)]
    if g.bias:
        shapes.append((g.num_output,))
    return shapes


def attach_weights(net: Net, weights: WeightSource, input_shape: tuple[int, int, int, int],
                   pooling: str | None = None) -> Net:
    """Check and attach learned blobs to every layer that needs them; errors name the layer and both shapes."""
    shapes = infer_shapes(net, input_shape, pooling)
    attached: dict[str, list[np.ndarray]] = {}
    for layer in net.layers:
        expected = expected_param_shapes(layer, shapes[layer.bottoms[0]] if layer.bottoms else ())
        if not expected:
            continue
        if layer.name not in weights:
            raise ModelError(f"the caffemodel has no weights for layer {layer.name!r} (the prototxt needs "
                             f"{' and '.join(_fmt(s) for s in expected)})")
        blobs = weights[layer.name]
        if len(blobs) < len(expected):
            raise ModelError(f"layer {layer.name!r}: the caffemodel has {len(blobs)} blob(s), the prototxt needs "
                             f"{len(expected)} ({' and '.join(_fmt(s) for s in expected)})")
        fitted = []
        for kind, blob, shape in zip(("weights", "bias"), blobs, expected, strict=False):
            fitted.append(_fit_shape(layer.name, kind, blob, shape))
        attached[layer.name] = fitted
    return replace(net, weights=attached)


def _fit_shape(layer: str, kind: str, blob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if blob.shape == shape:
        return blob
    # Old files store every blob as 4-D num/channels/height/width, padded with leading 1s (a bias is 1x1x1xN).
    padded = (1,) * (4 - len(shape)) + shape
    if blob.ndim == 4 and blob.shape == padded:
        return blob.reshape(shape)
    raise ModelError(f"layer {layer!r}: {kind} shape in the caffemodel is {_fmt(blob.shape)}, the prototxt needs "
                     f"{_fmt(shape)}")
