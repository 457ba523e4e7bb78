"""The plan of a run: --scales auto, the cost model (FLOPs, tiled or not) and the time left (Clock, Progress)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from style_transfer import memory, tiling
from style_transfer import plan as plan_module
from style_transfer.errors import StyleTransferError
from style_transfer.flops import count
from style_transfer.options import parse_value
from style_transfer.plan import AUTO, Clock, CostModel, Progress, ScaleCost, scale_plan
from style_transfer.transfer import StyleTransfer
from tests import tinynets
from tests.conftest import tiny_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- --scales auto


def test_auto_doubles_from_512_and_gives_each_scale_about_the_same_time() -> None:
    plan = scale_plan(4096, AUTO, None, 512)
    assert [size for size, _ in plan] == [512, 1024, 2048, 4096]
    assert [n for _, n in plan] == [386, 96, 24, 6]
    assert sum(n for _, n in plan) == 512  # -n is the total
    # iterations x pixels: about equal per scale
    work = [n * size**2 for size, n in plan]
    assert max(work) / min(work) < 1.1
    assert [size for size, _ in scale_plan(2048, AUTO, None, 512)] == [512, 1024, 2048]
    three = scale_plan(3072, AUTO, None, 512)
    assert [size for size, _ in three] == [512, 930, 1691, 3072]  # steps under 2x
    assert sum(n for _, n in three) == 512 and [n for _, n in three] == sorted((n for _, n in three), reverse=True)


def test_auto_is_the_single_scale_run_for_ordinary_sizes() -> None:
    for length in (64, 256, 512, 600):
        assert scale_plan(length, AUTO, None, 100) == [(length, 100)]
    assert [size for size, _ in scale_plan(640, AUTO, None, 100)] == [512, 640]


def test_auto_with_min_length_and_its_errors() -> None:
    assert [size for size, _ in scale_plan(256, AUTO, 64, 100)] == [64, 128, 256]
    with pytest.raises(StyleTransferError, match="fewer than the 4 scales of --scales auto"):
        scale_plan(4096, AUTO, None, 3)
    with pytest.raises(StyleTransferError, match="--min-length must be between"):
        scale_plan(1024, AUTO, 2048, 100)


def test_scales_option_takes_a_number_or_auto() -> None:
    assert parse_value("scales", "auto") == AUTO
    assert parse_value("scales", "AUTO") == AUTO
    assert parse_value("scales", "3") == 3
    assert parse_value("scales", 2) == 2
    for bad in ("0", "x", "1.5"):
        with pytest.raises(StyleTransferError, match=r"--scales needs a whole number >= 1 or auto"):
            parse_value("scales", bad)


# ------------------------------------------------------------------------------------------- cost


@pytest.fixture
def transfer(tmp_path: Path) -> StyleTransfer:
    proto, model = tinynets.write_net(tmp_path)
    return StyleTransfer(prototxt=str(proto), weights=str(model), style_layers="conv1,conv2", content_layers="conv3",
                         gpu=-1, engine="torch")


def test_cost_model_counts_the_nets_work_and_the_tiled_passes(transfer: StyleTransfer) -> None:
    model = CostModel(transfer.net, "avg", ["conv1", "conv2"], ["conv3"])
    whole = model.evaluation(96, 128)
    assert whole == count(transfer.net, 96, 128, ["conv1", "conv2"], ["conv3"], "avg").total_flops
    # Proportional to the pixels, up to the edges.
    assert model.evaluation(192, 256) / whole == pytest.approx(4, rel=0.05)
    plan = tiling.plan_tiles(transfer.net, "avg", 96, 128, ["conv1", "conv2", "conv3"], (24, 24))
    tiled = model.evaluation(96, 128, plan.tile_sizes())
    # Two passes (forward; forward and backward) over tiles that overlap: more than the whole image's 1.5 forward
    # passes' worth, and all of it accounted for.
    work = count(transfer.net, 96, 128, ["conv1", "conv2"], ["conv3"], "avg")
    assert tiled > 2 * work.conv_forward_macs + work.conv_backward_macs + 2 * work.gram_macs
    assert model.targets((96, 128), None, [((120, 160), None)]) > 0


def test_costs_say_how_each_scale_is_tiled(transfer: StyleTransfer, monkeypatch: pytest.MonkeyPatch) -> None:
    content, style, _ = tiny_images()
    monkeypatch.setattr(memory, "run_bytes", lambda *args: 0)
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    budget = memory.evaluation_bytes(transfer.net, "avg", 24, 24) / memory.GB
    job = transfer.stylize(content, [style], length=45, num_iters=12, scales=AUTO, min_length=22, max_memory=budget)
    costs = job.costs()
    assert [(c.width, c.iterations) for c in costs] == [(22, 10), (45, 2)]
    assert costs[0].tiles == 0 and costs[1].tiles >= 4
    assert costs[1].evaluation > 4 * costs[0].evaluation


# ------------------------------------------------------------------------------------------- time


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_clock_counts_the_later_bigger_scales_and_follows_the_measured_speed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock_time = FakeTime()
    monkeypatch.setattr(plan_module, "_now", clock_time)
    costs = [ScaleCost(512, 384, 10, 0, 1e9, 1e9), ScaleCost(1024, 768, 2, 4, 8e9, 4e9)]
    clock = Clock(costs)
    assert clock.remaining() is None  # no speed measured yet
    clock.start_scale(0)
    clock_time.now += 1.0
    clock.targets_done()  # 1 GFLOP in 1 s
    left = clock.remaining()
    assert left is not None
    expected = (1 + 10 * 1.1) * 1e9 + 4e9 + (1 + 2 * 1.1) * 8e9
    assert left == pytest.approx(expected / 1e9)
    # An evaluation twice as fast: the estimate follows.
    clock_time.now += 0.5
    clock.evaluation_done()
    assert clock.rate == pytest.approx(1.5e9)
    # The second scale, tiled: the estimate moves within an evaluation as its tiles are done.
    clock.start_scale(1)
    clock_time.now += 1
    clock.targets_done()
    before = clock.remaining()
    clock.tile_done(1, 4, 4)
    middle = clock.remaining()
    clock.tile_done(2, 2, 4)
    after = clock.remaining()
    assert before is not None and middle is not None and after is not None
    assert before > middle > after
    assert before - middle == pytest.approx(middle - after)  # pass 1 is a third, half of pass 2 another third


def test_clock_counts_a_bf16_evaluation_as_less_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision auto: a bf16 evaluation counts BF16_SPEEDUP times less work, so that in a plan whose small scales
    run in fp32 and whose big ones in bf16 the speed measured on one gives a sane time left for the other."""
    clock_time = FakeTime()
    monkeypatch.setattr(plan_module, "_now", clock_time)
    speedup, epi = plan_module.BF16_SPEEDUP, plan_module.EVALUATIONS_PER_ITERATION
    fp32, bf16 = ScaleCost(256, 192, 2, 0, 1e9, 0.0), ScaleCost(512, 384, 4, 0, 4e9, 0.0, bf16=True)
    assert fp32.effort() == 1e9 and bf16.effort() == pytest.approx(4e9 / speedup)
    clock = Clock([fp32, bf16])
    clock.start_scale(0)
    clock.targets_done()
    for iteration in range(3):  # the scale's first evaluation, then one per iteration: 1 s each at 1 GFLOP/s
        clock_time.now += 1.0
        clock.evaluation_done()
        if iteration:
            clock.iteration_done()
    assert clock.rate == pytest.approx(1e9)
    clock.start_scale(1)
    left = clock.remaining()
    assert left is not None
    assert left == pytest.approx((1 + 4 * epi) * 4 / speedup)  # bf16's evaluations at the speed measured in fp32
    clock.targets_done()
    clock_time.now += 4 / speedup  # a bf16 evaluation, as fast as the estimate assumed
    clock.evaluation_done()
    assert clock.rate == pytest.approx(1e9)


