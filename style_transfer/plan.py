"""The plan of a run: each scale's size and iterations (`scale_plan`), what its work costs in floating-point
operations (`ScaleCost`, tiled or not) and the time left as the run measures its own speed (`Clock`).

The cost model is the net's matrix work (flops.py): proportional to the pixels at every size, plus the second
forward pass a tiled evaluation makes and the halos its tiles share. The machine's speed is not guessed: the run
measures it on its own work (FLOPs done per second of wall time, overheads included) and the estimate of the time
left follows it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from style_transfer import images
from style_transfer.caffe_model.net import Net
from style_transfer.errors import ImageError, StyleTransferError
from style_transfer.flops import Work, count

AUTO = "auto"
# Above this -l, style.py suggests --scales auto to a single-scale run.
SUGGEST_AUTO_ABOVE = 1024
AUTO_SMALLEST = 512  # --scales auto's smallest long side unless --min-length says otherwise
# Above this ratio of --length to the smallest size auto makes more than one scale, so no step is below it.
AUTO_SINGLE = 2**0.25


def scale_plan(length: int, scales: int | str, min_length: int | None, iterations: int) -> list[tuple[int, int]]:
    """(long side, iterations) per scale, smallest first; -n (`iterations`) is the total in every plan.

    - `scales == 1`: the original single-scale run.
    - `scales == N`: sizes grow geometrically from `min_length` (default: half of `length` per step down, at least
      64 px) to `length`; iterations are split in proportion to 1/size: a coarse iteration costs a fraction of a
      fine one and moves the image further, so coarse scales get more of them.
    - `scales == "auto"`, for big outputs: from 512 px (or `min_length`) to `length` in steps of at most about 2x,
      iterations split in proportion to 1/pixels, so that every scale takes about the same time and the full size
      gets only a few iterations (for 4096 px and -n 512: 386, 96, 24 and 6 at 512, 1024, 2048 and 4096 px).
      At most about 1.2x above the smallest size it is the single-scale run.
    """
    if scales == AUTO:
        if min_length is not None:
            _check_min_length(min_length, length)
        smallest = AUTO_SMALLEST if min_length is None else min_length
        if length <= smallest * AUTO_SINGLE:
            return [(length, iterations)]
        count_ = 1 + math.ceil(math.log2(length / smallest) - math.log2(AUTO_SINGLE))
        sizes = _geometric(smallest, length, count_)
        if iterations < count_:
            raise StyleTransferError(f"-n/--num-iters {iterations} is fewer than the {count_} scales of --scales "
                                     f"auto ({', '.join(map(str, sizes))} px): each scale needs at least one iteration")
        return _split(sizes, iterations, 2.0)
    assert isinstance(scales, int)  # options.py has checked: a whole number >= 1, or "auto"
    if scales == 1:
        if min_length is not None:
            raise StyleTransferError("--min-length sets the smallest of several --scales; give --scales 2 or more")
        return [(length, iterations)]
    if iterations < scales:
        raise StyleTransferError(f"-n/--num-iters {iterations} is fewer than --scales {scales}: each scale needs "
                                 "at least one iteration")
    smallest = min_length if min_length is not None else max(64, length >> (scales - 1))
    _check_min_length(smallest, length)
    sizes = _geometric(smallest, length, scales)
    if len(set(sizes)) != len(sizes):
        given = f"--min-length {min_length}" if min_length is not None else "the default smallest size 64"
        raise StyleTransferError(f"--scales {scales} from {given} to --length {length} repeats sizes "
                                 f"({', '.join(map(str, sizes))}); use fewer scales or a smaller --min-length")
    return _split(sizes, iterations, 1.0)


def _check_min_length(smallest: int, length: int) -> None:
    if not images.MIN_SIDE <= smallest <= length:
        raise StyleTransferError(f"--min-length must be between {images.MIN_SIDE} and --length {length}, "
                                 f"got {smallest}")


def _geometric(smallest: int, length: int, count_: int) -> list[int]:
    return [round(smallest * (length / smallest) ** (i / (count_ - 1))) for i in range(count_)]


def _split(sizes: list[int], iterations: int, power: float) -> list[tuple[int, int]]:
    """Iterations in proportion to 1/size**power, at least one each; rounding leftovers go to the cheapest scale."""
    shares = np.array([1.0 / s**power for s in sizes])
    counts = np.maximum(1, np.floor(iterations * shares / shares.sum()).astype(int))
    counts[0] += iterations - int(counts.sum())
    return list(zip(sizes, (int(c) for c in counts), strict=True))


def check_sizes(content: np.ndarray, styles: Sequence[np.ndarray], plan: list[tuple[int, int]],
                style_scale: float) -> None:
    """Every scale's content and style sizes, from the shapes alone (nothing is resampled here)."""
    for index, (length, _) in enumerate(plan):
        try:
            images.long_side_size(content.shape[0], content.shape[1], length)
            style_length = round(length * style_scale)
            for style in styles:
                images.long_side_size(style.shape[0], style.shape[1], style_length,
                                      what=f"--style-scale {style_scale:g} x --length {length} =")
        except ImageError as exc:
            if index == len(plan) - 1:
                raise
            raise StyleTransferError(f"scale {index + 1} of {len(plan)} is too small: {exc}; "
                                     "raise --min-length or use fewer --scales") from None


