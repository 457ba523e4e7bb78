"""The torch engine against independent NumPy versions of Caffe's layer semantics, and its input gradient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from style_transfer.caffe_model.loader import load_net
from style_transfer.caffe_model.net import infer_shapes
from style_transfer.caffe_model.reader import read_prototxt
from style_transfer.engines.torch import TorchEngine, Tuning, resolve_device
from style_transfer.errors import EngineError, ModelError
from style_transfer.losses import Objective, gram_numpy
from tests import tinynets


def caffe_pool_reference(x: np.ndarray, k: int, s: int, p: int, method: str) -> np.ndarray:
    """Caffe's pooling loop, written from its documented behaviour: ceil-mode output, AVE divisor over the window
    clipped to the padded input, MAX over the unpadded part."""
    c, h, w = x.shape
    oh = int(np.ceil((h + 2 * p - k) / s)) + 1
    ow = int(np.ceil((w + 2 * p - k) / s)) + 1
    if p and (oh - 1) * s >= h + p:
        oh -= 1
    if p and (ow - 1) * s >= w + p:
        ow -= 1
    out = np.zeros((c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, h + p), min(ws + k, w + p)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            window = x[:, hs:he, ws:we]
            out[:, i, j] = window.max(axis=(1, 2)) if method == "max" else window.sum(axis=(1, 2)) / size
    return out


def _single_layer_net(tmp_path: Path, layer: tuple[str, str, str, str, str], size: int, channels: int = 3
                      ) -> TorchEngine:
    text = tinynets.prototxt(layers=[layer], size=size)
    proto = tmp_path / "one.prototxt"
    proto.write_text(text)
    model = tmp_path / "one.caffemodel"
    model.write_bytes(tinynets.caffemodel_bytes(text, tinynets.random_weights(text)))
    return TorchEngine(load_net(proto, model, [layer[3]]), "max", dtype=torch.float64)


@pytest.mark.parametrize("method", ["max", "avg"])
@pytest.mark.parametrize(("size", "k", "s", "p"), [(7, 3, 2, 0), (8, 3, 2, 1), (9, 2, 2, 0), (10, 3, 3, 1),
                                                   (5, 5, 1, 2), (13, 3, 2, 0), (6, 2, 1, 1)])
def test_pooling_matches_caffe(tmp_path: Path, method: str, size: int, k: int, s: int, p: int) -> None:
    pool = "MAX" if method == "max" else "AVE"
    layer = ("pool", "Pooling", "data", "pool",
             f"pooling_param {{ pool: {pool} kernel_size: {k} stride: {s} pad: {p} }}")
    engine = _single_layer_net(tmp_path, layer, size)
    engine_avg = TorchEngine(engine.net, method, dtype=torch.float64)
    x = np.random.default_rng(1).standard_normal((3, size, size))
    got = engine_avg.features(x, ["pool"])["pool"]
    want = caffe_pool_reference(x, k, s, p, method)
    assert got.shape == want.shape
    shapes = infer_shapes(engine.net, (1, 3, size, size))
    assert shapes["pool"][1:] == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_lrn_matches_caffe_formula(tmp_path: Path) -> None:
    layer = ("norm", "LRN", "data", "norm", "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 k: 2 }")
    engine = _single_layer_net(tmp_path, layer, 6)
    x = np.random.default_rng(2).standard_normal((3, 6, 6)) * 50
    got = engine.features(x, ["norm"])["norm"]
    padded = np.pad(x * x, ((2, 2), (0, 0), (0, 0)))
    window = sum(padded[i:i + 3] for i in range(5))
    alpha = float(np.float32(0.0001))  # the prototxt's float field holds alpha in single precision
    want = x / (2 + alpha / 5 * window) ** 0.75
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_even_lrn_size_is_rejected(tmp_path: Path) -> None:
    layer = ("norm", "LRN", "data", "norm", "lrn_param { local_size: 4 }")
    with pytest.raises(ModelError, match="odd"):
        _single_layer_net(tmp_path, layer, 6)


def test_convolution_matches_direct_sum(tmp_path: Path) -> None:
    layer = ("conv", "Convolution", "data", "conv",
             "convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 2 dilation: 2 group: 3 }")
    engine = _single_layer_net(tmp_path, layer, 9)
    weight, bias = engine.net.weights["conv"]
    x = np.random.default_rng(3).standard_normal((3, 9, 9))
    got = engine.features(x, ["conv"])["conv"]
    xp = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    out_size = (9 + 4 - (2 * 2 + 1)) // 2 + 1
    want = np.zeros((6, out_size, out_size))
    for o in range(6):
        g = o // 2  # 6 outputs in 3 groups of 2, each reading 1 input channel
        for i in range(out_size):
            for j in range(out_size):
                patch = xp[g:g + 1, i * 2:i * 2 + 5:2, j * 2:j * 2 + 5:2]
                want[o, i, j] = np.sum(patch * weight[o]) + bias[o]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def _objective_for(engine: TorchEngine, rng: np.random.Generator, size: int) -> Objective:
    style = rng.uniform(-100, 100, (3, size + 4, size + 4))
    content = rng.uniform(-100, 100, (3, size, size))
    style_layers = {"conv1": 0.5, "conv2": 0.3, "conv3": 0.2}
    feats = engine.features(style, list(style_layers))
    return Objective(content_weights={"conv2": 1.0}, style_weights=style_layers, ratio=1e3,
                     content_targets=engine.features(content, ["conv2"]),
                     style_targets={k: gram_numpy(v)[None] for k, v in feats.items()}, tv_weight=0.01)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_input_gradient_matches_finite_differences(tmp_path: Path, pooling: str) -> None:
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv1", "conv2", "conv3"], pooling)
    engine = TorchEngine(net, pooling, dtype=torch.float64)
    rng = np.random.default_rng(4)
    evaluate = engine.bind(_objective_for(engine, rng, 16))
    x = rng.uniform(-100, 100, (3, 16, 16))
    ev = evaluate(x)
    assert ev.grad.shape == x.shape
    eps = 1e-4
    for _ in range(12):
        idx = tuple(int(rng.integers(0, n)) for n in x.shape)
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        numeric = (evaluate(xp).loss - evaluate(xm).loss) / (2 * eps)
        assert numeric == pytest.approx(ev.grad[idx], rel=1e-5, abs=1e-6 * max(1.0, abs(ev.loss)) * 1e-3)


@pytest.mark.parametrize("tuning", [Tuning(), Tuning.plain()], ids=["tuned", "plain"])
def test_evaluators_used_in_turn_give_what_each_gives_alone(tmp_path: Path, tuning: Tuning) -> None:
    """Two runs from one loaded model, stepped in turn (different targets and image sizes): each evaluator holds its
    own objective, so the results are bit for bit those of each alone."""
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv1", "conv2", "conv3"], "avg")
    rng = np.random.default_rng(6)
    shared = TorchEngine(net, "avg", tuning=tuning)
    objectives = [_objective_for(shared, rng, 16), _objective_for(shared, rng, 24)]
    images = [[rng.uniform(-100, 100, (3, size, size)).astype(np.float32) for _ in range(3)] for size in (16, 24)]
    alone = []
    for objective, xs in zip(objectives, images, strict=True):
        evaluate = TorchEngine(net, "avg", tuning=tuning).bind(objective)
        alone.append([evaluate(x) for x in xs])
    evaluators = [shared.bind(objective) for objective in objectives]
    for step in range(3):
        for which in (0, 1):
            got, want = evaluators[which](images[which][step]), alone[which][step]
            assert got.loss == want.loss and got.layers == want.layers
            np.testing.assert_array_equal(got.grad, want.grad)
    assert alone[0][0].loss != alone[1][0].loss


def test_no_weight_gradients(tmp_path: Path) -> None:
    proto, model = tinynets.write_net(tmp_path)
    engine = TorchEngine(load_net(proto, model, ["conv3"]), "avg")
    for op in engine._ops:
        for cell in (op.run.__closure__ or ()):
            value = cell.cell_contents
            if isinstance(value, torch.Tensor):
                assert not value.requires_grad


def test_devices() -> None:
    assert resolve_device(-1) == (torch.device("cpu"), None)
    if not torch.cuda.is_available():
        device, notice = resolve_device(0)
        assert device == torch.device("cpu") and notice and "CUDA is not available" in notice
        with pytest.raises(EngineError, match="GPU 3"):
            resolve_device(3)


def test_shipped_vgg_truncated_at_conv5_1_runs(tmp_path: Path) -> None:
    """Every layer type of the shipped VGG16 up to conv5_1 runs; random weights written as a V1 caffemodel."""
    prototxt = Path(__file__).resolve().parents[2] / "style_transfer" / "models" / "vgg16" / "deploy.prototxt"
    net = read_prototxt(prototxt)
    text = prototxt.read_text()
    shapes = infer_shapes(net, (1, 3, 32, 32))
    from style_transfer.caffe_model.net import expected_param_shapes

    rng = np.random.default_rng(0)
    weights = {}
    for layer in net.layers:
        if layer.type == "Convolution" and layer.name <= "conv5_1":
            weights[layer.name] = [rng.standard_normal(s).astype(np.float32) * 0.05
                                   for s in expected_param_shapes(layer, shapes[layer.bottoms[0]])]
    model = tmp_path / "vgg.caffemodel"
    model.write_bytes(tinynets.caffemodel_bytes(text, weights))
    engine = TorchEngine(load_net(prototxt, model, ["conv5_1"], "avg"), "avg")
    out = engine.features(rng.standard_normal((3, 32, 32)).astype(np.float32), ["conv5_1"])
    assert out["conv5_1"].shape == (512, 2, 2)
