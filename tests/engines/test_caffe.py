"""The Caffe engine's own behaviour: devices, a missing pycaffe, checks made before Caffe could abort, the prototxt it
writes, and no weight gradients. Parity with the torch engine is in test_parity.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from style_transfer.caffe_model import caffe_schema_pb2 as pb
from style_transfer.caffe_model.layers import Layer
from style_transfer.caffe_model.loader import load_net
from style_transfer.caffe_model.net import Net, truncate
from style_transfer.caffe_model.reader import net_from_message, read_prototxt
from style_transfer.caffe_model.registry import MODELS
from style_transfer.engines import caffe as caffe_engine
from style_transfer.engines import create_engine
from style_transfer.engines.torch import TorchEngine
from style_transfer.errors import EngineError, ModelError
from style_transfer.losses import Objective
from tests import tinynets
from tests.engines.test_parity import (
    assert_evaluations_match,
    compare_engines,
    objective_for,
    random_image,
    require_caffe,
)

ROOT = Path(__file__).resolve().parents[2]


def fake_caffe(tmp_path: Path, cpu_only: bool) -> Any:
    """A stand-in for the pycaffe module whose `_caffe.so` is a file with or without the CPU_ONLY build's message."""
    library = tmp_path / ("cpu.so" if cpu_only else "cuda.so")
    filler = b"\0" * 4096
    library.write_bytes(filler + (caffe_engine._CPU_ONLY_MARKER + b" check mode." if cpu_only else b"") + filler)
    return types.SimpleNamespace(_caffe=types.SimpleNamespace(__file__=str(library)))


# ----------------------------------------------------------------------------------------------- devices


def test_cpu_only_build_falls_back_from_the_default_gpu_and_refuses_others(tmp_path: Path) -> None:
    module = fake_caffe(tmp_path, cpu_only=True)
    assert caffe_engine.resolve_caffe_device(module, -1) == ("cpu", None)
    device, notice = caffe_engine.resolve_caffe_device(module, 0)
    assert device == "cpu" and notice is not None and "CPU-only" in notice and "-g -1" in notice
    with pytest.raises(EngineError, match=r"GPU 5 .*CPU-only"):
        caffe_engine.resolve_caffe_device(module, 5)


def test_cuda_build_counts_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_caffe(tmp_path, cpu_only=False)
    monkeypatch.setattr(caffe_engine, "cuda_device_count", lambda: 0)
    device, notice = caffe_engine.resolve_caffe_device(module, 0)
    assert device == "cpu" and notice is not None and "no CUDA device" in notice
    with pytest.raises(EngineError, match="GPU 1"):
        caffe_engine.resolve_caffe_device(module, 1)
    monkeypatch.setattr(caffe_engine, "cuda_device_count", lambda: 2)
    assert caffe_engine.resolve_caffe_device(module, 1) == ("cuda:1", None)
    with pytest.raises(EngineError, match=r"GPU 2 does not exist.*0\.\.1"):
        caffe_engine.resolve_caffe_device(module, 2)


def test_engine_refuses_a_gpu_the_build_cannot_use(tmp_path: Path) -> None:
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv2"])
    with pytest.raises(EngineError, match="cuda:0"):
        caffe_engine.CaffeEngine(net, "avg", "cuda:0", caffe=fake_caffe(tmp_path, cpu_only=True))


@pytest.mark.caffe
def test_installed_build_type_is_detected() -> None:
    caffe = require_caffe()
    cache = Path(caffe.__file__).resolve().parents[2] / "build" / "CMakeCache.txt"
    if not cache.exists():
        pytest.skip(f"no CMake cache beside this pycaffe ({cache})")
    cpu_only = "CPU_ONLY:BOOL=ON" in cache.read_text(errors="replace")
    assert caffe_engine.caffe_is_cpu_only(caffe) == cpu_only


# ----------------------------------------------------------------------------------------------- missing pycaffe


