"""What the Caffe engine hands Caffe: the deploy prototxt, and the checks that come first.

The prototxt is written from the already truncated and weight-checked `Net`: the input at the image's size, the
chosen pooling in every pooling layer, set up so that Caffe computes the input gradient and no weight gradients.
Caffe ends the whole process on a failed internal CHECK, so everything Caffe would check is checked here first and
reported as a ModelError or EngineError: layer types, blob wiring, parameter combinations, shapes at every input
size, 32-bit element counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import text_format

from style_transfer.caffe_model import caffe_schema_pb2 as pb
from style_transfer.caffe_model.layers import (
    LAYER_TYPES,
    RUNNABLE,
    Layer,
    concat_axis,
    conv_geometry,
    fmt_shape,
    lrn_size,
    pool_geometry,
)
from style_transfer.caffe_model.loader import check_input_shape
from style_transfer.caffe_model.net import Net, infer_shapes
from style_transfer.errors import EngineError, ModelError

# Blob and im2col buffer sizes are 32-bit ints inside Caffe; beyond this it aborts.
_INT_MAX = 2**31 - 1


def check_net(net: Net) -> None:
    """Reject, before Caffe sees it, anything Caffe would abort on or compute differently from the torch engine: what
    shape inference checks (blob counts and parameters of each layer type, by the layer table), and Caffe's own rules
    for layer names and for writing blobs."""
    layer_names = {layer.name for layer in net.layers}
    if len(layer_names) != len(net.layers):
        raise ModelError("two layers of the net have the same name")
    produced = {net.input_name}
    for layer in net.layers:
        where = f"layer {layer.name!r} ({layer.type})"
        if layer.type not in RUNNABLE:
            raise ModelError(f"{where}: the Caffe engine cannot run this layer type (supported: "
                             f"{', '.join(sorted(RUNNABLE))})")
        if not layer.name:
            raise ModelError(f"{where}: a layer needs a name")
        for index, top in enumerate(layer.tops):
            in_place = index < len(layer.bottoms) and layer.bottoms[index] == top
            if in_place and not LAYER_TYPES[layer.type].in_place:
                raise ModelError(f"{where}: cannot write its output {top!r} over its input in place")
            if top in produced and not in_place:
                raise ModelError(f"{where}: blob {top!r} is already made by an earlier layer (only in-place "
                                 "layers may write a blob again)")
            if top in layer.bottoms and not in_place:
                raise ModelError(f"{where}: blob {top!r} is both an input and an output at different positions")
        if len(set(layer.tops)) != len(layer.tops):
            raise ModelError(f"{where}: the same output blob is named twice")
        produced.update(layer.tops)
    infer_shapes(net, check_input_shape(net))


def check_size(net: Net, height: int, width: int, pooling: str | None) -> dict[str, tuple[int, ...]]:
    """Every blob's shape at this input size; errors for what Caffe would abort on, such as 32-bit overflows."""
    shapes = infer_shapes(net, (1, 3, height, width), pooling)
    for name, shape in shapes.items():
        if int(np.prod(shape, dtype=np.int64)) > _INT_MAX:
            raise EngineError(f"the image ({width}x{height}) is too large for Caffe: blob {name!r} would have "
                              f"{fmt_shape(shape)} elements, more than 2^31-1")
    for layer in net.layers:
        if layer.type == "Convolution":
            g = conv_geometry(layer)
            _, c, _, _ = shapes[layer.bottoms[0]]
            _, _, oh, ow = shapes[layer.tops[0]]
            buffer = c * g.kernel[0] * g.kernel[1] * oh * ow  # Caffe's im2col buffer
            if buffer > _INT_MAX:
                raise EngineError(f"the image ({width}x{height}) is too large for Caffe: layer {layer.name!r} "
                                  f"needs an im2col buffer of {buffer} elements, more than 2^31-1")
        elif layer.type == "LRN":
            _, c, h, w = shapes[layer.bottoms[0]]
            if (c + lrn_size(layer)) * h * w > _INT_MAX:
                raise EngineError(f"the image ({width}x{height}) is too large for Caffe's LRN layer "
                                  f"{layer.name!r}")
    return shapes


def input_layer_name(net: Net) -> str:
    """A name for the layer that holds the input, unused by the net's own layers."""
    names = {layer.name for layer in net.layers}
    name, suffix = net.input_name, 0
    while name in names:
        suffix += 1
        name = f"{net.input_name}_input{suffix}"
    return name