# ----------------------------------------------------------------------------------------------- cost

def _now() -> float:
    return time.perf_counter()


EVALUATIONS_PER_ITERATION = 1.1  # L-BFGS-B's evaluations per iteration until the run has counted its own
SMOOTHING = 0.5  # weight of the newest speed sample: the speed follows the current scale's size and tiling
# How much faster a bf16 evaluation runs than an fp32 one where `--precision auto` uses bf16 (AMX; BENCHMARKS.md):
# the clock counts a bf16 evaluation as this much less work, so that the speed of fp32 scales (the small ones, and
# the scoring of the result) does not stand for bf16's, or the other way round.
BF16_SPEEDUP = 2.4


@dataclass(frozen=True)
class ScaleCost:
    """One scale of a run: its size, its iterations, how it is tiled and its work in FLOPs."""

    width: int
    height: int
    iterations: int
    tiles: int  # tiles per evaluation pass; 0 when the image is evaluated whole
    evaluation: float  # one evaluation (a tiled one: both passes over every tile, halos included)
    targets: float  # the style and content targets made before the scale starts
    bf16: bool = False  # the scale optimises in bf16 (`--precision auto`)

    def work(self, per_iteration: float | None = None) -> float:
        """The whole scale's FLOPs: its targets, the evaluation at its start and those of its iterations."""
        epi = EVALUATIONS_PER_ITERATION if per_iteration is None else per_iteration
        return self.targets + (1 + self.iterations * epi) * self.evaluation

    def effort(self) -> float:
        """An evaluation's work as the clock counts it: fp32 FLOPs, a bf16 evaluation counting BF16_SPEEDUP times
        less."""
        return self.evaluation / (BF16_SPEEDUP if self.bf16 else 1.0)


class CostModel:
    """FLOPs of the pieces of a run on one net (flops.count, remembered per input size)."""

    def __init__(self, net: Net, pooling: str | None, style_blobs: Sequence[str], content_blobs: Sequence[str]):
        self.net, self.pooling = net, pooling
        self.style, self.content = list(style_blobs), list(content_blobs)
        self._seen: dict[tuple[int, int, str], Work] = {}

    def _work(self, height: int, width: int, blobs: str = "all") -> Work:
        """The work to the style and content blobs ("all"), the style blobs alone or the content blobs alone."""
        key = (height, width, blobs)
        if key not in self._seen:
            style = [] if blobs == "content" else self.style
            content = [] if blobs == "style" else self.content
            self._seen[key] = count(self.net, height, width, style, content, self.pooling)
        return self._seen[key]

    def evaluation(self, height: int, width: int, tiles: Sequence[tuple[int, int]] | None = None) -> float:
        """One evaluation of the objective; `tiles` are the tiles' input sizes (height, width) when tiled: a
        forward pass over every tile but the largest, then a forward and backward one over every tile, and the
        Gram terms once over the image."""
        whole = self._work(height, width)
        if not tiles:
            return float(whole.total_flops)
        forward = [self._work(h, w).conv_forward_macs for h, w in tiles]
        convs = sum(4 * f + 2 * self._work(h, w).conv_backward_macs for f, (h, w) in zip(forward, tiles, strict=True))
        convs -= 2 * max(forward)
        return float(convs + 2 * whole.gram_macs)

    def targets(self, content: tuple[int, int], content_tiles: Sequence[tuple[int, int]] | None,
                styles: Sequence[tuple[tuple[int, int], Sequence[tuple[int, int]] | None]]) -> float:
        """The content targets (a forward pass) and each style image's Gram matrices (a forward pass and F F^T)."""
        total = sum(2 * self._work(h, w, "content").conv_forward_macs for h, w in (content_tiles or [content]))
        for (h, w), tiles in styles:
            total += sum(2 * self._work(th, tw, "style").conv_forward_macs for th, tw in (tiles or [(h, w)]))
            total += self._work(h, w, "style").gram_macs  # the forward half of the counted Gram work, 2 FLOPs each
        return float(total)


