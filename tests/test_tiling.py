"""Tiled evaluation equals untiled evaluation: losses (relative 1e-5), input gradients (relative 1e-4, norm of the
difference over the norm), style Gram targets and content targets, on the tiny test net and on the four shipped
prototxts with random weights, both poolings, both engines, at sizes that are not multiples of the stride, with tiny
tiles so that many tile borders are crossed.

The shipped nets are cut at shallower blobs than their presets (the same layer types, windows and ceil-mode pooling)
so that a small image holds many tiles beyond the halo and the file stays fast.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from style_transfer import images, memory, tiling
from style_transfer.caffe_model.net import Net, expected_param_shapes, infer_shapes, truncate
from style_transfer.caffe_model.reader import read_prototxt
from style_transfer.caffe_model.registry import MODELS
from style_transfer.engines.base import Engine
from style_transfer.engines.torch import TorchEngine, Tuning
from style_transfer.errors import EngineError, StyleTransferError
from style_transfer.losses import Objective, gram_numpy
from tests import tinynets

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4

# net -> (style blobs, content blobs, image height, width, tile core)
CASES: dict[str, tuple[list[str], list[str], int, int, int]] = {
    "tiny": (["conv1", "conv2"], ["conv3"], 37, 45, 4),
    "vgg16": (["conv1_1", "conv2_1", "conv3_1"], ["conv3_2"], 53, 61, 8),
    "vgg19": (["conv1_1", "conv2_1", "conv3_1"], ["conv3_2"], 53, 61, 8),
    "googlenet": (["conv1/7x7_s2", "conv2/3x3"], ["inception_3a/output"], 91, 101, 8),
    "caffenet": (["conv1"], ["conv2"], 83, 95, 8),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_net(name: str, blobs: list[str]) -> Net:
    """The net cut at `blobs`, with random weights of the shapes it needs."""
    if name == "tiny":
        from google.protobuf import text_format

        from style_transfer.caffe_model import caffe_schema_pb2 as pb
        from style_transfer.caffe_model.reader import net_from_message

        msg = pb.NetParameter()
        text_format.Parse(tinynets.prototxt(), msg)
        net = truncate(net_from_message(msg), blobs)
    else:
        net = truncate(read_prototxt(MODELS[name].prototxt), blobs)
    shapes = infer_shapes(net, (1, 3, 224, 224))
    rng = np.random.default_rng(0)
    weights: dict[str, list[np.ndarray]] = {}
    for layer in net.layers:
        wanted = expected_param_shapes(layer, shapes[layer.bottoms[0]]) if layer.bottoms else []
        if wanted:
            fan_in = int(np.prod(wanted[0][1:]))
            weights[layer.name] = [(rng.standard_normal(s) * np.sqrt(2.0 / fan_in) if i == 0
                                    else rng.standard_normal(s) * 0.1).astype(np.float32)
                                   for i, s in enumerate(wanted)]
    net.weights = weights
    return net


def make_engine(kind: str, net: Net, pooling: str) -> Engine:
    if kind == "torch":
        # Without Winograd convolutions: their rounding error (BENCHMARKS.md) differs between a tile and the whole
        # image by more than these tolerances resolve, whatever the tiling does.
        return TorchEngine(net, pooling, tuning=Tuning(winograd=False))
    from style_transfer.engines.caffe import CaffeEngine, import_caffe

    try:
        caffe = import_caffe(verbose=False)
    except EngineError as exc:
        pytest.skip(str(exc))
    return CaffeEngine(net, pooling, "cpu", caffe=caffe)


def rel(a: Any, b: Any) -> float:
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return images.preprocess(rng.uniform(0.0, 1.0, (h, w, 3)).astype(np.float32))


MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("engine_kind", ["torch", "caffe"])
@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("name", list(CASES))
def test_tiled_equals_untiled(name: str, pooling: str, engine_kind: str) -> None:
    style_layers, content_layers, h, w, core = CASES[name]
    blobs = [*style_layers, *content_layers]
    net = random_net(name, blobs)
    engine = make_engine(engine_kind, net, pooling)
    rng = np.random.default_rng(3)
    style, content, x = random_image(rng, h + 7, w - 5), random_image(rng, h, w), random_image(rng, h, w)

    # Style Gram targets and content targets.
    style_plan = tiling.plan_tiles(net, pooling, h + 7, w - 5, style_layers, (core, core))
    assert style_plan.count >= 9
    grams = {k: gram_numpy(v) for k, v in engine.features(style, style_layers).items()}
    tiled_grams = tiling.tiled_grams(engine, style, style_layers, style_plan)
    for k in style_layers:
        assert rel(tiled_grams[k], grams[k]) < LOSS_RTOL, k
    plan = tiling.plan_tiles(net, pooling, h, w, blobs, (core, core))
    assert plan.count >= 9 and plan.tile_size[0] < h and plan.tile_size[1] < w
    targets = engine.features(content, content_layers)
    tiled_targets = tiling.tiled_features(engine, content, content_layers, plan)
    for k in content_layers:
        assert rel(tiled_targets[k], targets[k]) < LOSS_RTOL, k

    objective = Objective({k: 1.0 for k in content_layers}, {k: 1.0 / len(style_layers) for k in style_layers},
                          1e3, targets, {k: np.stack([grams[k], 0.5 * grams[k]]) for k in style_layers},
                          np.array([0.25, 0.75]), tv_weight=0.1)
    want = engine.bind(objective)(x)
    got = tiling.TiledEvaluator(engine, objective, plan)(x)
    assert list(got.layers) == list(want.layers)
    loss_rel, grad_rel = abs(got.loss - want.loss) / abs(want.loss), rel(got.grad, want.grad)
    MEASURED[f"{name}-{pooling}-{engine_kind}"] = max(loss_rel, grad_rel)
    assert loss_rel <= LOSS_RTOL
    assert grad_rel <= GRAD_RTOL
    for k in want.layers:
        assert got.layers[k] == pytest.approx(want.layers[k], rel=LOSS_RTOL), k


def one_style_case(name: str, engine: Engine, seed: int) -> tuple[Objective, tiling.TilePlan, np.ndarray]:
    """CASES[name]'s objective with one style image, its tile plan and an image to evaluate, on `engine`."""
    style_layers, content_layers, h, w, core = CASES[name]
    rng = np.random.default_rng(seed)
    content, x = random_image(rng, h, w), random_image(rng, h, w)
    grams = {k: gram_numpy(v) for k, v in engine.features(random_image(rng, h, w), style_layers).items()}
    objective = Objective({k: 1.0 for k in content_layers}, {k: 1.0 for k in style_layers}, 1e3,
                          engine.features(content, content_layers), {k: grams[k][None] for k in style_layers})
    return objective, tiling.plan_tiles(engine.net, "max", h, w, objective.layers, (core, core)), x


