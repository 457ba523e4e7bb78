"""The Caffe engine: pycaffe itself, as the original tool ran it.

The engine writes a deploy prototxt for Caffe from the already truncated and weight-checked `Net` (the input at the
image's size, the chosen pooling in every pooling layer, set up so that Caffe computes the input gradient and no
weight gradients), builds a `caffe.Net` from it and copies the weights in from memory, so a big caffemodel is read
once, by our reader. Caffe ends the whole process on a failed internal CHECK, so everything Caffe would check is
checked here first and reported as a ModelError or EngineError: layer types, blob wiring, parameter combinations,
shapes at every input size, 32-bit element counts.

Gradients follow the original tool: one forward pass, then, from the deepest loss blob to the shallowest, the loss
gradient is added into the blob's diff and Caffe's backward runs down to the next loss blob and finally to the input.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import mmap
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from google.protobuf import text_format

from style_transfer.caffe_model import caffe_schema_pb2 as pb
from style_transfer.caffe_model.layers import (
    LAYER_TYPES,
    RUNNABLE,
    Layer,
    concat_axis,
    conv_geometry,
    lrn_size,
    pool_geometry,
)
from style_transfer.caffe_model.loader import check_input_shape
from style_transfer.caffe_model.net import Net, infer_shapes
from style_transfer.engines.base import Engine, Evaluation, Evaluator
from style_transfer.errors import EngineError, ModelError
from style_transfer.losses import Objective, TorchTargets, terms_and_feature_grads, tv_loss_torch
from style_transfer.util import one_line

INSTALL_HINT = "run scripts/install_caffe.sh (e.g. PYTHON=.venv/bin/python bash scripts/install_caffe.sh)"
REBUILD_HINT = "rebuild it with scripts/install_caffe.sh --rebuild"

# Blob and im2col buffer sizes are 32-bit ints inside Caffe; beyond this it aborts.
_INT_MAX = 2**31 - 1

# The message of Caffe's NO_GPU macro is compiled into the library only by a CPU_ONLY build, so finding it in
# _caffe.so tells the build apart without calling anything that would abort (set_device does in a CPU_ONLY build).
_CPU_ONLY_MARKER = b"Cannot use GPU in CPU-only Caffe"

_NO_GPU_NOTICE = "running on the CPU (use -g -1 to say so)"


def import_caffe(verbose: bool = False) -> Any:
    """pycaffe, with glog's INFO and WARNING lines silenced unless `verbose` (or the environment says otherwise)."""
    if not verbose:
        # glog reads this when the library loads; a value the user set wins.
        os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        return importlib.import_module("caffe")
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "caffe"):
            raise EngineError(f"pycaffe cannot be imported: {one_line(exc)}; {INSTALL_HINT}") from None
        raise EngineError(f"pycaffe is not installed: {INSTALL_HINT}") from None
    except ImportError as exc:
        if "halted; None in sys.modules" in str(exc):
            raise EngineError(f"pycaffe is not installed: {INSTALL_HINT}") from None
        raise EngineError(f"pycaffe cannot be imported: {one_line(exc)}; {REBUILD_HINT}") from None
    except Exception as exc:  # a broken build fails in many ways (NumPy ABI, protobuf version, ...)
        raise EngineError(f"pycaffe cannot be imported ({type(exc).__name__}: {one_line(exc)}); "
                          f"{REBUILD_HINT}") from None


def caffe_is_cpu_only(caffe: Any) -> bool:
    """Whether pycaffe was built with CPU_ONLY (then any GPU call ends the process)."""
    library = getattr(getattr(caffe, "_caffe", None), "__file__", None)
    if not library:
        return True
    return _library_is_cpu_only(os.path.realpath(library))


@functools.lru_cache(maxsize=4)
def _library_is_cpu_only(path: str) -> bool:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(_CPU_ONLY_MARKER) >= 0
    except (OSError, ValueError):
        # Unreadable: assume the worst, since guessing wrong about a GPU aborts the process.
        return True


