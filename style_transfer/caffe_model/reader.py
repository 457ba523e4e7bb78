"""Reading .prototxt (text) and .caffemodel (binary) files in both of Caffe's layouts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import message, text_format

from style_transfer.caffe_model import caffe_schema_pb2 as pb
from style_transfer.caffe_model.layers import LAYER_TYPES, V1_TYPES, Layer, fmt_shape
from style_transfer.caffe_model.net import Net
from style_transfer.errors import ModelError
from style_transfer.util import reason


def read_prototxt_message(path: str | os.PathLike[str]) -> pb.NetParameter:
    text = _read_bytes(path, "prototxt")
    param = pb.NetParameter()
    try:
        # Training-only fields this schema leaves out (transform_param, data_param, ...) are skipped, not errors.
        text_format.Parse(text.decode("utf-8"), param, allow_unknown_field=True)
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not a text prototxt (is it a binary caffemodel?)") from None
    except text_format.ParseError as exc:
        raise ModelError(f"{path}: prototxt syntax error at line {exc.GetLine()}, column {exc.GetColumn()}: "
                         f"{_strip_position(str(exc))}") from None
    if not param.layer and not param.layers:
        raise ModelError(f"{path}: the prototxt defines no layers")
    return param


def read_caffemodel_message(path: str | os.PathLike[str]) -> pb.NetParameter:
    data = _read_bytes(path, "caffemodel")
    param = pb.NetParameter()
    try:
        param.ParseFromString(data)
    except (message.DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{path}: not a valid caffemodel ({exc or 'truncated or corrupt'})") from None
    if not param.layer and not param.layers:
        raise ModelError(f"{path}: not a valid caffemodel (it holds no layers)")
    return param


def _strip_position(text: str) -> str:
    # ParseError's text starts with "line:col : "; the position is already in our message.
    head, sep, tail = text.partition(" : ")
    return tail if sep and head.replace(":", "").isdigit() else text


def _read_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{what} file not found: {p}")
    if p.is_dir():
        raise ModelError(f"{what} path is a folder, not a file: {p}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {what} {p}: {reason(exc)}") from None
    if not data:
        raise ModelError(f"{what} file is empty: {p}")
    return data


def _in_test_phase(raw: Any) -> bool:
    if raw.include:
        return any(not r.HasField("phase") or r.phase == pb.TEST for r in raw.include)
    return not any(r.HasField("phase") and r.phase == pb.TEST for r in raw.exclude)


def _layer_type(raw: Any) -> str:
    if isinstance(raw, pb.V1LayerParameter):
        name = pb.V1LayerParameter.LayerType.Name(raw.type)
        return V1_TYPES.get(name, name)
    return str(raw.type)


def _layers(param: pb.NetParameter) -> Any:
    """The layers in whichever layout the net uses: LayerParameter or V1LayerParameter messages."""
    if param.layer and param.layers:
        raise ModelError("the net mixes the current `layer` and the old `layers` layouts")
    return param.layer or param.layers


def net_from_message(param: pb.NetParameter, source: str = "prototxt") -> Net:
    """The deploy net in TEST phase, its input declared by `input`+`input_dim`/`input_shape` or an Input layer."""
    input_name: str | None = None
    input_shape: tuple[int, ...] | None = None
    if len(param.input) > 1:
        raise ModelError(f"{source}: the net has {len(param.input)} inputs; only single-input nets are supported")
    if param.input:
        input_name = param.input[0]
        if param.input_shape:
            input_shape = tuple(int(d) for d in param.input_shape[0].dim)
        elif param.input_dim:
            if len(param.input_dim) != 4:
                raise ModelError(f"{source}: input_dim needs 4 values (N, C, H, W), got {len(param.input_dim)}")
            input_shape = tuple(int(d) for d in param.input_dim)
    layers: list[Layer] = []
    seen: set[str] = set()
    for raw in _layers(param):
        if not _in_test_phase(raw):
            continue
        kind = _layer_type(raw)
        name = str(raw.name) or f"{kind.lower()}{len(layers)}"
        if name in seen:
            raise ModelError(f"{source}: two layers are named {name!r}")
        seen.add(name)
        if kind == "Input":
            if input_name is not None:
                raise ModelError(f"{source}: the net declares more than one input")
            if len(raw.top) != 1:
                raise ModelError(f"{source}: Input layer {name!r} must have exactly one top")
            input_name = str(raw.top[0])
            shapes = raw.input_param.shape
            input_shape = tuple(int(d) for d in shapes[0].dim) if shapes else None
            continue
        field = LAYER_TYPES[kind].field if kind in LAYER_TYPES else None
        params = getattr(raw, field) if field else None
        layers.append(Layer(name=name, type=kind, bottoms=tuple(raw.bottom), tops=tuple(raw.top), params=params))
    if input_name is None:
        raise ModelError(f"{source}: the net declares no input (use `input:` with `input_shape`/`input_dim`, "
                         "or an Input layer)")
    if input_shape is not None and len(input_shape) != 4:
        raise ModelError(f"{source}: input shape must have 4 dimensions (N, C, H, W), got {input_shape}")
    return Net(name=str(param.name), input_name=input_name, input_shape=input_shape, layers=layers)


def _blob_shape(blob: pb.BlobProto) -> tuple[int, ...]:
    """`shape` in the current layout, num/channels/height/width in V1."""
    dims = blob.shape.dim if blob.HasField("shape") else (blob.num, blob.channels, blob.height, blob.width)
    return tuple(int(d) for d in dims)


def blob_array(blob: pb.BlobProto, where: str) -> np.ndarray:
    """A learned blob as float32, in its shape."""
    shape = _blob_shape(blob)
    values = blob.data if len(blob.data) else blob.double_data
    count = int(np.prod(shape))
    if len(values) != count:
        raise ModelError(f"{where}: blob of shape {fmt_shape(shape)} holds {len(values)} values, "
                         f"expected {count} (truncated or corrupt caffemodel)")
    return np.fromiter(values, dtype=np.float32, count=count).reshape(shape)


class CaffeModelWeights:
    """Learned blobs of a caffemodel by layer name, converted to arrays only when a layer asks for them."""

    def __init__(self, param: pb.NetParameter, source: str) -> None:
        self._source = source
        self._raw = {str(raw.name): list(raw.blobs) for raw in _layers(param) if raw.blobs}

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __getitem__(self, name: str) -> list[np.ndarray]:
        return [blob_array(b, f"{self._source}: layer {name!r}") for b in self._raw[name]]

    def keys(self) -> list[str]:
        return list(self._raw)

    def shapes(self, name: str) -> list[tuple[int, ...]]:
        return [_blob_shape(b) for b in self._raw[name]]


def read_prototxt(path: str | os.PathLike[str]) -> Net:
    return net_from_message(read_prototxt_message(path), str(path))


def read_caffemodel(path: str | os.PathLike[str]) -> CaffeModelWeights:
    return CaffeModelWeights(read_caffemodel_message(path), str(path))
