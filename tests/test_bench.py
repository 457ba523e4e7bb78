"""The benchmark harness's arithmetic (FLOP counts by hand, the time-to-quality reparametrisations) and the torch
engine's speed choices, which must not change its numbers. No timing is asserted anywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.evaluations import Group, Row, markdown
from bench.flops import count, count_model
from bench.time_to_quality import Colour, Spectral
from style_transfer.caffe_model.loader import load_net
from style_transfer.caffe_model.reader import read_prototxt
from style_transfer.caffe_model.registry import get_model
from style_transfer.engines.base import Evaluator
from style_transfer.engines.torch import TorchEngine, Tuning
from style_transfer.errors import EngineError
from style_transfer.losses import Objective, gram_numpy
from tests import tinynets


def _tiny(tmp_path: Path):  # type: ignore[no-untyped-def]
    text = tinynets.prototxt(size=24)
    path = tmp_path / "tiny.prototxt"
    path.write_text(text)
    return read_prototxt(path)


def test_tiny_net_counts_by_hand(tmp_path: Path) -> None:
    net = _tiny(tmp_path)
    work = count(net, 24, 24, style_layers=["conv1"], loss_blobs=["conv3"])
    by_name = {w.name: w for w in work.layers if w.kind != "gram"}
    # conv1: 4 outputs x 24 x 24 positions x 3 inputs x 3 x 3 taps.
    assert by_name["conv1"].forward_macs == 4 * 24 * 24 * 3 * 9
    # pool1 halves to 12 x 12; conv2 has 2 groups, so each of its 6 outputs reads 4 / 2 inputs.
    assert by_name["conv2"].forward_macs == 6 * 12 * 12 * 2 * 9
    # pool2 (3 / 2, pad 1, Caffe's ceil) gives 7 x 7; conv3's 3 x 1 kernel with pad 1 x 0 keeps 7 x 7.
    assert by_name["conv3"].forward_macs == 5 * 7 * 7 * 6 * 3
    # Every convolution lies between the image and a loss, so each has an input gradient of the same size.
    for name in ("conv1", "conv2", "conv3"):
        assert by_name[name].backward_macs == by_name[name].forward_macs
    # The fc layer is past the deepest loss blob and is cut away, as the engines do.
    assert "fc" not in by_name
    # Gram of conv1: C^2 HW forward, the same for 4 (G - A) F backward.
    gram = [w for w in work.layers if w.kind == "gram"]
    assert [(g.forward_macs, g.backward_macs) for g in gram] == [(4 * 4 * 576, 4 * 4 * 576)]
    conv = 4 * 24 * 24 * 3 * 9 + 6 * 12 * 12 * 2 * 9 + 5 * 7 * 7 * 6 * 3
    assert work.conv_flops == 2 * 2 * conv
    assert work.total_flops == 2 * 2 * conv + 2 * 2 * 4 * 4 * 576


def test_tiny_net_truncates_to_shallow_loss(tmp_path: Path) -> None:
    work = count(_tiny(tmp_path), 24, 24, loss_blobs=["conv1"])
    assert [w.name for w in work.layers] == ["conv1"]


def test_whole_net_forward_includes_fc(tmp_path: Path) -> None:
    work = count(_tiny(tmp_path), 24, 24)
    fc = next(w for w in work.layers if w.name == "fc")
    assert fc.forward_macs == 7 * 5 * 7 * 7


def test_vgg16_forward_at_224_is_the_known_figure() -> None:
    work = count(read_prototxt(get_model("vgg16").prototxt), 224, 224)
    # Per layer H W C_in C_out 9, worked out by hand: 6 layers of 1,849,688,064 (conv1_2, conv2_2, conv3_2,
    # conv3_3, conv4_2, conv4_3), 3 of 924,844,032 (conv2_1, conv3_1, conv4_1), 3 of 462,422,016 (conv5_x) and
    # conv1_1's 86,704,128.
    conv = 6 * 1_849_688_064 + 3 * 924_844_032 + 3 * 462_422_016 + 86_704_128
    assert work.conv_forward_macs == conv == 15_346_630_656
    fc = 25088 * 4096 + 4096 * 4096 + 4096 * 1000
    assert work.forward_macs == conv + fc
    # The commonly quoted figure: about 15.5 GMACs, 30.9 GFLOP.
    assert 2 * work.forward_macs / 1e9 == pytest.approx(30.94, abs=0.01)


def test_vgg19_preset_at_512_by_384() -> None:
    work = count_model("vgg19", 384, 512)
    names = [w.name for w in work.layers if w.kind == "conv"]
    # Cut after conv5_1, the deepest preset blob: 2 + 2 + 4 + 4 + 1 convolutions.
    assert names[-1] == "conv5_1" and len(names) == 13
    assert work.conv_backward_macs == work.conv_forward_macs
    hw = 384 * 512
    by_hand = (hw * 9 * (3 * 64 + 64 * 64) + hw // 4 * 9 * (64 * 128 + 128 * 128)
               + hw // 16 * 9 * (128 * 256 + 3 * 256 * 256) + hw // 64 * 9 * (256 * 512 + 3 * 512 * 512)
               + hw // 256 * 9 * 512 * 512)
    assert work.conv_forward_macs == by_hand
    grams = {w.name: w.forward_macs for w in work.layers if w.kind == "gram"}
    assert grams == {"conv1_1": 64 * 64 * hw, "conv2_1": 128 * 128 * hw // 4, "conv3_1": 256 * 256 * hw // 16,
                     "conv4_1": 512 * 512 * hw // 64, "conv5_1": 512 * 512 * hw // 256}


def test_googlenet_and_caffenet_forward_at_224() -> None:
    # Known orders of magnitude for the whole nets: GoogLeNet about 1.5 GMACs, CaffeNet (grouped) about 0.72.
    g = count(read_prototxt(get_model("googlenet").prototxt), 224, 224)
    c = count(read_prototxt(get_model("caffenet").prototxt), 224, 224)
    assert 1.4e9 < g.forward_macs < 1.7e9
    assert 0.70e9 < c.forward_macs < 0.74e9


def test_markdown_table_marks_unavailable_engines() -> None:
    ok = Row("vgg19", 512, "torch", "torch", "ready", height=384, width=512, walls=[2.0, 3.0, 2.5],
             cpus=[4.0, 5.0, 4.5], minflts=[0, 0, 0], conv_gflop=284.0, floor_s=2.0, cpu_floor_s=4.0)
    missing = Row("vgg19", 512, "caffe", "caffe", "unavailable", reason="ModuleNotFoundError: No module named 'caffe'")
    text = markdown([Group("vgg19", 512, [ok, missing], [])])
    lines = text.splitlines()
    assert len({line.count("|") for line in lines}) == 1
    assert "| 2.500 |" in lines[2] and "| 1.250 |" in lines[2]
    assert "unavailable: ModuleNotFoundError" in lines[3]


@pytest.mark.parametrize("param", [Colour(), Spectral(12, 17)])
def test_reparametrisations_have_true_adjoints_and_inverses(param: Colour | Spectral) -> None:
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 12, 17))
    g = rng.standard_normal((3, 12, 17))
    assert np.vdot(param.forward(y), g) == pytest.approx(np.vdot(y, param.adjoint(g)), rel=1e-10)
    np.testing.assert_allclose(param.inverse(param.forward(y)), y, atol=1e-10)


def _engines_and_objective(tmp_path: Path, tunings: list[Tuning], precision: str = "fp32"
                           ) -> tuple[list[TorchEngine], list[Evaluator], np.ndarray]:
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv1", "conv2", "conv3"], "avg")
    rng = np.random.default_rng(5)
    reference = TorchEngine(net, "avg", tuning=Tuning.plain())
    styles = [rng.uniform(-100, 100, (3, 20, 20)).astype(np.float32) for _ in range(2)]
    content = rng.uniform(-100, 100, (3, 16, 16)).astype(np.float32)
    style_layers = {"conv1": 0.5, "conv2": 0.3, "conv3": 0.2}
    grams = [{k: gram_numpy(v) for k, v in reference.features(s, list(style_layers)).items()} for s in styles]
    objective = Objective(content_weights={"conv2": 1.0, "conv3": 0.5}, style_weights=style_layers, ratio=1e3,
                          content_targets=reference.features(content, ["conv2", "conv3"]),
                          style_targets={k: np.stack([g[k] for g in grams]) for k in style_layers},
                          style_blend=np.array([0.7, 0.3]), tv_weight=0.01)
    engines = [reference] + [TorchEngine(net, "avg", tuning=t, precision=precision) for t in tunings]
    return engines, [e.bind(objective) for e in engines], rng.uniform(-100, 100, (3, 16, 16)).astype(np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("winograd_min_pixels", [0, 10**9])
def test_speed_choices_keep_the_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        winograd_min_pixels: int) -> None:
    """Every speed choice, alone and together, gives the plain formulation's loss, terms and gradient, within
    float32 rounding (Winograd convolutions round differently from direct ones, by about 1e-6 of the norm).
    The tiny net's maps are below the size where Winograd pays, so both sides of that switch are forced."""
    import style_transfer.engines.torch as torch_engine

    monkeypatch.setattr(torch_engine, "_WINOGRAD_MIN_PIXELS", winograd_min_pixels)
    calls: list[int] = []
    apply = torch_engine._WinogradConv.apply

    def counting(*args: object) -> torch.Tensor:
        calls.append(1)
        return apply(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(torch_engine._WinogradConv, "apply", counting)
    tunings = [Tuning(), Tuning(channels_last=False), Tuning(manual_loss_grad=False), Tuning(winograd=False),
               Tuning(winograd=True, channels_last=False), Tuning(inplace_relu=False, channels_last=True)]
    engines, evaluators, x = _engines_and_objective(tmp_path, tunings)
    assert any(op.winograd for op in engines[1]._ops)
    assert not any(op.winograd for op in engines[4]._ops)
    want = evaluators[0](x)
    for engine, evaluate in zip(engines[1:], evaluators[1:], strict=True):
        got = evaluate(x)
        assert got.loss == pytest.approx(want.loss, rel=1e-5)
        for key in want.layers:
            assert got.layers[key] == pytest.approx(want.layers[key], rel=1e-4, abs=1e-6 * want.loss)
        assert got.style_loss == pytest.approx(want.style_loss, rel=1e-5)
        assert got.tv_loss == pytest.approx(want.tv_loss, rel=1e-5)
        assert got.grad.flags.c_contiguous and got.grad.dtype == np.float32 and got.grad.shape == x.shape
        assert _rel(got.grad, want.grad) < 1e-4
        feats = engine.features(x, ["conv1", "conv3"])
        ref = engines[0].features(x, ["conv1", "conv3"])
        for k in ref:
            assert feats[k].shape == ref[k].shape and feats[k].flags.c_contiguous
            assert _rel(feats[k], ref[k]) < 1e-5
    assert bool(calls) == (winograd_min_pixels == 0)


def test_evaluations_do_not_share_gradient_memory(tmp_path: Path) -> None:
    _, evaluators, x = _engines_and_objective(tmp_path, [Tuning()])
    first = evaluators[1](x)
    kept = first.grad.copy()
    evaluators[1](x + 1.0)
    np.testing.assert_array_equal(first.grad, kept)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_run_and_stay_close(tmp_path: Path, precision: str) -> None:
    """The autocast modes (meant for CUDA) run on the CPU too, which checks their logic here: finite results near
    float32's, and float16's scaling of the injected gradients undone."""
    _, evaluators, x = _engines_and_objective(tmp_path, [Tuning()], precision=precision)
    want, got = evaluators[0](x), evaluators[1](x)
    assert np.isfinite(got.loss) and np.all(np.isfinite(got.grad))
    assert got.loss == pytest.approx(want.loss, rel=0.1)
    cosine = np.vdot(got.grad, want.grad) / (np.linalg.norm(got.grad) * np.linalg.norm(want.grad))
    assert cosine > 0.98


def test_precision_is_checked(tmp_path: Path) -> None:
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv1"], "avg")
    with pytest.raises(EngineError, match="precision"):
        TorchEngine(net, "avg", precision="fp8")
    with pytest.raises(EngineError, match="float32"):
        TorchEngine(net, "avg", dtype=torch.float64, precision="bf16")


def test_time_to_quality_clock_gate_and_reading() -> None:
    import io
    import time

    from bench.time_to_quality import Clock, Gate, time_to

    clock = Clock()
    clock.start()
    with clock.paused():
        time.sleep(0.05)
    clock.stop()
    assert clock.total < 0.05  # the pause is not on the clock
    inbox, outbox = io.StringIO("go\ngo\n"), io.StringIO()
    gate = Gate(inbox, outbox)
    gate.release()  # not holding: says nothing
    gate.acquire()
    gate.acquire()  # holding already: takes no second "go"
    gate.release()
    gate.acquire()
    assert outbox.getvalue() == "done\n" and inbox.read() == ""
    run = {"iterations": [(1.0, 10.0, 1), (2.0, float("nan"), 2), (3.0, 5.0, 3), (4.0, 4.0, 4)]}
    assert time_to(run, 5.0) == 3.0 and time_to(run, 4.5) == 4.0 and time_to(run, 1.0) is None


def test_probe_environment_unpins_openblas_in_the_child_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from bench.floor import PINNING_VARIABLES, probe_environment

    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "1048576")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env = probe_environment()
    assert not set(PINNING_VARIABLES) & set(env)
    assert env["OMP_NUM_THREADS"] == "2"
    # The caller's own environment (the workers being timed, the tests) keeps them.
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell" and os.environ["OPENBLAS_L2_SIZE"] == "1048576"