def test_float64_tiling_is_exact_to_rounding() -> None:
    """In float64 nothing but the order of the sums differs: a wrong crop or halo would show far above 1e-10."""
    style_layers, content_layers, *_ = CASES["vgg16"]
    engine = TorchEngine(random_net("vgg16", [*style_layers, *content_layers]), "max", dtype=torch.float64)
    objective, plan, x = one_style_case("vgg16", engine, seed=5)
    want, got = engine.bind(objective)(x), tiling.TiledEvaluator(engine, objective, plan)(x)
    assert abs(got.loss - want.loss) / want.loss < 1e-10
    assert rel(got.grad, want.grad) < 1e-10


def test_the_largest_tile_is_forwarded_once_for_both_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """N tiles cost N - 1 forward passes, none of them the largest tile's, and N forward-and-backward ones, with the
    result unchanged, and progress still counts both passes to their end."""
    style_layers, content_layers, *_ = CASES["tiny"]
    engine = make_engine("torch", random_net("tiny", [*style_layers, *content_layers]), "max")
    objective, plan, x = one_style_case("tiny", engine, seed=7)
    forwarded: list[int] = []  # the pixels of each image given to features()
    backpropagated: list[int] = []  # and to vjp()
    features, vjp = engine.features, engine.vjp
    monkeypatch.setattr(engine, "features", lambda image, *a: forwarded.append(image[0].size) or features(image, *a))
    monkeypatch.setattr(engine, "vjp", lambda image, *a: backpropagated.append(image[0].size) or vjp(image, *a))
    ticks: list[tuple[int, int, int]] = []
    got = tiling.TiledEvaluator(engine, objective, plan, lambda *t: ticks.append(t))(x)
    sizes = [h * w for h, w in plan.tile_sizes()]
    assert len(set(sizes)) > 1 and sorted(forwarded) == sorted(sizes)[:-1]  # every tile but the largest
    assert sorted(backpropagated) == sorted(sizes)
    assert ticks == [(1, k, plan.count) for k in range(1, plan.count + 1)] + \
        [(2, k, plan.count) for k in range(1, plan.count + 1)]
    want = engine.bind(objective)(x)
    assert abs(got.loss - want.loss) / want.loss <= LOSS_RTOL and rel(got.grad, want.grad) <= GRAD_RTOL


