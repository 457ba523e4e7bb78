"""The Caffe engine: pycaffe itself, as the original tool ran it.

The engine builds a `caffe.Net` from the deploy prototxt that caffe_deploy.py writes for the already truncated and
weight-checked `Net`, after that module's checks (Caffe ends the whole process on a failed internal CHECK), and
copies the weights in from memory, so a big caffemodel is read once, by our reader.

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

from style_transfer.caffe_model.layers import fmt_shape
from style_transfer.caffe_model.net import Net
from style_transfer.engines.base import Engine, Evaluator, FeatureGradEvaluator, FeatureGrads, InputTerm
from style_transfer.engines.caffe_deploy import check_net, check_size, deploy_prototxt, input_layer_name
from style_transfer.errors import EngineError, ModelError
from style_transfer.losses import Objective, TorchTargets
from style_transfer.util import one_line

INSTALL_HINT = "run scripts/install_caffe.sh (e.g. PYTHON=.venv/bin/python bash scripts/install_caffe.sh)"
REBUILD_HINT = "rebuild it with scripts/install_caffe.sh --rebuild"

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
    return not library or _library_is_cpu_only(os.path.realpath(library))


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
    count = ctypes.c_int(0)
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except (OSError, AttributeError):
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


@dataclass(frozen=True)
class _Plan:
    """How one objective's backward pass runs through the Caffe net."""

    end: int  # the deepest layer the objective needs
    groups: list[tuple[int, list[str]]]  # (last writer, loss blobs), deepest first
    accumulate: dict[str, bool]  # loss blob -> whether a deeper layer's backward writes its diff first
    dangling: list[str]  # blobs in use whose diff no backward step writes: zeroed before each backward pass


class CaffeEngine(Engine):
    name = "caffe"

    def __init__(self, net: Net, pooling: str, device: str, *, caffe: Any) -> None:
        """`caffe` is the module import_caffe gives."""
        super().__init__(net, pooling, device)
        if pooling not in ("avg", "max", "file"):
            raise EngineError(f"pooling must be avg, max or file, got {pooling!r}")
        self._caffe = caffe
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
        # Caffe's layer order, which includes the Split layers Caffe inserts where a blob has several readers;
        # blob -> index of the last layer with it as a top (the in-place ReLU, say); blob -> indices of its readers.
        self._layer_names: list[str] = []
        self._last_writers: dict[str, int] = {}
        self._readers: dict[str, list[int]] = {}
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
        for index, name in enumerate(names):
            for top in cnet.top_names[name]:
                self._last_writers[str(top)] = index
            for bottom in cnet.bottom_names[name]:
                self._readers.setdefault(str(bottom), []).append(index)
        self._cnet = cnet
        self._layer_names = names

    def _check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            got = tuple(self._cnet.blobs[name].data.shape)
            if got != tuple(shape):
                raise EngineError(f"Caffe gives blob {name!r} the shape {fmt_shape(got)}, this tool expects "
                                  f"{fmt_shape(shape)}")

    def _last_writer(self, blob: str) -> int:
        index = self._last_writers.get(blob)
        if index is None:
            raise ModelError(f"the net has no blob {blob!r}; available: "
                             f"{', '.join(self.net.blob_names()[1:])}")
        return index

    def features(self, image: np.ndarray, blobs: Sequence[str]) -> dict[str, np.ndarray]:
        cnet = self._net_for(image)
        if blobs:
            end = max(self._last_writer(b) for b in blobs)
            cnet.forward(end=self._layer_names[end])
        return {b: np.array(cnet.blobs[b].data[0], dtype=np.float32) for b in blobs}

    def bind(self, objective: Objective) -> Evaluator:
        """The objective with the torch engine's loss functions, which read Caffe's blobs without a copy. The net
        and its blobs are the engine's; each evaluation writes every blob it reads before reading it."""
        targets = TorchTargets.of(objective, lambda a: torch.from_numpy(np.array(a, dtype=np.float32)),
                                  torch.contiguous_format)
        return FeatureGradEvaluator(self, objective, targets, torch.float32)

    def _plan(self, layers: tuple[str, ...]) -> _Plan:
        plan = self._plans.get(layers)
        if plan is not None:
            return plan
        writers = {b: self._last_writer(b) for b in layers}
        end = max(writers.values())

        def read_later(blob: str, after: int) -> bool:
            return any(after < r <= end for r in self._readers.get(blob, []))

        groups: dict[int, list[str]] = {}
        for blob, index in writers.items():
            groups.setdefault(index, []).append(blob)
        dangling = [b for b, w in self._last_writers.items()
                    if w <= end and b not in writers and not read_later(b, w)]
        plan = _Plan(end=end, groups=sorted(groups.items(), reverse=True),
                     accumulate={b: read_later(b, w) for b, w in writers.items()}, dangling=dangling)
        self._plans[layers] = plan
        return plan

    def vjp(self, image: np.ndarray, blobs: Sequence[str], fn: FeatureGrads,
            input_term: InputTerm | None = None) -> tuple[dict[str, float], float, np.ndarray]:
        cnet = self._net_for(image)
        terms: dict[str, float] = {}
        grad = np.zeros(image.shape, np.float32)
        if blobs:
            names = self._layer_names
            plan = self._plan(tuple(blobs))
            cnet.forward(end=names[plan.end])
            feats = {b: torch.from_numpy(cnet.blobs[b].data) for b in blobs}
            terms, injected = fn(feats)
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
            for index, group in plan.groups:
                if current > index:
                    cnet.backward(start=names[current], end=names[index + 1])
                for blob in group:
                    diff = cnet.blobs[blob].diff
                    # A blob `fn` gives no gradient gets none of its own (what flows back through it stays).
                    if not plan.accumulate[blob]:
                        diff[...] = injected[blob].numpy() if blob in injected else 0
                    elif blob in injected:
                        diff += injected[blob].numpy()
                current = index
            cnet.backward(start=names[current], end=names[0])
            grad = np.array(self._input_blob().diff[0], dtype=np.float32)
        value = 0.0
        if input_term is not None:
            x = torch.tensor(image, dtype=torch.float32, requires_grad=True)
            term = input_term(x)
            grad += torch.autograd.grad(term, x)[0].numpy()
            value = float(term.detach())
        return terms, value, grad

