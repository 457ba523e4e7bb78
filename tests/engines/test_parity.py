"""The Caffe engine (pycaffe) and the torch engine give the same features, losses, gradients and images.

The weights are drawn by Caffe itself and saved with `Net.save`, so the torch engine reads a caffemodel Caffe wrote
(the real-world check of our reader); V1 files written by the project's test fixtures are read by Caffe as well.
Tolerances: losses relative 1e-4, input gradients relative 1e-3 (norm of the difference over the norm), features
relative 1e-4. Both engines run in float32 and sum in different orders, which is all these allow for.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from style_transfer import images
from style_transfer.caffe_model import caffe_schema_pb2 as pb
from style_transfer.caffe_model.loader import load_net
from style_transfer.caffe_model.net import Net, truncate
from style_transfer.caffe_model.reader import read_prototxt, read_prototxt_message
from style_transfer.caffe_model.registry import MODELS
from style_transfer.engines.base import Engine, Evaluation
from style_transfer.engines.torch import TorchEngine
from style_transfer.errors import EngineError
from style_transfer.losses import Objective, gram_numpy
from style_transfer.transfer import StyleTransfer
from tests import tinynets

pytestmark = pytest.mark.caffe

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "PYTHON=.venv/bin/python bash scripts/install_caffe.sh"

LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3
FEATURE_RTOL = 1e-4

# Input sizes that keep every preset blob non-empty with either pooling (VGG: conv5_1 is 4x4 at 64 px; CaffeNet:
# conv1 is 11x11 stride 4, conv5 5x5 at 96 px; GoogLeNet: inception_5a 3x3 at 96 px) and keep the file fast.
SIZES = {"vgg16": 64, "vgg19": 64, "googlenet": 96, "caffenet": 96}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_caffe() -> Any:
    """pycaffe, or a skip that says how to install it. In CI (CI set) a failure instead: CI must run these tests."""
    from style_transfer.engines.caffe import import_caffe

    try:
        return import_caffe(verbose=False)
    except EngineError as exc:
        message = str(exc) if INSTALL in str(exc) else f"{exc} (install it with: {INSTALL})"
        if in_ci():
            pytest.fail(f"{message} [CI is set, so the Caffe tests must run]", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def caffe() -> Any:
    return require_caffe()


@pytest.fixture(scope="module", autouse=True)
def one_thread_each() -> Iterator[None]:
    """One thread for torch and for Caffe's OpenBLAS while these tests run: on small inputs and a few shared cores,
    thread pools that spin-wait for each other (torch's OpenMP, Caffe's OpenBLAS) cost three times the work."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    openblas = _caffe_openblas()
    before = openblas.openblas_get_num_threads() if openblas is not None else None
    if openblas is not None:
        openblas.openblas_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        if openblas is not None:
            openblas.openblas_set_num_threads(before)


def _caffe_openblas() -> Any:
    """The OpenBLAS Caffe links (Debian's), if it is the BLAS in use; None otherwise."""
    try:
        lib = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD)
    except OSError:
        return None
    if not hasattr(lib, "openblas_set_num_threads") or not hasattr(lib, "openblas_get_num_threads"):
        return None
    return lib


def caffe_engine(caffe: Any, net: Net, pooling: str) -> Engine:
    from style_transfer.engines.caffe import CaffeEngine

    return CaffeEngine(net, pooling, "cpu", caffe=caffe)


# ----------------------------------------------------------------------------------------------- fixtures


def caffe_written_weights(caffe: Any, prototxt: Path, blobs: list[str], size: int, folder: Path,
                          seed: int = 1) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """A caffemodel of random weights that Caffe draws (MSRA filler, Gaussian biases) and saves itself, for the
    layers the blobs need; returns its path and the weights as Caffe holds them."""
    msg = read_prototxt_message(prototxt)
    keep = {layer.name for layer in truncate(read_prototxt(prototxt), blobs).layers}
    out = pb.NetParameter(name=msg.name)
    for layer in msg.layer:
        if layer.type == "Input":
            new = out.layer.add()
            new.CopyFrom(layer)
            del new.input_param.shape[0].dim[:]
            new.input_param.shape[0].dim.extend([1, 3, size, size])
        elif layer.name in keep:
            new = out.layer.add()
            new.CopyFrom(layer)
            if layer.type == "Convolution":
                new.convolution_param.weight_filler.type = "msra"
                new.convolution_param.bias_filler.type = "gaussian"
                new.convolution_param.bias_filler.std = 0.5
    stem = f"{prototxt.parent.name}-{size}"
    path = folder / f"{stem}-fillers.prototxt"
    path.write_text(text_format.MessageToString(out))
    caffe.set_mode_cpu()
    caffe.set_random_seed(seed)
    cnet = caffe.Net(str(path), caffe.TEST)
    model = folder / f"{stem}.caffemodel"
    cnet.save(str(model))
    return model, {name: [np.array(b.data) for b in blobs_] for name, blobs_ in cnet.params.items()}