def test_missing_pycaffe_is_one_line_naming_the_install_script(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv2"])
    monkeypatch.setitem(sys.modules, "caffe", None)  # what an absent package looks like to `import caffe`
    monkeypatch.delenv("GLOG_minloglevel", raising=False)
    with pytest.raises(EngineError) as info:
        create_engine("caffe", net, "avg", -1)
    message = str(info.value)
    assert "\n" not in message
    assert "pycaffe is not installed" in message and "scripts/install_caffe.sh" in message
    # Caffe's logging would have been silenced before the import.
    assert os.environ.get("GLOG_minloglevel") == "2"  # noqa: SIM112 (glog spells it so)


def test_missing_pycaffe_through_the_cli(tmp_path: Path) -> None:
    proto, model = tinynets.write_net(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    code = ("import sys; sys.modules['caffe'] = None\n"
            "from style_transfer.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    args = ["-s", str(tmp_path / "s.png"), "-c", str(tmp_path / "c.png"), "--prototxt", str(proto), "--weights",
            str(model), "--style-layers", "conv1", "--content-layers", "conv2", "-g", "-1", "-n", "2", "-l", "24",
            "--engine", "caffe", "-o", str(tmp_path / "out.png")]
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "scripts/install_caffe.sh" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out.png").exists()


# ----------------------------------------------------------------------------------------------- the prototxt


def _parse(text: str) -> pb.NetParameter:
    msg = pb.NetParameter()
    # parameter_param is Caffe's, not in our schema.
    text_format.Parse(text, msg, allow_unknown_field=True)
    return msg


def test_prototxt_for_caffe(tmp_path: Path) -> None:
    """The shipped GoogLeNet: branches, LRN, max pooling in the file."""
    blobs = ["conv2/3x3", "inception_3a/1x1", "inception_3a/output"]
    net = truncate(read_prototxt(MODELS["googlenet"].prototxt), blobs)
    net.weights = {layer.name: [np.zeros(1)] * 2 for layer in net.layers if layer.type == "Convolution"}
    out = caffe_engine.deploy_prototxt(net, 40, 56, "avg")
    assert "parameter_param { shape { dim: 1 dim: 3 dim: 40 dim: 56 } }" in out
    msg = _parse(out)
    assert not msg.force_backward and not msg.input and not msg.layers
    first, rest = msg.layer[0], msg.layer[1:]
    assert first.type == "Parameter" and list(first.top) == ["data"] and first.param[0].lr_mult == 1
    assert [layer.name for layer in rest] == [layer.name for layer in net.layers]
    pools = [layer for layer in rest if layer.type == "Pooling"]
    assert pools and all(p.pooling_param.pool == pb.PoolingParameter.AVE for p in pools)
    for layer in rest:
        if layer.type == "Convolution":
            assert [(p.lr_mult, p.decay_mult) for p in layer.param] == [(0, 0), (0, 0)]
            assert not layer.convolution_param.kernel_size and not layer.convolution_param.HasField("weight_filler")
    weighted = {layer.name: list(layer.loss_weight) for layer in rest if layer.loss_weight}
    # Only the blobs nothing reads later carry a loss weight: the 1x1 branch's ReLU feeds the concat, so only the
    # concat itself is unread.
    assert weighted == {"inception_3a/output": [1.0]}
    assert "MAX" not in out


CONFLICTING = [
    ("conv1", "Convolution", "data", "conv1",
     "convolution_param { num_output: 4 kernel_size: 5 kernel_h: 3 kernel_w: 3 pad: 2 pad_h: 1 pad_w: 1 }"),
    ("relu1", "ReLU", "conv1", "conv1", "relu_param { engine: CUDNN }"),
    ("pool1", "Pooling", "conv1", "pool1", "pooling_param { pool: MAX kernel_size: 2 kernel_h: 3 kernel_w: 3 "
                                           "stride: 2 }"),
    ("gpool", "Pooling", "pool1", "gpool", "pooling_param { pool: AVE global_pooling: true pad: 1 }"),
    ("cat", "Concat", "pool1 pool1", "cat", "concat_param { axis: 1 concat_dim: 2 }"),
]


def test_conflicting_geometry_is_written_the_torch_engine_way() -> None:
    """Fields Caffe would abort on together (kernel_size with kernel_h/w, pad with global pooling, concat_dim with
    axis, an engine our builds lack) reach Caffe as the one reading the torch engine uses."""
    net = _net(CONFLICTING)
    out = _parse(caffe_engine.deploy_prototxt(net, 16, 16, None))
    conv, relu, pool, gpool, cat = out.layer[1:]
    assert not conv.convolution_param.kernel_size and not conv.convolution_param.pad
    assert (conv.convolution_param.kernel_h, conv.convolution_param.pad_h) == (3, 1)
    assert not relu.relu_param.HasField("engine")
    assert not pool.pooling_param.HasField("kernel_size") and pool.pooling_param.kernel_h == 3
    assert pool.pooling_param.pool == pb.PoolingParameter.MAX
    assert gpool.pooling_param.global_pooling and not gpool.pooling_param.HasField("pad")
    assert not gpool.pooling_param.HasField("kernel_size") and not gpool.pooling_param.HasField("kernel_h")
    assert cat.concat_param.axis == 1 and not cat.concat_param.HasField("concat_dim")


# ----------------------------------------------------------------------------------------------- checks


def _net(layers: list[tuple[str, str, str, str, str]], size: int = 16) -> Net:
    msg = pb.NetParameter()
    text_format.Parse(tinynets.prototxt(layers=layers, size=size), msg)
    return net_from_message(msg)


@pytest.mark.parametrize(("layers", "match"), [
    ([("conv1", "Convolution", "data", "data", "convolution_param { num_output: 3 kernel_size: 1 }")],
     "in place"),
    ([("fc", "InnerProduct", "data", "fc", "inner_product_param { num_output: 3 }")], "cannot run"),
    ([("norm", "LRN", "data", "norm", "lrn_param { local_size: 4 }")], "odd"),
    ([("split", "Split", "data", "data", "")], "in place"),
    ([("relu", "ReLU", "data", "a", ""), ("relu2", "ReLU", "data", "a", "")], "already made"),
])
def test_nets_caffe_would_abort_on_are_refused(layers: list[tuple[str, str, str, str, str]], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        caffe_engine.check_net(_net(layers))


def test_a_second_output_blob_is_refused() -> None:
    net = _net([("pool", "Pooling", "data", "p", "pooling_param { pool: MAX kernel_size: 2 }")])
    pool = net.layers[0]
    net.layers[0] = Layer(pool.name, pool.type, pool.bottoms, ("p", "mask"), pool.params)  # Caffe's max-pool mask
    with pytest.raises(ModelError, match="exactly 1 output"):
        caffe_engine.check_net(net)


def test_sizes_beyond_caffe_int_counts_are_refused() -> None:
    net = _net([("conv1", "Convolution", "data", "conv1", "convolution_param { num_output: 4 kernel_size: 3 }")])
    with pytest.raises(EngineError, match="im2col"):
        caffe_engine.check_size(net, 9000, 9000, None)  # 27 x 8998^2 > 2^31 while the blobs fit
    with pytest.raises(EngineError, match="blob 'conv1'"):
        caffe_engine.check_size(net, 24000, 24000, None)  # the 3-channel input still fits
    assert caffe_engine.check_size(net, 64, 48, None)["conv1"] == (1, 4, 62, 46)


# ----------------------------------------------------------------------------------------------- with Caffe


@pytest.mark.caffe
def test_no_weight_gradients_and_the_input_gradient_is_there(tmp_path: Path) -> None:
    caffe = require_caffe()
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv1", "conv2", "conv3"], "avg")
    engine = caffe_engine.CaffeEngine(net, "avg", "cpu", caffe=caffe)
    torch_engine = TorchEngine(net, "avg")
    compare_engines(torch_engine, engine, {"conv1": 0.5, "conv3": 0.5}, {"conv2": 1.0}, (24, 20))
    cnet = engine._cnet
    for layer in net.weights:
        for blob in cnet.params[layer]:
            assert not np.any(blob.diff), layer
    # Only the total-variation term: no net pass at all.
    tv_only = Objective(content_weights={}, style_weights={}, ratio=1.0, tv_weight=0.5)
    x = np.random.default_rng(2).uniform(-100, 100, (3, 12, 14)).astype(np.float32)
    assert_evaluations_match(engine.bind(tv_only).evaluate(x), torch_engine.bind(tv_only).evaluate(x))


@pytest.mark.caffe
def test_evaluators_used_in_turn_give_what_each_gives_alone(tmp_path: Path) -> None:
    """Two runs from one Caffe net, stepped in turn (different targets, blobs and image sizes): no target, shape or
    blob diff of one leaks into the other, so each gives bit for bit what it gives on an engine of its own."""
    caffe = require_caffe()
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv1", "conv2", "conv3"], "avg")
    rng = np.random.default_rng(8)
    shared = caffe_engine.CaffeEngine(net, "avg", "cpu", caffe=caffe)
    objectives = [
        objective_for(shared, {"conv1": 0.5, "conv3": 0.5}, {"conv2": 1.0}, random_image(rng, 28, 24),
                      random_image(rng, 20, 24), tv_weight=0.01),
        objective_for(shared, {"conv2": 1.0}, {"conv1": 1.0}, random_image(rng, 36, 36), random_image(rng, 28, 32)),
    ]
    images = [[random_image(rng, *size) for _ in range(3)] for size in ((20, 24), (28, 32))]
    alone = []
    for objective, xs in zip(objectives, images, strict=True):
        evaluate = caffe_engine.CaffeEngine(net, "avg", "cpu", caffe=caffe).bind(objective)
        alone.append([evaluate(x) for x in xs])
    evaluators = [shared.bind(objective) for objective in objectives]
    for step in range(3):
        for which in (0, 1):
            got, want = evaluators[which](images[which][step]), alone[which][step]
            assert got.loss == want.loss and got.layers == want.layers
            np.testing.assert_array_equal(got.grad, want.grad)


@pytest.mark.caffe
def test_conflicting_geometry_runs_in_caffe_as_in_torch(tmp_path: Path) -> None:
    caffe = require_caffe()
    text = tinynets.prototxt(layers=CONFLICTING, size=16)
    proto, model = tmp_path / "odd.prototxt", tmp_path / "odd.caffemodel"
    proto.write_text(text)
    model.write_bytes(tinynets.caffemodel_bytes(text, tinynets.random_weights(text)))
    for pooling in ("file", "max"):
        net = load_net(proto, model, ["cat", "gpool", "conv1"])
        compare_engines(TorchEngine(net, pooling), caffe_engine.CaffeEngine(net, pooling, "cpu", caffe=caffe),
                        {"cat": 0.5, "gpool": 0.5}, {"conv1": 1.0}, (16, 20))


@pytest.mark.caffe
def test_unusable_layers_fail_before_caffe(tmp_path: Path) -> None:
    caffe = require_caffe()
    net = _net([("norm", "LRN", "data", "norm", "lrn_param { local_size: 4 }")])
    with pytest.raises(ModelError, match="odd"):
        caffe_engine.CaffeEngine(net, "avg", "cpu", caffe=caffe)
    net = _net([("conv1", "Convolution", "data", "conv1", "convolution_param { num_output: 4 kernel_size: 3 }")])
    with pytest.raises(ModelError, match="no weights"):
        caffe_engine.CaffeEngine(net, "avg", "cpu", caffe=caffe)


@pytest.mark.caffe
def test_too_small_an_image_is_a_model_error_not_an_abort(tmp_path: Path) -> None:
    caffe = require_caffe()
    layers = [("conv1", "Convolution", "data", "conv1", "convolution_param { num_output: 2 kernel_size: 5 }")]
    text = tinynets.prototxt(layers=layers, size=8)
    proto, model = tmp_path / "one.prototxt", tmp_path / "one.caffemodel"
    proto.write_text(text)
    model.write_bytes(tinynets.caffemodel_bytes(text, tinynets.random_weights(text)))
    engine = caffe_engine.CaffeEngine(load_net(proto, model, ["conv1"]), "max", "cpu", caffe=caffe)
    assert engine.features(np.zeros((3, 5, 6), np.float32), ["conv1"])["conv1"].shape == (2, 1, 2)
    with pytest.raises(ModelError, match="too small"):
        engine.features(np.zeros((3, 4, 9), np.float32), ["conv1"])
    # The net is still usable at a size that fits.
    assert engine.features(np.zeros((3, 7, 5), np.float32), ["conv1"])["conv1"].shape == (2, 3, 1)


@pytest.mark.caffe
def test_cli_with_the_default_gpu_on_a_cpu_only_build(tmp_path: Path) -> None:
    caffe = require_caffe()
    if not caffe_engine.caffe_is_cpu_only(caffe):
        pytest.skip("this pycaffe is a CUDA build")
    proto, model = tinynets.write_net(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    base = [sys.executable, str(ROOT / "style.py"), "-s", str(tmp_path / "s.png"), "-c", str(tmp_path / "c.png"),
            "--prototxt", str(proto), "--weights", str(model), "--style-layers", "conv1,conv2",
            "--content-layers", "conv3", "-n", "3", "-l", "32", "--engine", "caffe"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([*base, "-o", str(tmp_path / "out.png"), "--report", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "CPU-only" in res.stderr and "Traceback" not in res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["engine"], report["device"]) == ("caffe", "cpu")
    assert Image.open(tmp_path / "out.png").size == (32, 24)
    res = subprocess.run([*base, "-g", "5", "-o", str(tmp_path / "out5.png")], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "GPU 5" in lines[0] and "CPU-only" in lines[0], res.stderr
