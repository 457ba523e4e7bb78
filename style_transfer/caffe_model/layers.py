"""What the tool knows about each Caffe layer type, in one table (LAYER_TYPES) that the reader, shape inference and
both engines read, with the geometry of the types that have one."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from style_transfer.errors import ModelError

Shape = tuple[int, ...]


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


@dataclass(frozen=True)
class Window:
    """How a layer reads its input along one axis: output i reads inputs i * stride - pad .. i * stride - pad +
    extent - 1 (positions outside the input are padding)."""

    extent: int
    stride: int
    pad: int


POINTWISE = Window(1, 1, 0)


def fmt_shape(shape: Iterable[int]) -> str:
    return "x".join(str(d) for d in shape)


def _pair(layer: Layer, what: str, values: Sequence[int], default: int) -> tuple[int, int]:
    """A 2-D parameter: from `what`_h and `what`_w where the message has them, else from 0, 1 or 2 `values`."""
    p, h, w = layer.params, f"{what}_h", f"{what}_w"
    if h in p.DESCRIPTOR.fields_by_name and (p.HasField(h) or p.HasField(w)):
        if not (p.HasField(h) and p.HasField(w)):
            raise ModelError(f"layer {layer.name!r}: {what}_h and {what}_w must be given together")
        return int(getattr(p, h)), int(getattr(p, w))
    if len(values) > 2:
        raise ModelError(f"layer {layer.name!r}: {len(values)} values of {what}; only 2-D convolution is supported")
    return (int(values[0]), int(values[-1])) if values else (default, default)


def conv_geometry(layer: Layer) -> ConvGeometry:
    p = layer.params
    if p is None or not p.HasField("num_output"):
        raise ModelError(f"layer {layer.name!r}: convolution_param.num_output is missing")
    if p.axis != 1:
        raise ModelError(f"layer {layer.name!r}: convolution over axis {p.axis} is not supported (only axis 1)")
    if not p.kernel_size and not p.HasField("kernel_h") and not p.HasField("kernel_w"):
        raise ModelError(f"layer {layer.name!r}: convolution_param has no kernel_size")
    geometry = ConvGeometry(
        num_output=int(p.num_output),
        kernel=_pair(layer, "kernel", p.kernel_size, 0),
        stride=_pair(layer, "stride", p.stride, 1),
        pad=_pair(layer, "pad", p.pad, 0),
        dilation=_pair(layer, "dilation", p.dilation, 1),
        group=int(p.group),
        bias=bool(p.bias_term),
    )
    if geometry.num_output < 1:
        raise ModelError(f"layer {layer.name!r}: num_output must be positive")
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
    if not p.global_pooling and not any(p.HasField(f) for f in ("kernel_size", "kernel_h", "kernel_w")):
        raise ModelError(f"layer {layer.name!r}: pooling_param has no kernel_size")
    kernel = _pair(layer, "kernel", [p.kernel_size], 0)
    stride = _pair(layer, "stride", [p.stride], 1)
    pad = _pair(layer, "pad", [p.pad], 0)
    if p.global_pooling:
        pad, stride = (0, 0), (1, 1)
    elif min(kernel) < 1 or min(stride) < 1:
        raise ModelError(f"layer {layer.name!r}: pooling kernel and stride must be positive")
    elif pad[0] >= kernel[0] or pad[1] >= kernel[1]:
        raise ModelError(f"layer {layer.name!r}: pooling pad {pad} must be smaller than the kernel {kernel}")
    return PoolGeometry(override or methods[p.pool], kernel, stride, pad, bool(p.global_pooling))


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


def lrn_size(layer: Layer) -> int:
    """The LRN window, which must be odd: Caffe and the torch engine centre it on each channel."""
    size = int(layer.params.local_size) if layer.params is not None else 5
    if size % 2 == 0 or size < 1:
        raise ModelError(f"layer {layer.name!r}: LRN local_size must be odd, got {size}")
    return size


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    # Caffe rounds up, then drops a last window that would start inside the padding only.
    out = math.ceil((size + 2 * pad - kernel) / stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


# ----------------------------------------------------------------------------------------------- window rules
# Each gives a spatial layer's (height, width) windows; layers without a rule read each position at the same place.


def _conv_windows(layer: Layer, pooling: str | None) -> tuple[Window, Window]:
    g = conv_geometry(layer)
    return (Window(g.dilation[0] * (g.kernel[0] - 1) + 1, g.stride[0], g.pad[0]),
            Window(g.dilation[1] * (g.kernel[1] - 1) + 1, g.stride[1], g.pad[1]))


def _pool_windows(layer: Layer, pooling: str | None) -> tuple[Window, Window]:
    p = pool_geometry(layer, pooling)
    if p.global_pooling:
        raise ModelError(f"layer {layer.name!r} pools globally: each output reads the whole input, so the net cannot "
                         "be evaluated in tiles")
    return Window(p.kernel[0], p.stride[0], p.pad[0]), Window(p.kernel[1], p.stride[1], p.pad[1])


def _lrn_windows(layer: Layer, pooling: str | None) -> tuple[Window, Window]:
    size = lrn_size(layer)
    if layer.params is None or layer.params.norm_region == 0:  # across channels: no spatial extent
        return POINTWISE, POINTWISE
    return Window(size, 1, (size - 1) // 2), Window(size, 1, (size - 1) // 2)


def windows(layer: Layer, pooling: str | None = None) -> tuple[Window, Window]:
    """The layer's (height, width) windows, from the table."""
    kind = LAYER_TYPES.get(layer.type)
    if kind is None or not kind.runs:
        raise ModelError(f"layer {layer.name!r} has type {layer.type!r}, which this tool cannot run")
    return kind.window(layer, pooling) if kind.window is not None else (POINTWISE, POINTWISE)