def test_sgemm_probe_runs_unpinned_and_names_its_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("threadpoolctl")
    from bench.floor import SgemmProbe

    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    with SgemmProbe(n=64) as probe:
        probes = probe.measure_all()
        info = probe.info
    assert {p.source for p in probes} == {"numpy", "torch"}
    assert all(p.flops == 2 * 64**3 and p.wall > 0 for p in probes)
    assert info["pinning"] == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}
    assert info["parent_pinning"]["OPENBLAS_CORETYPE"] == "Haswell"
    blas = [k for k in info["kernels"] if k.get("user_api") == "blas"]
    assert blas and all({"internal_api", "architecture", "num_threads"} <= k.keys() for k in blas)


def test_peak_is_the_product_of_its_factors() -> None:
    from bench.floor import Peak, fp32_peak

    peak = Peak("cpu", cores=2, lanes=16, fma_units=2, fma_units_from="given", clock_ghz=2.5, clock_from="x",
                cpuinfo_mhz=2000.0, lscpu_max_mhz=None, measured_clock_ghz=2.5, measured_fma_gflops=300.0)
    assert peak.flops == 2 * 2 * 16 * 2 * 2.5e9
    given = fp32_peak(fma_units=1)
    assert given.fma_units == 1 and given.fma_units_from.startswith("given")
    assert given.lanes in (4, 8, 16) and given.cores >= 1 and given.clock_ghz > 0
    # The peak bounds every clock it was told about from above.
    assert given.clock_ghz * 1e3 >= (given.cpuinfo_mhz or 0.0)
    assert given.flops >= given.nominal_flops