def test_plan_geometry_comes_from_the_layers() -> None:
    """VGG16 to conv5_1: total stride 16; reach as the layers compose it; tile origins aligned."""
    info = MODELS["vgg16"]
    blobs = list(dict.fromkeys([*info.style_layers, *info.content_layers]))
    net = truncate(read_prototxt(info.prototxt), blobs)
    plan = tiling.plan_tiles(net, "avg", 301, 407, blobs, (40, 40))
    assert plan.reach["conv5_1"].stride == (16, 16)
    assert plan.reach["conv1_1"].lo == (-1, -1)
    for span in (*plan.rows, *plan.cols):
        assert span.start % 16 == 0 and span.core_start % 16 == 0
    # Every position of every blob belongs to exactly one tile.
    for b in blobs:
        counts = np.zeros(plan.shapes[b][2:], int)
        for tile in plan.tiles:
            counts[plan.interior(tile, b)[1]] += 1
        assert (counts == 1).all(), b


def test_untiled_when_the_image_fits_and_an_error_when_no_tile_does() -> None:
    style_layers, content_layers, h, w, _core = CASES["vgg16"]
    net = random_net("vgg16", [*style_layers, *content_layers])
    blobs = [*style_layers, *content_layers]
    assert memory.choose_tiles(net, "avg", h, w, blobs, budget=1 << 40) is None
    need = memory.evaluation_bytes(net, "avg", h, w)
    plan = memory.choose_tiles(net, "avg", 400, 500, blobs, budget=need)
    assert plan is not None and plan.count > 1
    assert memory.evaluation_bytes(net, "avg", *plan.tile_size) <= need
    message = r"--max-memory 0\.0001 is too small .*; give --max-memory [0-9.]+ or more$"
    with pytest.raises(StyleTransferError, match=message):
        memory.choose_tiles(net, "avg", 400, 500, blobs, budget=1000, fixed=10**5, what="--max-memory 0.0001")


def test_measured_differences_are_reported() -> None:
    """Not a check: prints the largest relative differences the parametrised test measured (pytest -s)."""
    if MEASURED:
        worst = max(MEASURED, key=MEASURED.__getitem__)
        print(f"largest tiled/untiled relative difference: {MEASURED[worst]:.2e} ({worst})")