def cuda_device_count() -> int:
    """CUDA devices the driver sees (honouring CUDA_VISIBLE_DEVICES); 0 without a driver. Asked of the driver
    directly, because Caffe has no such query and aborts on a device id that does not exist."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    try:
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except AttributeError:
        return 0
    return int(count.value)


def resolve_caffe_device(caffe: Any, gpu: int) -> tuple[str, str | None]:
    """The device for the original `-g` ("cpu" or "cuda:N"), and a notice when the default GPU 0 falls back to the
    CPU."""
    if gpu < 0:
        return "cpu", None
    if caffe_is_cpu_only(caffe):
        if gpu == 0:
            return "cpu", f"this Caffe build is CPU-only; {_NO_GPU_NOTICE}"
        raise EngineError(f"GPU {gpu} requested but this Caffe build is CPU-only (use -g -1 for the CPU, or build "
                          "Caffe with CUDA: scripts/install_caffe.sh --cuda)")
    count = cuda_device_count()
    if count == 0:
        if gpu == 0:
            return "cpu", f"no CUDA device is available to Caffe; {_NO_GPU_NOTICE}"
        raise EngineError(f"GPU {gpu} requested but no CUDA device is available (use -g -1 for the CPU)")
    if gpu >= count:
        raise EngineError(f"GPU {gpu} does not exist; this machine has {count} CUDA device(s): 0..{count - 1}")
    return f"cuda:{gpu}", None


def create_caffe_engine(net: Net, pooling: str, gpu: int, verbose: bool = False) -> tuple[CaffeEngine, str | None]:
    """The Caffe engine on the device `-g` names, and a one-line notice about the device, if any."""
    caffe = import_caffe(verbose)
    device, notice = resolve_caffe_device(caffe, gpu)
    return CaffeEngine(net, pooling, device, caffe=caffe), notice


# ----------------------------------------------------------------------------------------------- checks


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
                              f"{'x'.join(map(str, shape))} elements, more than 2^31-1")
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


# ----------------------------------------------------------------------------------------------- prototxt


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
    last_writer = {net.input_name: -1}
    for index, layer in enumerate(net.layers):
        for top in layer.tops:
            last_writer[top] = index
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


# ----------------------------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class _Topology:
    """Caffe's layer order, which includes the Split layers Caffe inserts where a blob has several readers."""

    layer_names: list[str]
    last_writer: dict[str, int]  # blob -> index of the last layer with it as a top (the in-place ReLU, say)
    readers: dict[str, list[int]]  # blob -> indices of the layers with it as a bottom


@dataclass(frozen=True)
class _Plan:
    """How one objective's backward pass runs through the Caffe net."""

    end: int  # the deepest layer the objective needs
    groups: list[tuple[int, list[str]]]  # (last writer, loss blobs), deepest first
    accumulate: dict[str, bool]  # loss blob -> whether a deeper layer's backward writes its diff first
    dangling: list[str]  # blobs in use whose diff no backward step writes: zeroed before each backward pass