def test_markdown_reports_the_peak_ratio() -> None:
    row = Row("vgg19", 512, "torch", "torch", "ready", height=384, width=512, walls=[1.0, 1.2, 1.1],
              cpus=[2.0, 2.0, 2.0], minflts=[0, 0, 0], conv_gflop=284.0, floor_s=0.5, cpu_floor_s=1.0,
              best_floor_s=0.5, peak_s=0.25)
    lines = markdown([Group("vgg19", 512, [row], [])]).splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    cells = [c.strip() for c in lines[2].split("|")]
    assert cells[header.index("s / peak")] == "4.400" and cells[header.index("s / floor")] == "2.200"


def test_time_to_quality_report_measures_against_the_reference(tmp_path: Path) -> None:
    import json

    from bench.time_to_quality import report

    def run(name: str, engine: str, curve: list[tuple[float, float]]) -> dict[str, object]:
        return {"variant": name, "engine": engine, "evals": [[t, o] for t, o in curve],
                "iterations": [[t, o, i + 1] for i, (t, o) in enumerate(curve)], "fraction_at_bounds": 0.1}

    # The reference ends at 100 and first gets within 1.02x of it (102) at 40 s; the tool at 20 s.
    reference = run("reference", "reference", [(10.0, 200.0), (40.0, 101.0), (80.0, 100.0)])
    default = run("default", "tool", [(10.0, 150.0), (20.0, 102.0), (30.0, 99.0)])
    path = tmp_path / "ttq.json"
    path.write_text(json.dumps({"runs": [reference, default], "load_average_end": {"default": "1.00"}}))
    text = report(path, plot=False)
    assert "1.02 x the objective of `reference`" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 2 | 20 s | 2.00x |" in rows["default"] and "| 2 | 40 s | 1.00x |" in rows["reference"]
    assert "| 0.9900 x |" in rows["default"]
    exact = report(path, plot=False, within=1.0)
    assert "| 3 | 30 s | 2.67x |" in exact


