"""transfer.py: what reaches the objective and the optimiser, checked by value, and runs that finish themselves."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from style_transfer import images, optimize
from style_transfer import transfer as transfer_module
from style_transfer.colors import match_colors
from style_transfer.errors import StyleTransferError
from style_transfer.losses import Objective
from style_transfer.transfer import StyleTransfer, scale_plan
from tests.conftest import tiny_images


@pytest.fixture
def transfer(tiny_net: tuple[Path, Path]) -> StyleTransfer:
    proto, model = tiny_net
    return StyleTransfer(prototxt=proto, weights=model, style_layers="conv1,conv2", content_layers="conv3", gpu=-1)


def _image(st: StyleTransfer, content: np.ndarray, styles: list[np.ndarray], **kw: Any) -> np.ndarray:
    kw.setdefault("num_iters", 8)
    return st.stylize(content, styles, length=32, **kw).run().x


# ------------------------------------------------------------------------------------------- plan and sizes


def test_scale_plan() -> None:
    assert scale_plan(512, 1, None, 512) == [(512, 512)]
    plan = scale_plan(512, 2, 256, 180)
    assert [s for s, _ in plan] == [256, 512] and sum(n for _, n in plan) == 180 and plan[0][1] > plan[1][1]
    plan = scale_plan(512, 3, None, 90)
    assert [s for s, _ in plan] == [128, 256, 512] and sum(n for _, n in plan) == 90


def test_min_length_without_scales_and_repeated_sizes_are_errors() -> None:
    with pytest.raises(StyleTransferError, match="--min-length sets the smallest of several --scales"):
        scale_plan(512, 1, 256, 100)
    with pytest.raises(StyleTransferError, match=r"--scales 3 .* repeats sizes \(64, 64, 64\)"):
        scale_plan(64, 3, None, 30)


def test_multiscale_ends_at_full_size_and_warm_starts(transfer: StyleTransfer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    content, style, _ = tiny_images()
    starts: list[np.ndarray] = []
    finals: list[np.ndarray] = []
    real = optimize.LBFGSB.run

    def spy(self: optimize.LBFGSB, on_step: Any = None) -> optimize.Result:
        starts.append(self.x0.reshape(self.shape).astype(np.float32))
        result = real(self, on_step)
        assert result.image is not None
        finals.append(result.image)
        return result

    monkeypatch.setattr(optimize.LBFGSB, "run", spy)
    sizes: dict[int, tuple[int, ...]] = {}
    job = transfer.stylize(content, [style], length=40, num_iters=9, scales=3, min_length=24)
    result = job.run(lambda step: sizes.setdefault(step.scale, step.image.shape))
    assert sorted(sizes) == [0, 1, 2]
    assert sizes[0] == (3, 18, 24) and sizes[2] == (3, 30, 40)
    assert result.x.shape == (3, 30, 40) and result.rgb.shape == (30, 40, 3)
    for previous, start in zip(finals[:-1], starts[1:], strict=True):
        h, w = start.shape[1:]
        np.testing.assert_allclose(start, images.preprocess(images.resize_to(images.deprocess(previous), h, w)),
                                   atol=1e-4)


def test_precision_auto_runs_bf16_where_it_pays_and_scores_in_fp32(tiny_net: tuple[Path, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision auto where bf16 is fast: every scale big enough optimises in bf16, on targets the bf16 engine
    made, and a finished run's scores are the fp32 objective's, targets included. Where bf16 is not fast, or the net
    is small, auto is fp32."""
    proto, model = tiny_net
    content, style, _ = tiny_images()
    kw = {"prototxt": proto, "weights": model, "style_layers": "conv1,conv2", "content_layers": "conv3", "gpu": -1}
    job_kw = {"length": 40, "num_iters": 16, "scales": 2, "min_length": 24, "init": "content"}
    fp32 = StyleTransfer(precision="fp32", **kw).stylize(content, [style], **job_kw).run()
    assert StyleTransfer(**kw).options["precision"] == "auto"  # the default
    for fast in (False, True):  # no fast bf16 here; or fast bf16, but a net too small for it to pay
        monkeypatch.setattr(transfer_module, "fast_bf16", lambda device, fast=fast: fast)
        auto = StyleTransfer(precision="auto", **kw)
        assert (auto.fast_engine is not None) == fast
        plain = auto.stylize(content, [style], **job_kw).run()
        np.testing.assert_array_equal(plain.x, fp32.x)
        assert plain.report["precision"] == "fp32"

    monkeypatch.setattr(transfer_module, "BF16_MIN_FLOP", 0.0)
    st = StyleTransfer(precision="auto", **kw)
    assert st.engine.precision == "fp32" and st.fast_engine is not None and st.fast_engine.precision == "bf16"
    real_features = type(st.engine).features
    made: list[str] = []

    def features(self: Any, image: np.ndarray, blobs: Any) -> Any:
        made.append(self.precision)
        return real_features(self, image, blobs)

    runs: list[tuple[str, int]] = []
    real = optimize.LBFGSB.run

    def spy(self: optimize.LBFGSB, on_step: Any = None) -> optimize.Result:
        result = real(self, on_step)
        runs.append((bound_as[-1], result.iterations))
        return result

    bound_as: list[str] = []
    evaluated: list[tuple[str, float]] = []
    real_bound = transfer_module.Stylization._bound

    def bound(self: Any, engine: Any, objective: Any, plan: Any) -> Any:
        bound_as.append(engine.precision)
        evaluate = real_bound(self, engine, objective, plan)

        def logged(image: np.ndarray) -> Any:
            evaluation = evaluate(image)
            evaluated.append((engine.precision, evaluation.loss))
            return evaluation

        return logged

    monkeypatch.setattr(type(st.engine), "features", features)
    monkeypatch.setattr(optimize.LBFGSB, "run", spy)
    monkeypatch.setattr(transfer_module.Stylization, "_bound", bound)
    job = st.stylize(content, [style], **job_kw)
    result = job.run()
    assert runs == [("bf16", n) for _, n in job.plan]
    # Each scale's targets (the style Grams, then the content features) by the bf16 engine; then, for the scores,
    # the last scale's again in fp32.
    assert made == ["bf16", "bf16"] * len(job.plan) + ["fp32", "fp32"]
    assert result.report["precision"] == "bf16" and result.iterations == 16
    # The reported scores are the fp32 objective's at the result, evaluated after the bf16 optimisation.
    assert result.evaluation is not None and evaluated[-1] == ("fp32", result.evaluation.loss)
    assert [p for p, _ in evaluated].count("fp32") == 1
    # bf16 really ran: the result is not the fp32 run's.
    assert not np.array_equal(result.x, fp32.x)
    # A run cut short keeps the evaluation it has: no fp32 scoring after Ctrl-C or a stop.
    evaluated.clear()

    def stop(step: Any) -> None:
        if step.iteration == 3:
            raise StopIteration

    cut = st.stylize(content, [style], **job_kw).run(stop)
    assert cut.stop_reason == "stopped" and {p for p, _ in evaluated} == {"bf16"}


