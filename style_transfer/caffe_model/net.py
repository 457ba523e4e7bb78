"""A Caffe net as the tool sees it: layers in order, blob shapes, weights, and truncation to the blobs in use."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from style_transfer.caffe_model.layers import (
    LAYER_TYPES,
    RUNNABLE,
    Layer,
    conv_geometry,
    fmt_shape,
    windows,
)
from style_transfer.errors import ModelError

if TYPE_CHECKING:
    from style_transfer.caffe_model.reader import CaffeModelWeights


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


def infer_shapes(net: Net, input_shape: tuple[int, int, int, int], pooling: str | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Each blob's shape (N, C, H, W) at this input shape, with errors that name the layer."""
    shapes: dict[str, tuple[int, ...]] = {net.input_name: tuple(input_shape)}
    for layer in net.layers:
        for bottom in layer.bottoms:
            if bottom not in shapes:
                raise ModelError(f"layer {layer.name!r} reads blob {bottom!r}, which no earlier layer makes")
        kind = LAYER_TYPES.get(layer.type)
        if kind is None or kind.shape is None:
            raise ModelError(f"layer {layer.name!r} has type {layer.type!r}, which this tool cannot run "
                             f"(supported: Input, {', '.join(sorted(RUNNABLE))})")
        for what, (fewest, most), blobs in (("input", kind.bottoms, layer.bottoms), ("output", kind.tops, layer.tops)):
            if most is None and len(blobs) < fewest:
                raise ModelError(f"layer {layer.name!r} ({layer.type}) needs at least {fewest} {what} blob")
            if most is not None and not fewest <= len(blobs) <= most:
                raise ModelError(f"layer {layer.name!r} ({layer.type}) needs exactly {fewest} {what} blob, has "
                                 f"{len(blobs)}")
        outs = kind.shape(layer, [shapes[b] for b in layer.bottoms], pooling)
        for top, shape in zip(layer.tops, outs, strict=True):
            if min(shape) < 1:
                raise ModelError(f"layer {layer.name!r} would produce an empty blob {top!r} of shape "
                                 f"{fmt_shape(shape)} from input {fmt_shape(input_shape)}: the image is too small "
                                 "for this net")
            shapes[top] = shape
    return shapes


@dataclass(frozen=True)
class Reach:
    """Where a blob's positions look in the input, per axis (height, width): position j depends on input positions
    lo + j * stride .. hi + j * stride at most (padding included), and on nothing else."""

    stride: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]


def reaches(net: Net, pooling: str | None = None) -> dict[str, Reach]:
    """Each blob's Reach, composed layer by layer from the table's windows (a layer with window extent k, stride s
    and pad p over an input of stride S widens the reach by (k - 1) S and moves its start by -p S)."""
    out: dict[str, Reach] = {net.input_name: Reach((1, 1), (0, 0), (0, 0))}
    for layer in net.layers:
        ins = [out[b] for b in layer.bottoms if b in out]
        if len(ins) != len(layer.bottoms):
            raise ModelError(f"layer {layer.name!r} reads a blob no earlier layer makes")
        if len({r.stride for r in ins}) != 1:
            raise ModelError(f"layer {layer.name!r} joins blobs of different strides; the net cannot be tiled")
        stride, ws = ins[0].stride, windows(layer, pooling)
        lo = [min(r.lo[a] for r in ins) - ws[a].pad * stride[a] for a in (0, 1)]
        hi = [max(r.hi[a] for r in ins) + (ws[a].extent - 1 - ws[a].pad) * stride[a] for a in (0, 1)]
        reach = Reach((stride[0] * ws[0].stride, stride[1] * ws[1].stride), (lo[0], lo[1]), (hi[0], hi[1]))
        for top in layer.tops:
            out[top] = reach
    return out


def truncate(net: Net, blobs: Iterable[str]) -> Net:
    """The smallest prefix of the net that computes `blobs` (each blob's value after the net's last write to it).

    Layers past the deepest needed blob, and side branches nothing needed reads, are dropped, so a caffemodel without
    fc layers serves a prototxt that has them.
    """
    wanted = list(dict.fromkeys(blobs))
    known = net.blob_names()
    missing = [b for b in wanted if b not in known]
    if missing:
        raise ModelError(f"the net has no blob {', '.join(repr(b) for b in missing)}; available: "
                         f"{', '.join(known[1:])}")
    last_write = {top: i for i, layer in enumerate(net.layers) for top in layer.tops}
    end = max((last_write.get(b, -1) for b in wanted), default=-1)
    needed = set(wanted)
    kept: list[Layer] = []
    for layer in reversed(net.layers[: end + 1]):
        if needed.intersection(layer.tops):
            kept.append(layer)
            needed.update(layer.bottoms)
    kept.reverse()
    names = {layer.name for layer in kept}
    return replace(net, layers=kept, weights={k: v for k, v in net.weights.items() if k in names})


def expected_param_shapes(layer: Layer, bottom_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of the learned blobs a layer needs, given its input shape."""
    if layer.type == "InnerProduct":
        n_out, bias = int(layer.params.num_output), bool(layer.params.bias_term)
        weight_shape: tuple[int, ...] = (n_out, int(np.prod(bottom_shape[1:])))
    elif layer.type == "Convolution":
        g = conv_geometry(layer)
        n_out, bias, weight_shape = g.num_output, g.bias, (g.num_output, bottom_shape[1] // g.group, *g.kernel)
    else:
        return []
    return [weight_shape, (n_out,)] if bias else [weight_shape]


def attach_weights(net: Net, weights: CaffeModelWeights, input_shape: tuple[int, int, int, int],
                   pooling: str | None = None) -> Net:
    """Check and attach learned blobs to every layer that needs them; errors name the layer and both shapes."""
    shapes = infer_shapes(net, input_shape, pooling)
    attached: dict[str, list[np.ndarray]] = {}
    for layer in net.layers:
        expected = expected_param_shapes(layer, shapes[layer.bottoms[0]] if layer.bottoms else ())
        if not expected:
            continue
        needs = " and ".join(fmt_shape(s) for s in expected)
        if layer.name not in weights:
            raise ModelError(f"the caffemodel has no weights for layer {layer.name!r} (the prototxt needs {needs})")
        blobs = weights[layer.name]
        if len(blobs) < len(expected):
            raise ModelError(f"layer {layer.name!r}: the caffemodel has {len(blobs)} blob(s), the prototxt needs "
                             f"{len(expected)} ({needs})")
        attached[layer.name] = [_fit_shape(layer.name, kind, blob, shape)
                                for kind, blob, shape in zip(("weights", "bias"), blobs, expected, strict=False)]
    return replace(net, weights=attached)


def _fit_shape(layer: str, kind: str, blob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # Old files store every blob as 4-D num/channels/height/width, padded with leading 1s (a bias is 1x1x1xN).
    if blob.shape in (shape, (1,) * (4 - len(shape)) + shape):
        return blob.reshape(shape)
    raise ModelError(f"layer {layer!r}: {kind} shape in the caffemodel is {fmt_shape(blob.shape)}, the prototxt needs "
                     f"{fmt_shape(shape)}")