@pytest.mark.slow
def test_reference_and_tool_give_the_same_objective() -> None:
    """The time-to-quality baseline optimises the tool's objective: same value and gradient at the same image."""
    from bench.reference_gatys import Reference
    from bench.time_to_quality import _problem
    from bench.weights import weights_for
    from style_transfer import images

    weights, kind = weights_for("vgg16")
    if kind != "real":
        pytest.skip("the real VGG16 weights are not here")
    content, style = _problem(64, None)
    x = images.preprocess(content)
    ref = Reference(weights, x, images.preprocess(style))
    info = get_model("vgg16")
    net = load_net(info.prototxt, weights, [*info.style_layers, *info.content_layers], "avg")
    engine = TorchEngine(net, "avg")
    objective = Objective(content_weights=dict(info.content_layers), style_weights=dict(info.style_layers),
                          ratio=1e4, content_targets=engine.features(x, list(info.content_layers)),
                          style_targets={k: gram_numpy(v)[None] for k, v in
                                         engine.features(images.preprocess(style), list(info.style_layers)).items()},
                          style_blend=np.ones(1))
    rng = np.random.default_rng(0)
    image = (x + rng.normal(0, 10, x.shape)).astype(np.float32)
    want = engine.bind(objective)(image)
    loss, grad = ref.fun(image.astype(np.float64).ravel())
    assert loss == pytest.approx(want.loss, rel=1e-4)
    assert _rel(grad.reshape(image.shape), want.grad.astype(np.float64)) < 1e-3