def test_too_small_first_scale_names_min_length(transfer: StyleTransfer) -> None:
    content, style, _ = tiny_images()
    with pytest.raises(StyleTransferError, match="--min-length"):
        transfer.stylize(content, [style], length=40, num_iters=9, scales=2, min_length=16)


def test_too_small_style_names_style_scale(transfer: StyleTransfer) -> None:
    content, style, _ = tiny_images()
    with pytest.raises(StyleTransferError, match=r"at --style-scale 0\.3 x --length 40 = 12"):
        transfer.stylize(content, [style], length=40, style_scale=0.3)


def test_stylize_checks_sizes_without_resampling(transfer: StyleTransfer, monkeypatch: pytest.MonkeyPatch) -> None:
    content, a, b = tiny_images()
    calls = []
    monkeypatch.setattr(images, "_resample", lambda *args: calls.append(args))
    transfer.stylize(content, [a, b], length=40, num_iters=9, scales=3, min_length=24)
    assert calls == []


# ------------------------------------------------------------------------------------------- what the objective gets


def _bound_objectives(transfer: StyleTransfer, monkeypatch: pytest.MonkeyPatch) -> list[Objective]:
    seen: list[Objective] = []
    real = transfer.engine.bind

    def spy(objective: Objective) -> Any:
        seen.append(objective)
        return real(objective)

    monkeypatch.setattr(transfer.engine, "bind", spy)
    return seen


def test_blend_is_normalised(transfer: StyleTransfer, monkeypatch: pytest.MonkeyPatch) -> None:
    content, a, b = tiny_images()
    seen = _bound_objectives(transfer, monkeypatch)
    transfer.stylize(content, [a, b], length=32, num_iters=1, style_weights=[1.0, 3.0], ratio="2e3").run()
    np.testing.assert_allclose(seen[0].style_blend, [0.25, 0.75])
    assert seen[0].ratio == 2000.0
    assert seen[0].style_targets["conv1"].shape[0] == 2