class CaffeEngine(Engine):
    name = "caffe"

    def __init__(self, net: Net, pooling: str, device: str = "cpu", *, caffe: Any = None,
                 verbose: bool = False) -> None:
        super().__init__(net, pooling, device)
        if pooling not in ("avg", "max", "file"):
            raise EngineError(f"pooling must be avg, max or file, got {pooling!r}")
        self._caffe = caffe if caffe is not None else import_caffe(verbose)
        self._override = None if pooling == "file" else pooling
        match = re.fullmatch(r"cuda:(\d+)", device)
        if device != "cpu" and match is None:
            raise EngineError(f"unknown device {device!r} for the Caffe engine (cpu or cuda:N)")
        self._gpu = int(match.group(1)) if match else None
        if self._gpu is not None and (caffe_is_cpu_only(self._caffe) or self._gpu >= cuda_device_count()):
            # set_device on a CPU-only build or a missing device would end the process.
            raise EngineError(f"Caffe cannot use {device}; use create_caffe_engine to pick a device")
        check_net(net)
        self._input_layer = input_layer_name(net)
        for layer in net.layers:
            if layer.type == "Convolution" and layer.name not in net.weights:
                raise ModelError(f"layer {layer.name!r} has no weights")
        self._cnet: Any = None
        self._topology: _Topology | None = None
        self._size: tuple[int, int] | None = None
        self._checked: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
        self._plans: dict[tuple[str, ...], _Plan] = {}

    # -- the Caffe net at an input size

    def _activate(self) -> None:
        # Caffe's mode and device are per-thread globals that another engine may have changed.
        if self._gpu is None:
            self._caffe.set_mode_cpu()
        else:
            self._caffe.set_device(self._gpu)
            self._caffe.set_mode_gpu()

    def _net_for(self, image: np.ndarray) -> Any:
        if image.ndim != 3 or image.shape[0] != 3:
            raise EngineError(f"expected a 3 x H x W image, got shape {image.shape}")
        size = (int(image.shape[1]), int(image.shape[2]))
        self._activate()
        if size != self._size:
            shapes = self._checked.get(size)
            if shapes is None:
                shapes = check_size(self.net, size[0], size[1], self._override)
                self._checked[size] = shapes
            if self._cnet is None:
                self._build(size)
            else:
                # Reshaping one net to each new size keeps a single copy of the weights and never rebuilds; blobs
                # only grow, so alternating sizes (style, content, scales) reuse their memory. Safe because the
                # net holds no fc layers and the new shapes were checked above. The Parameter layer's blob and
                # its top are both reshaped: its forward shares the one's memory with the other.
                self._input_blob().reshape(1, 3, *size)
                self._cnet.blobs[self.net.input_name].reshape(1, 3, *size)
                self._cnet.reshape()
            self._size = size
            self._check_shapes(shapes)
        self._input_blob().data[0] = image
        return self._cnet

    def _input_blob(self) -> Any:
        """The Parameter layer's blob: the image goes into its data, the gradient comes out of its diff."""
        return self._cnet.params[self._input_layer][0]

    def _build(self, size: tuple[int, int]) -> None:
        text = deploy_prototxt(self.net, size[0], size[1], self._override)
        fd, path = tempfile.mkstemp(prefix="style-transfer-", suffix=".prototxt")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            cnet = self._caffe.Net(path, self._caffe.TEST)
        finally:
            os.unlink(path)
        params = cnet.params
        if tuple(params[self._input_layer][0].data.shape) != (1, 3, *size):
            raise EngineError("Caffe did not make the input layer this engine asked for")
        for layer in self.net.layers:
            arrays = self.net.weights.get(layer.name, [])
            blobs = params.get(layer.name, [])
            if len(blobs) != len(arrays):
                raise ModelError(f"layer {layer.name!r}: Caffe made {len(blobs)} learned blob(s), the weights have "
                                 f"{len(arrays)}")
            for blob, array in zip(blobs, arrays, strict=True):
                if tuple(blob.data.shape) != tuple(array.shape):
                    raise ModelError(f"layer {layer.name!r}: Caffe expects weights of shape {blob.data.shape}, "
                                     f"got {array.shape}")
                blob.data[...] = array
        names = [str(n) for n in cnet._layer_names]
        if len(set(names)) != len(names):
            raise ModelError("a layer name of the net clashes with a Split layer Caffe inserted")
        last_writer: dict[str, int] = {}
        readers: dict[str, list[int]] = {}
        for index, name in enumerate(names):
            for top in cnet.top_names[name]:
                last_writer[str(top)] = index
            for bottom in cnet.bottom_names[name]:
                readers.setdefault(str(bottom), []).append(index)
        self._cnet = cnet
        self._topology = _Topology(names, last_writer, readers)

    def _check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        blobs = self._cnet.blobs
        for name, shape in shapes.items():
            got = tuple(blobs[name].data.shape)
            if got != tuple(shape):
                raise EngineError(f"Caffe gives blob {name!r} the shape {'x'.join(map(str, got))}, this tool "
                                  f"expects {'x'.join(map(str, shape))}")

    def _last_writer(self, blob: str) -> int:
        assert self._topology is not None
        index = self._topology.last_writer.get(blob)
        if index is None:
            raise ModelError(f"the net has no blob {blob!r}; available: "
                             f"{', '.join(self.net.blob_names()[1:])}")
        return index

    # -- features

    def features(self, image: np.ndarray, blobs: Sequence[str]) -> dict[str, np.ndarray]:
        cnet = self._net_for(image)
        assert self._topology is not None
        if blobs:
            end = max(self._last_writer(b) for b in blobs)
            cnet.forward(end=self._topology.layer_names[end])
        return {b: np.array(cnet.blobs[b].data[0], dtype=np.float32) for b in blobs}

    # -- objective and gradient

    def bind(self, objective: Objective) -> CaffeEvaluator:
        return CaffeEvaluator(self, objective)

    def _plan(self, layers: tuple[str, ...]) -> _Plan:
        plan = self._plans.get(layers)
        if plan is not None:
            return plan
        topo = self._topology
        assert topo is not None
        writers = {b: self._last_writer(b) for b in layers}
        end = max(writers.values())

        def read_later(blob: str, after: int) -> bool:
            return any(after < r <= end for r in topo.readers.get(blob, []))

        groups: dict[int, list[str]] = {}
        for blob, index in writers.items():
            groups.setdefault(index, []).append(blob)
        dangling = [b for b, w in topo.last_writer.items()
                    if w <= end and b not in writers and not read_later(b, w)]
        plan = _Plan(end=end, groups=sorted(groups.items(), reverse=True),
                     accumulate={b: read_later(b, w) for b, w in writers.items()}, dangling=dangling)
        self._plans[layers] = plan
        return plan