def test_tiling_bench_estimates_and_table(tmp_path: Path) -> None:
    """bench/tiling.py's caps and estimates (nothing run) and its table, skipped and failed rows included."""
    from PIL import Image

    from bench import tiling as bench_tiling

    content, style = tmp_path / "content.png", tmp_path / "style.png"
    Image.new("RGB", (1024, 768)).save(content)  # Tübingen's and Starry Night's shapes
    Image.new("RGB", (1024, 640)).save(style)
    small, large = bench_tiling.estimates(512, content, style), bench_tiling.estimates(4096, content, style)
    assert (small["width"], small["height"], small["style"]) == (512, 384, [384, 614])
    assert large["cap_gb"] == 12.0 and large["tiles"] > 1 and large["untiled_gb"] > large["cap_gb"]
    assert small["cap_gb"] < small["untiled_gb"] and small["tiles"] > 1  # forced: just under the whole need
    rows = [bench_tiling.Row(512, "untiled", "ok", height=384, width=512, estimate_gb=1.5, seconds=[1.0, 3.0, 2.0],
                             first_seconds=4.0, targets_seconds=1.5, losses=[100.0], peak_rss_gb=1.2),
            bench_tiling.Row(512, "tiled", "ok", height=384, width=512, cap_gb=1.1, tiles=4, tile=[378, 378],
                             seconds=[3.0], first_seconds=5.0, targets_seconds=2.0, losses=[100.001],
                             peak_rss_gb=1.0),
            bench_tiling.Row(4096, "untiled", "skipped", "estimated 84.1 GB, 21.0 available", estimate_gb=84.1),
            bench_tiling.Row(4096, "tiled", "failed", "killed by signal 9 (out of memory?)", cap_gb=12.0,
                             peak_rss_gb=11.9)]
    table = bench_tiling.markdown(rows).splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == 12 for line in table)
    assert "| 512 | 512x384 | untiled | - | whole | 2.00 | 4.00 |" in table[2]
    assert "| 4 (378x378) | 3.00 |" in table[3] and table[3].endswith("| 1.0e-05 |")
    assert "skipped: estimated 84.1 GB" in table[4] and "killed by signal 9" in table[5] and "11.90" in table[5]


def test_tiling_work_table_is_above_untiled_and_grows_with_the_tiles() -> None:
    """bench/tiling.py --work: every tile is forwarded and backpropagated once and all but the largest forwarded once
    more, so a tiled evaluation costs more than an untiled one, more with every tile (more halo), and two tiles at
    1024 px can meet the issue's 1.5x."""
    from bench import tiling as bench_tiling

    table = bench_tiling.work_table().splitlines()
    counts = [int(c.split()[0]) for c in table[0].strip("|").split("|")[1:]]
    assert len(table) == 2 + len(bench_tiling.WORK_SIZES)
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        values = {n: float(c) for n, c in zip(counts, cells, strict=True) if c}
        assert values and all(1.0 < v < 3.0 for v in values.values()), line
        assert list(values.values()) == sorted(values.values()), line  # more tiles, more halo
    assert float(table[2].split("|")[2]) < 1.5  # 1024 x 768 in two tiles