def test_style_image_size_follows_style_scale_and_colour_match(transfer: StyleTransfer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    content, a, _ = tiny_images()
    grams_of: list[np.ndarray] = []
    real = transfer.style_grams

    def spy(style: np.ndarray, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        grams_of.append(style)
        return real(style, *args, **kwargs)

    monkeypatch.setattr(transfer, "style_grams", spy)
    transfer.stylize(content, [a], length=32, num_iters=1, style_scale=1.5, color_match="meancov").run()
    (style,) = grams_of
    assert max(style.shape[:2]) == 48
    resized = images.resize_long_side(a, 48)
    np.testing.assert_allclose(style, match_colors(resized, images.resize_long_side(content, 32), "meancov"),
                               atol=1e-6)


def test_bounds_handed_to_lbfgsb_are_the_pixel_range(transfer: StyleTransfer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    content, a, _ = tiny_images()
    captured: dict[str, Any] = {}
    real = optimize.minimize

    def spy(*args: Any, **kwargs: Any) -> Any:
        captured.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(optimize, "minimize", spy)
    monkeypatch.setattr(optimize, "SETULB", None)  # through minimize(), where the bounds can be seen
    transfer.stylize(content, [a], length=32, num_iters=2).run()
    bounds = captured["bounds"]
    lower = np.asarray(bounds.lb).reshape(3, 24, 32)
    upper = np.asarray(bounds.ub).reshape(3, 24, 32)
    for channel, mean in enumerate(images.MEAN_BGR):
        assert np.all(lower[channel] == pytest.approx(-float(mean)))
        assert np.all(upper[channel] == pytest.approx(255.0 - float(mean)))


# ------------------------------------------------------------------------------------------- runs


def test_blend_one_to_zero_equals_single_style(transfer: StyleTransfer) -> None:
    content, a, b = tiny_images()
    single = _image(transfer, content, [a])
    blended = _image(transfer, content, [a, b], style_weights=[1.0, 0.0])
    mixed = _image(transfer, content, [a, b], style_weights=[0.5, 0.5])
    np.testing.assert_allclose(blended, single, atol=1e-3)
    assert not np.allclose(mixed, single, atol=1e-1)


def test_seed_reproducible_and_reported(transfer: StyleTransfer) -> None:
    content, a, _ = tiny_images()
    one = transfer.stylize(content, [a], length=32, num_iters=8, init="1", seed=5).run()
    two = _image(transfer, content, [a], init="1", seed=5)
    other = _image(transfer, content, [a], init="1", seed=6)
    np.testing.assert_array_equal(one.x, two)
    assert not np.array_equal(one.x, other)
    assert one.report["seed"] == 5
    drawn = transfer.stylize(content, [a], length=32, num_iters=4, init="1").run()
    again = _image(transfer, content, [a], init="1", seed=drawn.report["seed"], num_iters=4)
    np.testing.assert_array_equal(drawn.x, again)


def test_tv_weight_lowers_total_variation(transfer: StyleTransfer) -> None:
    def tv(x: np.ndarray) -> float:
        return float(np.sum(np.diff(x, axis=1) ** 2) + np.sum(np.diff(x, axis=2) ** 2))

    content, a, _ = tiny_images()
    plain = _image(transfer, content, [a], init="0", seed=1, num_iters=20)
    smooth = _image(transfer, content, [a], init="0", seed=1, num_iters=20, tv_weight=10.0)
    assert tv(smooth) < 0.5 * tv(plain)


def test_two_runs_from_one_model_in_turn(transfer: StyleTransfer) -> None:
    """A whole second run inside the first one's step callback: each must come out as it does alone."""
    content, a, b = tiny_images()
    first_alone = transfer.stylize(content, [a], length=32, num_iters=6).run()
    second_alone = transfer.stylize(content[:30, :40], [b], length=40, num_iters=5, ratio=100).run()

    first = transfer.stylize(content, [a], length=32, num_iters=6)
    second = transfer.stylize(content[:30, :40], [b], length=40, num_iters=5, ratio=100)
    inner: list[Any] = []

    def step(s: Any) -> None:
        if s.iteration == 3:
            inner.append(second.run())

    outer = first.run(step)
    np.testing.assert_array_equal(outer.x, first_alone.x)
    np.testing.assert_array_equal(inner[0].x, second_alone.x)
    assert outer.evaluation is not None and first_alone.evaluation is not None
    assert outer.evaluation.loss == first_alone.evaluation.loss


def test_stop_iteration_from_on_step_keeps_that_iterate(transfer: StyleTransfer) -> None:
    content, a, _ = tiny_images()
    seen: list[np.ndarray] = []

    def step(s: Any) -> None:
        seen.append(s.image)
        if s.iteration == 4:
            raise StopIteration

    result = transfer.stylize(content, [a], length=32, num_iters=50).run(step)
    assert result.stop_reason == "stopped" and result.iterations == 4
    np.testing.assert_array_equal(result.x, seen[-1])


def test_report_timing_fields(transfer: StyleTransfer) -> None:
    content, a, _ = tiny_images()
    job = transfer.stylize(content, [a], length=32, num_iters=5)
    started = time.perf_counter()
    report = job.run().report
    wall = time.perf_counter() - started
    assert 0 < report["seconds"] <= wall
    assert report["evaluations"] >= 5
    assert report["seconds_per_evaluation"] == pytest.approx(report["seconds"] / report["evaluations"])
    assert report["setup_seconds"] > 0  # the model's loading, counted by its first run
    assert transfer.stylize(content, [a], length=32, num_iters=2).run().report["setup_seconds"] < \
        report["setup_seconds"]
    assert (report["width"], report["height"], report["iterations"]) == (32, 24, 5)


def test_unknown_library_option_is_refused(transfer: StyleTransfer) -> None:
    content, a, _ = tiny_images()
    with pytest.raises(TypeError, match="iterations"):
        transfer.stylize(content, [a], iterations=3)