# ----------------------------------------------------------------------------------------------- shape rules
# Each gives the output shapes (N, C, H, W) of a layer from its input shapes and the pooling override.


def _same(layer: Layer, ins: list[Shape], pooling: str | None) -> list[Shape]:
    return [ins[0]] * len(layer.tops)


def _convolution(layer: Layer, ins: list[Shape], pooling: str | None) -> list[Shape]:
    n, c, h, w = ins[0]
    g = conv_geometry(layer)
    if c % g.group:
        raise ModelError(f"layer {layer.name!r}: {c} input channels are not divisible by group {g.group}")
    return [(n, g.num_output, conv_output_size(h, g.kernel[0], g.stride[0], g.pad[0], g.dilation[0]),
             conv_output_size(w, g.kernel[1], g.stride[1], g.pad[1], g.dilation[1]))]


def _pooling(layer: Layer, ins: list[Shape], pooling: str | None) -> list[Shape]:
    n, c, h, w = ins[0]
    p = pool_geometry(layer, pooling)
    if p.global_pooling:
        return [(n, c, 1, 1)]
    return [(n, c, pool_output_size(h, p.kernel[0], p.stride[0], p.pad[0]),
             pool_output_size(w, p.kernel[1], p.stride[1], p.pad[1]))]


def _lrn(layer: Layer, ins: list[Shape], pooling: str | None) -> list[Shape]:
    lrn_size(layer)
    return _same(layer, ins, pooling)


def _inner_product(layer: Layer, ins: list[Shape], pooling: str | None) -> list[Shape]:
    p = layer.params
    if p is None or not p.HasField("num_output") or p.axis != 1 or p.transpose:
        raise ModelError(f"layer {layer.name!r}: only plain InnerProduct layers (axis 1, num_output) are supported")
    return [(ins[0][0], int(p.num_output))]


def _concat(layer: Layer, ins: list[Shape], pooling: str | None) -> list[Shape]:
    axis = concat_axis(layer)
    if len({s[:axis] + s[axis + 1:] for s in ins}) > 1:  # the shapes must agree but along the axis
        raise ModelError(f"layer {layer.name!r}: cannot concatenate shapes {', '.join(fmt_shape(s) for s in ins)} "
                         f"along axis {axis}")
    out = list(ins[0])
    out[axis] = sum(s[axis] for s in ins)
    return [tuple(out)]


# ----------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class LayerType:
    field: str | None  # the LayerParameter (and V1LayerParameter) field holding its parameters
    v1: str | None  # its name in V1LayerParameter.LayerType
    runs: bool  # both engines run it
    shape: Callable[[Layer, list[Shape], str | None], list[Shape]] | None  # its shape rule
    in_place: bool = False  # Caffe computes it correctly with its output over its input
    bottoms: tuple[int, int | None] = (1, 1)  # fewest and most input blobs (None: any number)
    tops: tuple[int, int | None] = (1, 1)  # fewest and most output blobs
    # Its spatial windows (tiling.py); None: each output position reads the same position of each input.
    window: Callable[[Layer, str | None], tuple[Window, Window]] | None = None


LAYER_TYPES: dict[str, LayerType] = {
    "Convolution": LayerType("convolution_param", "CONVOLUTION", True, _convolution, window=_conv_windows),
    "ReLU": LayerType("relu_param", "RELU", True, _same, in_place=True),
    "Pooling": LayerType("pooling_param", "POOLING", True, _pooling, window=_pool_windows),
    "LRN": LayerType("lrn_param", "LRN", True, _lrn, window=_lrn_windows),
    "Concat": LayerType("concat_param", "CONCAT", True, _concat, bottoms=(1, None)),
    "Dropout": LayerType("dropout_param", "DROPOUT", True, _same, in_place=True),
    "Split": LayerType(None, "SPLIT", True, _same, tops=(1, None)),
    # Read so that full deploy files parse and their fc weights can be checked; the net is cut before them.
    "InnerProduct": LayerType("inner_product_param", "INNER_PRODUCT", False, _inner_product),
    "Softmax": LayerType("softmax_param", "SOFTMAX", False, _same),
    # The reader turns an Input layer into the net's input declaration.
    "Input": LayerType("input_param", None, False, None),
}

# The types the engines run; anything else is rejected when it is actually needed.
RUNNABLE = frozenset(name for name, kind in LAYER_TYPES.items() if kind.runs)

# V1 enum names -> current type strings, as Caffe's own upgrade maps them: the table's types, and the rest.
V1_TYPES = {kind.v1: name for name, kind in LAYER_TYPES.items() if kind.v1} | {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "DECONVOLUTION": "Deconvolution", "DATA": "Data",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp",
    "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col", "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN", "POWER": "Power", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SLICE": "Slice", "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}