def deploy_prototxt(net: Net, height: int, width: int, pooling: str | None) -> str:
    """The net as Caffe should build it, with the input gradient but no weight gradients.

    The original set `force_backward: true`, which also makes Caffe compute every weight gradient (it turns on
    parameter back-propagation whatever `lr_mult` says), a third of the work thrown away. Instead the input is a
    Parameter layer of 1x3xHxW with `lr_mult: 1`, so everything above it needs backward through the data, the
    weights get `lr_mult: 0`, so Caffe skips their gradients, and each blob nothing reads gets `loss_weight: 1`, so
    Caffe counts every layer as contributing to a loss (it computes a dot product with that blob's diff in forward,
    which is ignored). Geometry is written the way the torch engine reads it, so both engines run the same net and
    Caffe meets no conflicting fields; `pooling` replaces the method of every pooling layer.
    """
    msg = pb.NetParameter(name=net.name or "net")
    outputs = _unread_tops(net)
    source = msg.layer.add(name=input_layer_name(net), type="Parameter", top=[net.input_name])
    source.param.add(lr_mult=1, decay_mult=0)
    if net.input_name in outputs.get(-1, ()):
        source.loss_weight.append(1)
    for index, layer in enumerate(net.layers):
        lp = msg.layer.add(name=layer.name, type=layer.type, bottom=list(layer.bottoms), top=list(layer.tops))
        if layer.type == "Convolution":
            _write_convolution(lp.convolution_param, layer)
        elif layer.type == "Pooling":
            _write_pooling(lp.pooling_param, layer, pooling)
        elif layer.type == "Concat":
            lp.concat_param.axis = concat_axis(layer)
        else:
            field = LAYER_TYPES[layer.type].field
            if field is not None and layer.params is not None:
                getattr(lp, field).CopyFrom(layer.params)
                if layer.type in ("ReLU", "LRN"):
                    # No cuDNN in our builds: an explicit CUDNN engine would end Caffe.
                    getattr(lp, field).ClearField("engine")
        for _ in range(len(net.weights.get(layer.name, []))):
            lp.param.add(lr_mult=0, decay_mult=0)
        unread = outputs.get(index, ())
        if unread:
            lp.loss_weight.extend(1 if top in unread else 0 for top in layer.tops)
    text = text_format.MessageToString(msg)
    # Our schema leaves out ParameterParameter (field 145 of Caffe's LayerParameter); its text is short.
    shape = f"parameter_param {{ shape {{ dim: 1 dim: 3 dim: {int(height)} dim: {int(width)} }} }}\n"
    head, sep, rest = text.partition('type: "Parameter"\n')
    return head + sep + "  " + shape + rest


def _unread_tops(net: Net) -> dict[int, set[str]]:
    """Layer index (-1 for the input) -> its tops that no later layer reads after this layer last wrote them."""
    last_writer = {net.input_name: -1, **{top: i for i, layer in enumerate(net.layers) for top in layer.tops}}
    read_after: set[str] = set()
    for index, layer in enumerate(net.layers):
        read_after.update(b for b in layer.bottoms if last_writer.get(b, index) < index)
    out: dict[int, set[str]] = {}
    for blob, index in last_writer.items():
        if blob not in read_after:
            out.setdefault(index, set()).add(blob)
    return out


def _write_convolution(out: Any, layer: Layer) -> None:
    g = conv_geometry(layer)
    out.num_output = g.num_output
    out.bias_term = g.bias
    out.group = g.group
    out.kernel_h, out.kernel_w = g.kernel
    out.stride_h, out.stride_w = g.stride
    out.pad_h, out.pad_w = g.pad
    out.dilation.extend(g.dilation)
    # Fillers are left out: the weights are copied in, and filling big layers at random would only cost time.


def _write_pooling(out: Any, layer: Layer, pooling: str | None) -> None:
    p = pool_geometry(layer, pooling)
    out.pool = pb.PoolingParameter.MAX if p.method == "max" else pb.PoolingParameter.AVE
    if p.global_pooling:
        out.global_pooling = True
        return
    out.kernel_h, out.kernel_w = p.kernel
    out.stride_h, out.stride_w = p.stride
    out.pad_h, out.pad_w = p.pad