def test_a_run_with_forced_tiles_gives_the_untiled_image(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short Stylization.run on the tiny net: --max-memory small enough to force many tiles gives the same image
    as the untiled run, and the report says how the image was tiled."""
    from style_transfer.transfer import StyleTransfer
    from tests.conftest import tiny_images

    proto, model = tinynets.write_net(tmp_path)
    st = StyleTransfer(prototxt=str(proto), weights=str(model), style_layers="conv1,conv2", content_layers="conv3",
                       gpu=-1, engine="torch", verbose=True)
    content, style, _ = tiny_images()
    options = dict(length=45, num_iters=5, init="content", seed=1)
    untiled = st.stylize(content, [style], **options).run()
    assert untiled.report["tiling"] is None
    # The run's own arrays and the process's memory do not count here, so a budget of a few tiles' worth forces
    # tiling.
    monkeypatch.setattr(memory, "run_bytes", lambda *args: 0)
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    budget = memory.evaluation_bytes(st.net, "avg", 24, 24) / memory.GB
    job = st.stylize(content, [style], max_memory=budget, **options)
    tiled = job.run()
    assert tiled.report["tiling"]["tiles"] >= 4
    seams = tiled.report["tiling"]["seams"]
    assert (len(seams["rows"]) + 1) * (len(seams["cols"]) + 1) == tiled.report["tiling"]["tiles"]
    assert all(0 < x < limit for xs, limit in ((seams["rows"], tiled.rgb.shape[0]), (seams["cols"], tiled.rgb.shape[1]))
               for x in xs)
    assert tiled.report["scales"][0]["tiling"] == tiled.report["tiling"]
    assert any("tiles of up to" in n for n in job.notices)
    assert tiled.evaluation is not None and untiled.evaluation is not None
    assert abs(tiled.evaluation.loss - untiled.evaluation.loss) / untiled.evaluation.loss < 1e-4
    # On the 0-255 pixel scale: well under one grey level after five iterations.
    assert np.abs(tiled.x - untiled.x).max() < 0.05


def test_max_memory_too_small_for_one_tile_is_one_line_naming_the_smallest_value(tmp_path: Any) -> None:
    from style_transfer.transfer import StyleTransfer
    from tests.conftest import tiny_images

    proto, model = tinynets.write_net(tmp_path)
    st = StyleTransfer(prototxt=str(proto), weights=str(model), style_layers="conv1,conv2", content_layers="conv3",
                       gpu=-1)
    content, style, _ = tiny_images()
    message = r"^--max-memory 1e-06 is too small .* give --max-memory \S+ or more$"
    with pytest.raises(StyleTransferError, match=message):
        st.stylize(content, [style], length=45, num_iters=1, max_memory=1e-6).run()


def test_style_targets_are_not_charged_the_optimisers_arrays(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The style image (--style-scale times larger) is evaluated between two scales' optimisations, so its tiles
    share the budget with its own copies only, not with an optimiser's arrays at the style image's size: a cap that
    fits the content's run fits the style targets too (it used to fail, as if the run needed arrays that large)."""
    from style_transfer.transfer import StyleTransfer
    from tests.conftest import tiny_images

    proto, model = tinynets.write_net(tmp_path)
    st = StyleTransfer(prototxt=str(proto), weights=str(model), style_layers="conv1,conv2", content_layers="conv3",
                       gpu=-1)
    content, style, _ = tiny_images()  # 36 x 48, resized to 34 x 45
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)  # the process's own memory, counted in another test
    blobs = ["conv1", "conv2", "conv3"]
    kept = memory.blob_bytes(st.net, "avg", 34, 45, ["conv3"])
    budget = memory.run_bytes(st.net, 34, 45, 8, kept) + memory.evaluation_bytes(st.net, "avg", 34, 45)
    assert memory.choose_tiles(st.net, "avg", 34, 45, blobs, budget, budget - memory.evaluation_bytes(
        st.net, "avg", 34, 45)) is None
    assert memory.run_bytes(st.net, 135, 135, 8) > budget  # the style image at --style-scale 3
    result = st.stylize(content, [style], length=45, num_iters=2, style_scale=3.0,
                        max_memory=budget / memory.GB).run()
    assert result.iterations == 2 and result.report["tiling"] is None


def _tiny_run_and_its_need(tmp_path: Any) -> tuple[Any, np.ndarray, np.ndarray, int]:
    """The tiny net loaded, the tiny pair, and the bytes one untiled run of the content at 45 px needs (the
    optimiser's arrays, the content targets and one evaluation)."""
    from style_transfer.transfer import StyleTransfer
    from tests.conftest import tiny_images

    proto, model = tinynets.write_net(tmp_path)
    st = StyleTransfer(prototxt=str(proto), weights=str(model), style_layers="conv1,conv2", content_layers="conv3",
                       gpu=-1)
    content, style, _ = tiny_images()
    kept = memory.blob_bytes(st.net, "avg", 34, 45, ["conv3"])
    need = memory.run_bytes(st.net, 34, 45, 8, kept) + memory.evaluation_bytes(st.net, "avg", 34, 45)
    return st, content, style, need