class CaffeEvaluator(Evaluator):
    """An objective on the Caffe engine: Caffe runs the net, losses.py gives the terms and their feature gradients
    (the torch engine's functions, reading Caffe's blobs without a copy), and Caffe's backward takes those to the
    input. The net and its blobs are the engine's; each evaluation writes every blob it reads before reading it."""

    def __init__(self, engine: CaffeEngine, objective: Objective) -> None:
        self.engine = engine
        self.objective = objective
        self.targets = TorchTargets.of(objective, lambda a: torch.from_numpy(np.array(a, dtype=np.float32)),
                                       torch.contiguous_format)

    def evaluate(self, image: np.ndarray) -> Evaluation:
        engine, obj = self.engine, self.objective
        cnet = engine._net_for(image)
        assert engine._topology is not None
        terms: dict[str, float] = {}
        grad = np.zeros(image.shape, np.float32)
        if obj.layers:
            names = engine._topology.layer_names
            plan = engine._plan(tuple(obj.layers))
            cnet.forward(end=names[plan.end])
            feats = {b: torch.from_numpy(cnet.blobs[b].data) for b in obj.layers}
            terms, injected = terms_and_feature_grads(obj, self.targets, feats, torch.float32)
            # Caffe's backward overwrites each bottom diff, so a diff is fresh only if a layer in use reads the blob;
            # the others still hold the last evaluation's values and must not leak into this one.
            for blob in plan.dangling:
                cnet.blobs[blob].diff[...] = 0
            # Backward in segments, deepest loss blob first. A segment ends just above the layer that last wrote the
            # next loss blob, so that blob's diff then holds what flows back from the deeper layers (written by its
            # reader's backward, or by the Split Caffe inserts when it has several), and the loss gradient is added
            # to it (or replaces it, when no layer in use reads the blob). The next segment starts AT that last
            # writer: for conv4_2 that is relu4_2, whose in-place output is the feature the loss sees, so Caffe's own
            # ReLU backward masks the injected gradient (the original masked it by hand, grad * (F > 0), and started
            # at the convolution; the result is the same).
            current = plan.end
            for index, blobs in plan.groups:
                if current > index:
                    cnet.backward(start=names[current], end=names[index + 1])
                for blob in blobs:
                    diff = cnet.blobs[blob].diff
                    if plan.accumulate[blob]:
                        diff += injected[blob].numpy()
                    else:
                        diff[...] = injected[blob].numpy()
                current = index
            cnet.backward(start=names[current], end=names[0])
            grad = np.array(engine._input_blob().diff[0], dtype=np.float32)
        tv = 0.0
        if obj.tv_weight:
            x = torch.tensor(image, dtype=torch.float32, requires_grad=True)
            tv_term = obj.tv_weight * tv_loss_torch(x)
            grad += torch.autograd.grad(tv_term, x)[0].numpy()
            tv = float(tv_term.detach())
        return Evaluation.of(terms, tv, grad)