# ----------------------------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Progress:
    """Where a run is, for a progress display: sent after every tile, evaluation and iteration."""

    scale: int  # index of the scale being optimised (0 = the smallest)
    scales: int
    width: int
    height: int
    iteration: int  # iterations done in the whole run
    iterations: int  # iterations planned for the whole run
    evaluations: int  # evaluations done in the whole run
    stage: str  # "targets" (the scale's style and content targets) or "evaluation"
    tile_pass: int  # a tiled stage: 1 (forward over the tiles) or 2 (forward and backward); 0 otherwise
    tile: int  # tiles done in this pass
    tiles: int  # tiles in each pass; 0 when the image is evaluated whole
    elapsed: float  # seconds since the run started
    remaining: float | None  # seconds left for the whole run; None until the run has timed some of its work
    flops_per_second: float | None  # the speed measured so far


@dataclass
class Clock:
    """The time left in a run: the FLOPs still to do (ScaleCost per scale) over the speed measured so far."""

    costs: list[ScaleCost]
    started: float = field(default_factory=lambda: _now())
    scale: int = 0
    stage: str = "targets"
    iterations: int = 0  # in the whole run
    evaluations: int = 0
    scale_iterations: int = 0  # in the current scale
    scale_evaluations: int = 0
    fraction: float = 0.0  # of the current piece of work (targets or evaluation), from its tiles
    rate: float | None = None  # FLOPs per second, a bf16 evaluation's counted as in ScaleCost.effort
    _mark: float = 0.0  # when the last piece of work ended

    def __post_init__(self) -> None:
        self._mark = self.started

    def start_scale(self, scale: int, cost: ScaleCost | None = None) -> None:
        """Scale `scale` begins (its targets are next); `cost` replaces the planned one (the tiling chosen now)."""
        if cost is not None:
            self.costs[scale] = cost
        self.scale, self.stage, self.fraction = scale, "targets", 0.0
        self.scale_iterations = self.scale_evaluations = 0

    def targets_done(self) -> None:
        self._measure(self.costs[self.scale].targets)
        self.stage = "evaluation"

    def evaluation_done(self) -> None:
        cost = self.costs[self.scale]
        self._measure(cost.effort())
        self.evaluations += 1
        self.scale_evaluations += 1

    def iteration_done(self) -> None:
        self.iterations += 1
        self.scale_iterations += 1

    def tile_done(self, tile_pass: int, tile: int, tiles: int) -> None:
        """Progress within a tiled piece: pass 1 (forward) is about a third of an evaluation, pass 2 the rest."""
        if self.stage == "targets":
            self.fraction = tile / tiles
        else:
            self.fraction = (tile / tiles) / 3 if tile_pass == 1 else 1 / 3 + 2 * (tile / tiles) / 3

    def _measure(self, flops: float) -> None:
        now = _now()
        seconds, self._mark, self.fraction = now - self._mark, now, 0.0
        if seconds <= 0 or flops <= 0:
            return
        sample = flops / seconds
        self.rate = sample if self.rate is None else SMOOTHING * sample + (1 - SMOOTHING) * self.rate

    def per_iteration(self) -> float:
        """Evaluations per iteration, beyond the one each scale makes at its start."""
        if self.iterations < 3:
            return EVALUATIONS_PER_ITERATION
        return max(1.0, (self.evaluations - self.scale - 1) / self.iterations)

    def remaining_flops(self) -> float:
        epi = self.per_iteration()
        cost = self.costs[self.scale]
        iterations_left = max(0, cost.iterations - self.scale_iterations)
        evaluations_left = max(iterations_left * 1.0, 1 + cost.iterations * epi - self.scale_evaluations)
        evaluation = cost.effort()
        total = evaluations_left * evaluation
        if self.stage == "targets":
            total += (1 - self.fraction) * cost.targets
        else:
            total -= min(self.fraction, 1.0) * evaluation
        for later in self.costs[self.scale + 1:]:
            total += later.targets + (1 + later.iterations * epi) * later.effort()
        return max(0.0, total)

    def remaining(self) -> float | None:
        """Seconds left, or None before the run has timed any of its work."""
        if self.rate is None:
            return None
        return self.remaining_flops() / self.rate

    def progress(self, tile_pass: int = 0, tile: int = 0, tiles: int = 0) -> Progress:
        cost = self.costs[self.scale]
        planned = sum(c.iterations for c in self.costs)
        return Progress(self.scale, len(self.costs), cost.width, cost.height, self.iterations, planned,
                        self.evaluations, self.stage, tile_pass, tile, tiles, _now() - self.started,
                        self.remaining(), self.rate)