def test_a_cap_counts_what_the_process_holds_already(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-memory is the process's memory: the weights and libraries it holds already (its resident memory) share
    the cap with the run's arrays and the evaluations, so a cap the run alone would fit can still need tiles, and
    the smallest workable cap named in the error includes them."""
    st, content, style, need = _tiny_run_and_its_need(tmp_path)
    held = 3 * need
    monkeypatch.setattr(memory, "resident_bytes", lambda: held)
    options = dict(length=45, num_iters=1, style_scale=0.5)
    assert st.stylize(content, [style], max_memory=(held + need) / memory.GB, **options).costs()[0].tiles == 0
    assert st.stylize(content, [style], max_memory=(held + 0.9 * need) / memory.GB, **options).costs()[0].tiles > 0
    with pytest.raises(StyleTransferError, match=r"give --max-memory (\S+) or more$") as error:
        st.stylize(content, [style], max_memory=need / memory.GB, **options).costs()
    assert float(str(error.value).split("--max-memory ")[-1].split()[0]) * memory.GB > held


def test_later_scales_count_what_the_process_held_before_the_run(tmp_path: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: each scale counted the process's resident size at its start, which by then also holds what the
    earlier scales freed (and the process reuses), so the last scale of a 4096-px print under --max-memory 12 was
    refused after 20 minutes of work although the plan made at the start had fitted it. The run now counts what the
    process held before it, for every scale."""
    st, content, style, need = _tiny_run_and_its_need(tmp_path)
    held = need
    readings: list[int] = []

    def resident() -> int:  # grows by a whole cap's worth every time it is read after the first
        readings.append(held + len(readings) * 4 * need)
        return readings[-1]

    monkeypatch.setattr(memory, "resident_bytes", resident)
    job = st.stylize(content, [style], length=45, min_length=32, scales=2, num_iters=4,
                     max_memory=(held + 2 * need) / memory.GB)
    planned = [cost.tiles for cost in job.costs()]
    result = job.run()
    assert result.iterations == 4 and len(readings) == 1
    made = [scale["tiling"]["tiles"] if scale["tiling"] else 0 for scale in result.report["scales"]]
    assert made == planned


@pytest.mark.slow
def test_real_vgg16_tiled_equals_untiled() -> None:
    """The real VGG16 weights with the preset layers (conv1_1 ... conv5_1, conv4_2), Tübingen in the style of
    Starry Night at a size where both fit and that is no multiple of the stride, tiles forced small: loss within
    1e-5, gradient within 1e-4 (relative), the style Gram and content targets too."""
    from style_transfer.caffe_model.loader import load_net
    from tests.conftest import require_shared

    weights = require_shared("models", "vgg16_hed.caffemodel")
    content_rgb = images.load_image(require_shared("images", "content", "tubingen.jpg"))
    style_rgb = images.load_image(require_shared("images", "style", "starry_night.jpg"))
    info = MODELS["vgg16"]
    style_layers, content_layers = list(info.style_layers), list(info.content_layers)
    blobs = list(dict.fromkeys([*style_layers, *content_layers]))
    net = load_net(info.prototxt, weights, blobs, "avg")
    engine = make_engine("torch", net, "avg")
    content = images.preprocess(images.resize_long_side(content_rgb, 301))  # 226 x 301
    style = images.preprocess(images.resize_long_side(style_rgb, 361))
    h, w = content.shape[1:]
    rng = np.random.default_rng(0)
    x = (content + rng.normal(0, 20, content.shape)).astype(np.float32)

    style_plan = tiling.plan_tiles(net, "avg", *style.shape[1:], style_layers, (64, 64))
    grams = {k: gram_numpy(v) for k, v in engine.features(style, style_layers).items()}
    tiled_grams = tiling.tiled_grams(engine, style, style_layers, style_plan)
    assert style_plan.count >= 6
    for k in style_layers:
        assert rel(tiled_grams[k], grams[k]) < LOSS_RTOL, k
    plan = tiling.plan_tiles(net, "avg", h, w, blobs, (64, 64))
    assert plan.count >= 6 and plan.tile_size[0] < h and plan.tile_size[1] < w
    targets = engine.features(content, content_layers)
    for k, v in tiling.tiled_features(engine, content, content_layers, plan).items():
        assert rel(v, targets[k]) < LOSS_RTOL, k

    objective = Objective(dict(info.content_layers), dict(info.style_layers), 1e4, targets,
                          {k: grams[k][None] for k in style_layers}, np.ones(1))
    want = engine.bind(objective)(x)
    got = tiling.TiledEvaluator(engine, objective, plan)(x)
    loss_rel, grad_rel = abs(got.loss - want.loss) / abs(want.loss), rel(got.grad, want.grad)
    print(f"real VGG16, {w}x{h} in {plan.count} tiles: loss {loss_rel:.1e}, gradient {grad_rel:.1e} relative")
    assert loss_rel <= LOSS_RTOL
    assert grad_rel <= GRAD_RTOL