def test_a_run_reports_tiles_evaluations_and_the_time_left(transfer: StyleTransfer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress from the library, never printed by it: targets and both evaluation passes tile by tile, every
    evaluation and iteration, with an estimate once some work is timed."""
    content, style, _ = tiny_images()
    monkeypatch.setattr(memory, "run_bytes", lambda *args: 0)
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    budget = memory.evaluation_bytes(transfer.net, "avg", 24, 24) / memory.GB
    job = transfer.stylize(content, [style], length=45, num_iters=4, scales=AUTO, min_length=22, max_memory=budget)
    seen: list[Progress] = []
    steps: list[Any] = []
    result = job.run(steps.append, seen.append)
    assert result.iterations == 4
    assert {p.scale for p in seen} == {0, 1} and all(p.scales == 2 and p.iterations == 4 for p in seen)
    tiled = [p for p in seen if p.tiles]
    # At this budget the style image is tiled at both scales, the content at the larger one only.
    assert tiled and all(p.scale == 1 and p.width == 45 for p in tiled if p.stage == "evaluation")
    passes = {(p.stage, p.tile_pass) for p in tiled}
    assert passes == {("targets", 1), ("evaluation", 1), ("evaluation", 2)}
    evaluated = [p for p in tiled if p.stage == "evaluation"]
    n = evaluated[0].tiles
    first_pass = [p.tile for p in evaluated if p.tile_pass == 1][:n]
    assert first_pass == list(range(1, n + 1))
    assert seen[-1].evaluations == job.evaluations and seen[-1].iteration == 4
    first = next(i for i, p in enumerate(seen) if p.stage == "evaluation")  # the first targets are timed
    assert all(p.remaining is not None for p in seen[first:])
    assert [p.iteration for p in seen] == sorted(p.iteration for p in seen)
    assert len(steps) == 4


def test_the_library_prints_nothing(transfer: StyleTransfer, capsys: pytest.CaptureFixture[str]) -> None:
    content, style, _ = tiny_images()
    transfer.stylize(content, [style], length=45, num_iters=3, scales=AUTO, min_length=22).run(
        on_progress=lambda p: None)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_auto_plans_pick_the_same_sizes_as_the_run(transfer: StyleTransfer) -> None:
    content, style, _ = tiny_images()
    job = transfer.stylize(content, [style], length=45, num_iters=7, scales=AUTO, min_length=22)
    result = job.run()
    assert [s["length"] for s in result.report["scales"]] == [22, 45]
    assert sum(s["iterations"] for s in result.report["scales"]) == 7
    assert np.isfinite(result.report["loss"])