Shipped = tuple[Path, Path, list[str], Net]


@pytest.fixture(scope="module")
def shipped(caffe: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Shipped]:
    """Per model: its shipped prototxt, a caffemodel Caffe wrote for the preset blobs, those blobs, and the net as
    our loader reads it from the two files (pooling only matters to its shape checks, which pass for both)."""
    folder = tmp_path_factory.mktemp("caffe-written")
    made: dict[str, Shipped] = {}

    def get(name: str) -> Shipped:
        if name not in made:
            info = MODELS[name]
            blobs = list(dict.fromkeys([*info.style_layers, *info.content_layers]))
            model, held = caffe_written_weights(caffe, info.prototxt, blobs, SIZES[name], folder)
            net = load_net(info.prototxt, model, blobs)
            # Our reader returns exactly what Caffe held and saved, layer by layer.
            assert set(net.weights) == set(held)
            for layer, arrays in held.items():
                assert len(net.weights[layer]) == len(arrays)
                for ours, theirs in zip(net.weights[layer], arrays, strict=True):
                    np.testing.assert_array_equal(ours, theirs)
            made[name] = (info.prototxt, model, blobs, net)
        return made[name]

    return get


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A preprocessed image (3 x H x W BGR, mean subtracted) within the pixel bounds."""
    rgb = rng.uniform(0.0, 1.0, (height, width, 3)).astype(np.float32)
    return images.preprocess(rgb)


def rel(a: np.ndarray | float, b: np.ndarray | float) -> float:
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def objective_for(engine: Engine, style_weights: dict[str, float], content_weights: dict[str, float],
                  style: np.ndarray, content: np.ndarray, ratio: float = 1e4, tv_weight: float = 0.0) -> Objective:
    grams = {k: gram_numpy(v)[None] for k, v in engine.features(style, list(style_weights)).items()}
    return Objective(content_weights=content_weights, style_weights=style_weights, ratio=ratio,
                     content_targets=engine.features(content, list(content_weights)), style_targets=grams,
                     tv_weight=tv_weight)


def assert_features_match(torch_engine: Engine, caffe_eng: Engine, image: np.ndarray, blobs: list[str]) -> float:
    want = torch_engine.features(image, blobs)
    got = caffe_eng.features(image, blobs)
    worst = 0.0
    for blob in blobs:
        assert got[blob].shape == want[blob].shape, blob
        assert got[blob].dtype == np.float32
        worst = max(worst, rel(got[blob], want[blob]))
        assert rel(got[blob], want[blob]) < FEATURE_RTOL, blob
    return worst


def assert_evaluations_match(got: Evaluation, want: Evaluation) -> tuple[float, float]:
    assert got.grad.shape == want.grad.shape and got.grad.dtype == np.float32
    assert set(got.layers) == set(want.layers)
    for key in want.layers:
        assert got.layers[key] == pytest.approx(want.layers[key], rel=LOSS_RTOL), key
    assert got.style_loss == pytest.approx(want.style_loss, rel=LOSS_RTOL)
    assert got.content_loss == pytest.approx(want.content_loss, rel=LOSS_RTOL)
    assert got.tv_loss == pytest.approx(want.tv_loss, rel=LOSS_RTOL)
    loss_rel = abs(got.loss - want.loss) / abs(want.loss)
    grad_rel = rel(got.grad, want.grad)
    assert loss_rel < LOSS_RTOL
    assert grad_rel < GRAD_RTOL
    return loss_rel, grad_rel


def compare_engines(torch_engine: Engine, caffe_eng: Engine, style_weights: dict[str, float],
                    content_weights: dict[str, float], size: tuple[int, int], seed: int = 0,
                    tv_weight: float = 0.0) -> tuple[float, float, float]:
    """Features, then the objective (targets from the torch engine, given to both) at one input size."""
    rng = np.random.default_rng(seed)
    h, w = size
    style = random_image(rng, h + 8, w + 8)
    content = random_image(rng, h, w)
    x = random_image(rng, h, w)
    blobs = list(dict.fromkeys([*style_weights, *content_weights]))
    feature_rel = max(assert_features_match(torch_engine, caffe_eng, img, blobs) for img in (style, x))
    objective = objective_for(torch_engine, style_weights, content_weights, style, content, tv_weight=tv_weight)
    loss_rel, grad_rel = assert_evaluations_match(caffe_eng.bind(objective)(x), torch_engine.bind(objective)(x))
    return feature_rel, loss_rel, grad_rel


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("name", ["vgg16", "vgg19", "googlenet", "caffenet"])
def test_shipped_models_with_caffe_written_weights(caffe: Any, shipped: Callable[[str], Shipped], name: str,
                                                   pooling: str) -> None:
    _, _, _, net = shipped(name)
    info = MODELS[name]
    size = SIZES[name]
    compare_engines(TorchEngine(net, pooling), caffe_engine(caffe, net, pooling), dict(info.style_layers),
                    dict(info.content_layers), (size, size))


def _v1_prototxt(prototxt: Path, keep: set[str], size: int) -> str:
    """The shipped current-layout prototxt rewritten in the V1 layout of the public VGG files (`layers`, enum types,
    `input_dim`)."""
    kinds = {"Convolution": ("CONVOLUTION", "convolution_param"), "ReLU": ("RELU", "relu_param"),
             "Pooling": ("POOLING", "pooling_param"), "LRN": ("LRN", "lrn_param"),
             "Concat": ("CONCAT", "concat_param"), "Dropout": ("DROPOUT", "dropout_param")}
    msg = read_prototxt_message(prototxt)
    out = pb.NetParameter(name=msg.name, input=["data"], input_dim=[1, 3, size, size])
    for layer in msg.layer:
        if layer.name not in keep:
            continue
        enum, field = kinds[layer.type]
        v1 = out.layers.add(name=layer.name, type=pb.V1LayerParameter.LayerType.Value(enum),
                            bottom=list(layer.bottom), top=list(layer.top))
        if layer.HasField(field):
            getattr(v1, field).CopyFrom(getattr(layer, field))
    return text_format.MessageToString(out)


def test_v1_files_written_by_the_project_are_read_alike_by_caffe_and_our_reader(
        caffe: Any, shipped: Callable[[str], Shipped], tmp_path: Path) -> None:
    """VGG16 as the public files have it (V1 layout, 4-D blobs), written by tests/tinynets from the weights Caffe
    saved: Caffe loads the same numbers, and both engines agree on it."""
    prototxt, _, blobs, net_v2 = shipped("vgg16")
    size = SIZES["vgg16"]
    v1_text = _v1_prototxt(prototxt, {layer.name for layer in net_v2.layers}, size)
    v1_proto = tmp_path / "vgg16-v1.prototxt"
    v1_proto.write_text(v1_text)
    v1_model = tmp_path / "vgg16-v1.caffemodel"
    v1_model.write_bytes(tinynets.caffemodel_bytes(v1_text, net_v2.weights, layout="v1"))

    caffe.set_mode_cpu()
    cnet = caffe.Net(str(v1_proto), caffe.TEST, weights=str(v1_model))
    assert set(cnet.params) == set(net_v2.weights)
    net_v1 = load_net(v1_proto, v1_model, blobs, "max")
    for layer, arrays in net_v2.weights.items():
        for ours_v1, ours_v2, theirs in zip(net_v1.weights[layer], arrays, cnet.params[layer], strict=True):
            np.testing.assert_array_equal(theirs.data, ours_v2)
            np.testing.assert_array_equal(ours_v1, ours_v2)
    info = MODELS["vgg16"]
    compare_engines(TorchEngine(net_v1, "max"), caffe_engine(caffe, net_v1, "max"), dict(info.style_layers),
                    dict(info.content_layers), (size, size), seed=3)


@pytest.mark.parametrize(("layout", "input_style"), [("v1", "input_shape"), ("v1", "input_dim"),
                                                     ("v2", "input_shape"), ("v2", "input_dim"), ("v2", "layer")])
def test_tiny_net_files_both_layouts(caffe: Any, tmp_path: Path, layout: str, input_style: str) -> None:
    """The project's own tiny caffemodels (grouped and non-square convolutions, padded pooling, an fc layer past the
    blobs in use): Caffe reads them with the same weights, and both engines agree on them."""
    proto, model = tinynets.write_net(tmp_path, layout=layout, input_style=input_style)
    caffe.set_mode_cpu()
    cnet = caffe.Net(str(proto), caffe.TEST, weights=str(model))
    blobs = ["conv1", "conv2", "conv3"]
    net = load_net(proto, model, blobs, "max")
    assert set(net.weights) == {"conv1", "conv2", "conv3"}
    for layer, arrays in net.weights.items():
        for ours, theirs in zip(arrays, cnet.params[layer], strict=True):
            np.testing.assert_array_equal(theirs.data, ours)
    for pooling in ("avg", "max"):
        net = load_net(proto, model, blobs, pooling)
        compare_engines(TorchEngine(net, pooling), caffe_engine(caffe, net, pooling),
                        {"conv1": 0.5, "conv2": 0.3, "conv3": 0.2}, {"conv2": 1.0}, (20, 28), tv_weight=0.01)


def test_objective_on_branches_and_blobs_the_objective_leaves_out(
        caffe: Any, shipped: Callable[[str], Shipped]) -> None:
    """GoogLeNet's inception branches: a loss blob no deeper layer reads (inception_3a/1x1, where the gradient is
    set, not added), a blob Caffe splits between readers (pool2/3x3_s2), and an objective on fewer blobs than the
    net was cut for (the backward pass starts at the deepest blob in use, not at the end of the net)."""
    prototxt, model, _, _ = shipped("googlenet")
    blobs = ["conv2/3x3", "inception_3a/1x1", "inception_3a/3x3", "inception_3a/output"]
    net = load_net(prototxt, model, blobs, "avg")
    torch_engine, caffe_eng = TorchEngine(net, "avg"), caffe_engine(caffe, net, "avg")
    compare_engines(torch_engine, caffe_eng, {"inception_3a/1x1": 0.5, "inception_3a/3x3": 0.5},
                    {"conv2/3x3": 1.0}, (64, 80))
    compare_engines(torch_engine, caffe_eng, {"conv2/3x3": 1.0}, {"inception_3a/1x1": 1.0}, (64, 80), seed=1)
    compare_engines(torch_engine, caffe_eng, {"inception_3a/output": 1.0}, {"conv2/3x3": 1.0}, (64, 80), seed=2)


def test_sizes_change_between_calls(caffe: Any, shipped: Callable[[str], Shipped]) -> None:
    """Features at one size, the objective at another, then back, as coarse-to-fine runs do; non-square sizes."""
    _, _, _, net = shipped("caffenet")
    info = MODELS["caffenet"]
    torch_engine, caffe_eng = TorchEngine(net, "avg"), caffe_engine(caffe, net, "avg")
    rng = np.random.default_rng(5)
    style, content = random_image(rng, 104, 88), random_image(rng, 72, 96)
    objective = objective_for(torch_engine, dict(info.style_layers), dict(info.content_layers), style, content)
    torch_evaluate, caffe_evaluate = torch_engine.bind(objective), caffe_eng.bind(objective)
    x = random_image(rng, 72, 96)
    first = caffe_evaluate(x)
    assert_evaluations_match(first, torch_evaluate(x))
    assert_features_match(torch_engine, caffe_eng, style, list(info.style_layers))
    assert_features_match(torch_engine, caffe_eng, random_image(rng, 120, 80), list(info.style_layers))
    again = caffe_evaluate(x)
    assert again.loss == first.loss
    np.testing.assert_array_equal(again.grad, first.grad)
    # A content-sized objective at another size is the next scale of a coarse-to-fine run.
    content2, x2 = random_image(rng, 84, 112), random_image(rng, 84, 112)
    objective2 = objective_for(torch_engine, dict(info.style_layers), dict(info.content_layers), style, content2)
    assert_evaluations_match(caffe_eng.bind(objective2)(x2), torch_engine.bind(objective2)(x2))


def _run(engine: str, proto: Path, model: Path, content: np.ndarray, style: np.ndarray) -> tuple[np.ndarray, int]:
    st = StyleTransfer(prototxt=proto, weights=model, style_layers="conv1,conv2,conv3", content_layers="conv2",
                       pooling="avg", engine=engine, gpu=-1)
    result = st.stylize(content, [style], ratio=1e3, num_iters=10, length=32, init="content").run()
    assert result.iterations == 10
    return images.deprocess(result.x) * 255.0, int(result.report["evaluations"])


def test_short_lbfgs_run_gives_the_same_image(caffe: Any, tmp_path: Path) -> None:
    """10 L-BFGS-B iterations through StyleTransfer at 32 px. The engines' float32 gradients differ by ~1e-7
    relative; L-BFGS-B amplifies that slowly along the run (its line search and curvature pairs see the difference),
    so the images agree to well under one grey level, not bit for bit: max difference < 0.05 on the 0-255 scale
    (measured: about 1e-3)."""
    proto, model = tinynets.write_net(tmp_path)
    rng = np.random.default_rng(7)
    content = rng.uniform(0, 1, (28, 32, 3)).astype(np.float32)
    style = rng.uniform(0, 1, (40, 36, 3)).astype(np.float32)
    image_t, evals_t = _run("torch", proto, model, content, style)
    image_c, evals_c = _run("caffe", proto, model, content, style)
    assert image_c.shape == image_t.shape == (28, 32, 3)
    assert float(np.abs(image_c - image_t).max()) < 0.05
    assert float(np.abs(image_c - content * 255.0).max()) > 10.0  # the run did move the image
    assert evals_c == evals_t
