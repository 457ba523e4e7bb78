"""Tiny Caffe nets the tests write themselves: prototxts in every input style and caffemodels in both layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf import text_format

from style_transfer.caffe_model import caffe_schema_pb2 as pb
from style_transfer.caffe_model.net import expected_param_shapes, infer_shapes
from style_transfer.caffe_model.reader import net_from_message

# (name, type, bottom, top, params) in the current layout's terms; ReLUs in place as in the public files.
TINY_LAYERS: list[tuple[str, str, str, str, str]] = [
    ("conv1", "Convolution", "data", "conv1", "convolution_param { num_output: 4 kernel_size: 3 pad: 1 }"),
    ("relu1", "ReLU", "conv1", "conv1", ""),
    ("pool1", "Pooling", "conv1", "pool1", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"),
    ("conv2", "Convolution", "pool1", "conv2",
     "convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 }"),
    ("relu2", "ReLU", "conv2", "conv2", ""),
    ("pool2", "Pooling", "conv2", "pool2", "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }"),
    ("conv3", "Convolution", "pool2", "conv3", "convolution_param { num_output: 5 kernel_h: 3 kernel_w: 1 "
                                               "pad_h: 1 pad_w: 0 }"),
    ("relu3", "ReLU", "conv3", "conv3", ""),
    ("fc", "InnerProduct", "conv3", "fc", "inner_product_param { num_output: 7 }"),
]

_V1_NAMES = {"Convolution": "CONVOLUTION", "ReLU": "RELU", "Pooling": "POOLING", "InnerProduct": "INNER_PRODUCT",
             "LRN": "LRN", "Concat": "CONCAT", "Dropout": "DROPOUT"}


def prototxt(layout: str = "v2", input_style: str = "input_shape", size: int = 24,
             layers: list[tuple[str, str, str, str, str]] | None = None) -> str:
    """A deploy prototxt; layout "v2" (`layer`, string types) or "v1" (`layers`, enum types)."""
    layers = TINY_LAYERS if layers is None else layers
    lines = ['name: "tiny"']
    if input_style == "input_shape":
        lines += ['input: "data"', f"input_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}"]
    elif input_style == "input_dim":
        lines += ['input: "data"', "input_dim: 1", "input_dim: 3", f"input_dim: {size}", f"input_dim: {size}"]
    elif input_style == "layer":
        lines.append('layer { name: "data" type: "Input" top: "data" '
                     f"input_param {{ shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }} }} }}")
    else:
        raise ValueError(input_style)
    for name, kind, bottom, top, params in layers:
        if layout == "v2":
            bottoms = " ".join(f'bottom: "{b}"' for b in bottom.split())
            lines.append(f'layer {{ name: "{name}" type: "{kind}" {bottoms} top: "{top}" {params} }}')
        else:
            bottoms = " ".join(f'bottom: "{b}"' for b in bottom.split())
            lines.append(f'layers {{ name: "{name}" type: {_V1_NAMES[kind]} {bottoms} top: "{top}" {params} }}')
    return "\n".join(lines) + "\n"


def random_weights(text: str, seed: int = 0, scale: float = 0.3) -> dict[str, list[np.ndarray]]:
    """Weights for every learned layer of a prototxt, drawn at random with the shapes it needs."""
    msg = pb.NetParameter()
    text_format.Parse(text, msg)
    net = net_from_message(msg)
    assert net.input_shape is not None
    shapes = infer_shapes(net, net.input_shape)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for layer in net.layers:
        wanted = expected_param_shapes(layer, shapes[layer.bottoms[0]]) if layer.bottoms else []
        if wanted:
            fan_in = int(np.prod(wanted[0][1:]))
            out[layer.name] = [(rng.standard_normal(s) * scale * np.sqrt(9.0 / fan_in) if i == 0
                                else rng.standard_normal(s) * 0.1).astype(np.float32)
                               for i, s in enumerate(wanted)]
    return out


def caffemodel_bytes(text: str, weights: dict[str, list[np.ndarray]], layout: str = "v2") -> bytes:
    """The prototxt's net with weights, serialised as Caffe saves it: V1 blobs are 4-D num/channels/height/width."""
    msg = pb.NetParameter()
    text_format.Parse(text, msg)
    layers = msg.layer if layout == "v2" else msg.layers
    for layer in layers:
        for array in weights.get(layer.name, []):
            blob = layer.blobs.add()
            if layout == "v2":
                blob.shape.dim.extend(array.shape)
            else:
                legacy = (1,) * (4 - array.ndim) + array.shape
                blob.num, blob.channels, blob.height, blob.width = legacy
            blob.data.extend(array.astype(np.float32).ravel().tolist())
    return msg.SerializeToString()


def write_net(folder: Path, layout: str = "v2", input_style: str = "input_shape", seed: int = 0, size: int = 24,
              layers: list[tuple[str, str, str, str, str]] | None = None) -> tuple[Path, Path]:
    """Write tiny.prototxt and tiny.caffemodel into `folder`; returns their paths."""
    text = prototxt(layout, input_style, size, layers)
    proto = folder / f"tiny-{layout}-{input_style}.prototxt"
    model = folder / f"tiny-{layout}-{input_style}.caffemodel"
    proto.write_text(text)
    model.write_bytes(caffemodel_bytes(text, random_weights(text, seed), layout))
    return proto, model
