"""Exact tiled evaluation: the objective of an image too big for memory, computed tile by tile, equal to the untiled
objective up to float rounding. It sits above the engines and uses only `Engine.features` and `Engine.vjp`.

The objective is a sum over feature positions: each Gram matrix G = sum over positions of f f^T, the style
gradient at a position is W f with W = 4 s ((sum b) G - sum_s b_s A_s), which needs the whole G and nothing else
global, and the content term is local. So one evaluation takes two passes over the tiles:

1. forward each tile and add its interior positions' f f^T to G (and their content terms to the loss);
2. forward and backward each tile again, injecting the gradients of its interior positions only, and add the tile's
   input gradient into the full gradient.

The largest tile ends pass 1 and begins pass 2, forwarded once: its activations are kept while G is completed, which
costs no memory beyond what pass 2 holds anyway, and saves the largest tile's forward pass per evaluation.

A tile is a core (its share of the image) and a halo around it. Each blob position belongs to the one core holding
its anchor (position j of a blob of stride S at input row j S); the halo is wide enough that every input position a
core's positions depend on lies in the tile or in padding at the true image border (caffe_model/net.py `reaches`).
Tile origins are multiples of the net's total stride, so every layer's windows, Caffe's ceil-mode edges included,
fall where they fall untiled; a tile's own edge pads only where it is the image's edge, and the positions whose
windows would read the tile's artificial padding are never interior.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from style_transfer.caffe_model.net import Net, Reach, infer_shapes, reaches
from style_transfer.engines.base import Engine, Evaluation, Evaluator
from style_transfer.errors import ModelError
from style_transfer.losses import Objective, TorchTargets, style_scale, style_value_and_weight, tv_loss_torch


@dataclass(frozen=True)
class Span:
    """One tile along one axis: its core [core_start, core_end) and its input [start, end), in image positions."""

    core_start: int
    core_end: int
    start: int
    end: int
    last: bool  # the core reaches the image's far edge


@dataclass(frozen=True)
class Tile:
    rows: Span
    cols: Span

    def crop(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(image[:, self.rows.start:self.rows.end, self.cols.start:self.cols.end])

    @property
    def pixels(self) -> int:
        return (self.rows.end - self.rows.start) * (self.cols.end - self.cols.start)


@dataclass(frozen=True)
class TilePlan:
    """How an image of `height` x `width` is cut into tiles for the blobs in `blobs`."""

    height: int
    width: int
    rows: tuple[Span, ...]
    cols: tuple[Span, ...]
    halo: int  # the widest halo, in input pixels
    reach: dict[str, Reach]
    shapes: dict[str, tuple[int, ...]]  # each blob's untiled shape, 1 x C x H x W

    @property
    def tiles(self) -> Iterator[Tile]:
        for rows in self.rows:
            for cols in self.cols:
                yield Tile(rows, cols)

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def tile_size(self) -> tuple[int, int]:
        """The largest tile's input size (height, width)."""
        return max(s.end - s.start for s in self.rows), max(s.end - s.start for s in self.cols)

    def tile_sizes(self) -> list[tuple[int, int]]:
        """Every tile's input size (height, width)."""
        return [(r.end - r.start, c.end - c.start) for r in self.rows for c in self.cols]

    def summary(self) -> dict[str, Any]:
        """What the report and `-v` say about the tiling; `seams` are where the tiles' cores meet (image rows and
        columns), where a user would look for a seam."""
        return {"tiles": self.count, "tile": list(self.tile_size), "halo": self.halo,
                "seams": {"rows": [s.core_start for s in self.rows[1:]], "cols": [s.core_start for s in self.cols[1:]]}}

    def interior(self, tile: Tile, blob: str) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """The tile's interior positions of `blob`: (rows, cols) in the tile's blob, and the same in the whole
        image's blob."""
        reach = self.reach[blob]
        _n, _c, h, w = self.shapes[blob]
        local, whole = [], []
        for axis, span, size in ((0, tile.rows, h), (1, tile.cols, w)):
            stride = reach.stride[axis]
            first = span.core_start // stride
            stop = size if span.last else span.core_end // stride
            stop = max(first, stop)
            origin = span.start // stride
            local.append(slice(first - origin, stop - origin))
            whole.append(slice(first, stop))
        return (local[0], local[1]), (whole[0], whole[1])


def _spans(size: int, core: int, halo_lo: int, halo_hi: int) -> tuple[Span, ...]:
    spans = []
    for start in range(0, size, core):
        end = min(size, start + core)
        spans.append(Span(start, end, max(0, start - halo_lo), min(size, end + halo_hi), end == size))
    return tuple(spans)


def geometry(net: Net, pooling: str | None, blobs: Sequence[str]
              ) -> tuple[dict[str, Reach], tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]:
    """Every blob's reach; the stride tile origins are multiples of (the least common multiple of every blob's
    stride, per axis); and per axis (before, after), how far a tile reaches beyond its core. The leading halo is
    rounded up to the alignment so that tile origins stay aligned."""
    reach = reaches(net, pooling)
    align = (math.lcm(*(r.stride[0] for r in reach.values())), math.lcm(*(r.stride[1] for r in reach.values())))
    halo = []
    for axis in (0, 1):
        before = max(max(0, -reach[b].lo[axis]) for b in blobs)
        after = max(max(0, reach[b].hi[axis] - reach[b].stride[axis] + 1) for b in blobs)
        halo.append((-(-before // align[axis]) * align[axis], after))
    return reach, align, (halo[0], halo[1])


def plan_tiles(net: Net, pooling: str | None, height: int, width: int, blobs: Sequence[str],
               core: tuple[int, int]) -> TilePlan:
    """Tiles whose cores are `core` (rounded up to the alignment) for an image of `height` x `width`."""
    reach, align, ((lo_h, hi_h), (lo_w, hi_w)) = geometry(net, pooling, blobs)
    core_h = max(align[0], -(-core[0] // align[0]) * align[0])
    core_w = max(align[1], -(-core[1] // align[1]) * align[1])
    rows, cols = _spans(height, core_h, lo_h, hi_h), _spans(width, core_w, lo_w, hi_w)
    # A small last core is merged into the one before when its tile would be too small for the net.
    rows, cols = _fit(net, pooling, rows, width), _fit(net, pooling, cols, height, axis=1)
    shapes = infer_shapes(net, (1, 3, height, width), pooling)
    return TilePlan(height, width, rows, cols, max(lo_h, hi_h, lo_w, hi_w), reach,
                    {b: shapes[b] for b in blobs})


def _fit(net: Net, pooling: str | None, spans: tuple[Span, ...], other: int, axis: int = 0) -> tuple[Span, ...]:
    spans_list = list(spans)
    while len(spans_list) > 1:
        size = spans_list[-1].end - spans_list[-1].start
        try:
            infer_shapes(net, (1, 3, size, other) if axis == 0 else (1, 3, other, size), pooling)
            break
        except ModelError:
            a, b = spans_list[-2], spans_list.pop()
            spans_list[-1] = Span(a.core_start, b.core_end, a.start, b.end, True)
    return tuple(spans_list)


# ----------------------------------------------------------------------------------------------- targets

# Told after each tile: (pass, tiles done in it, tiles in it); pass 1 is a forward pass over the tiles, pass 2 a
# forward and backward one. For a progress display; the library itself prints nothing.
OnTile = Callable[[int, int, int], None]


def tiled_features(engine: Engine, image: np.ndarray, blobs: Sequence[str], plan: TilePlan,
                   on_tile: OnTile | None = None) -> dict[str, np.ndarray]:
    """Engine.features of the whole image (C x H x W per blob), assembled from each tile's interior."""
    out = {b: np.empty(plan.shapes[b][1:], np.float32) for b in blobs}
    for k, tile in enumerate(plan.tiles, 1):
        feats = engine.features(tile.crop(image), blobs)
        for b in blobs:
            (lr, lc), (gr, gc) = plan.interior(tile, b)
            out[b][:, gr, gc] = feats[b][:, lr, lc]
        if on_tile is not None:
            on_tile(1, k, plan.count)
    return out


def tiled_grams(engine: Engine, image: np.ndarray, blobs: Sequence[str], plan: TilePlan,
                on_tile: OnTile | None = None) -> dict[str, np.ndarray]:
    """The Gram matrix F F^T of each blob of the whole image (losses.gram_numpy), summed over the tiles' interiors
    in float64."""
    grams = {b: np.zeros((plan.shapes[b][1],) * 2) for b in blobs}
    for k, tile in enumerate(plan.tiles, 1):
        feats = engine.features(tile.crop(image), blobs)
        for b in blobs:
            (lr, lc), _ = plan.interior(tile, b)
            f = np.ascontiguousarray(feats[b][:, lr, lc]).reshape(feats[b].shape[0], -1)
            grams[b] += f @ f.T  # one product per tile in the engine's dtype
        if on_tile is not None:
            on_tile(1, k, plan.count)
    return {b: g.astype(np.float32) for b, g in grams.items()}


# ----------------------------------------------------------------------------------------------- evaluation


class TiledEvaluator(Evaluator):
    """An objective evaluated tile by tile on any engine; equal to `engine.bind(objective)` up to rounding."""

    def __init__(self, engine: Engine, objective: Objective, plan: TilePlan, on_tile: OnTile | None = None) -> None:
        self.engine, self.objective, self.plan, self.on_tile = engine, objective, plan, on_tile
        self.blobs = objective.layers
        missing = [b for b in self.blobs if b not in plan.shapes]
        if missing:
            raise ValueError(f"the tile plan does not cover {missing}")
        # Float64 on the CPU: the Gram matrices are sums over tiles, and W is formed once per evaluation.
        self.targets = TorchTargets.of(replace(objective, content_targets={}),
                                       lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)),
                                       torch.contiguous_format)

    def evaluate(self, image: np.ndarray) -> Evaluation:
        obj, plan, engine, on_tile = self.objective, self.plan, self.engine, self.on_tile or (lambda *_: None)
        if tuple(image.shape[1:]) != (plan.height, plan.width):
            raise ValueError(f"the tile plan is for {plan.height} x {plan.width}, got {image.shape}")
        grams = {b: torch.zeros((plan.shapes[b][1],) * 2, dtype=torch.float64) for b in obj.style_weights}
        content = dict.fromkeys(obj.content_weights, 0.0)
        tiles = list(plan.tiles)
        last = tiles.pop(max(range(len(tiles)), key=lambda i: tiles[i].pixels))
        first = tiles
        # Pass 1 over every tile but the largest: the Gram matrices and the content terms.
        for k, tile in enumerate(first, 1):
            feats = engine.features(tile.crop(image), self.blobs)
            self._accumulate(tile, {b: torch.from_numpy(v) for b, v in feats.items()}, grams, content)
            del feats
            on_tile(1, k, plan.count)
        terms: dict[str, float] = {}
        weights: dict[str, torch.Tensor] = {}

        def finish_pass_1(feats: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
            # The largest tile's forward pass ends pass 1 and begins pass 2: once its terms are in, G is whole,
            # and the same forward pass is backpropagated, which saves that tile's forward pass per evaluation.
            self._accumulate(last, {b: _float(v[0]) for b, v in feats.items()}, grams, content)
            for b in grams:
                s = style_scale(plan.shapes[b][1:]) * obj.ratio * obj.style_weights[b]
                value, weights[b] = style_value_and_weight(grams[b], self.targets, b, s)
                terms[f"style:{b}"] = float(value)
            terms.update({f"content:{b}": term for b, term in content.items()})
            on_tile(1, plan.count, plan.count)
            return self._feature_grads(last, feats, weights)

        # Pass 2: each tile's interior feature gradients back to its input, the largest tile first.
        grad: np.ndarray | None = None
        for k, tile in enumerate([last, *first], 1):
            _terms, _value, tile_grad = engine.vjp(
                tile.crop(image), self.blobs,
                finish_pass_1 if k == 1 else functools.partial(self._feature_grads, tile, weights=weights))
            if grad is None:  # the engine's dtype: float32, or float64 for gradient checks
                grad = np.zeros(image.shape, tile_grad.dtype)
            grad[:, tile.rows.start:tile.rows.end, tile.cols.start:tile.cols.end] += tile_grad
            del tile_grad
            on_tile(2, k, plan.count)
        assert grad is not None
        tv = 0.0
        if obj.tv_weight:
            x = torch.tensor(image, dtype=torch.float32, requires_grad=True)
            term = obj.tv_weight * tv_loss_torch(x)
            grad += torch.autograd.grad(term, x)[0].numpy()
            tv = float(term.detach())
        return Evaluation.of(terms, tv, grad)

    def _accumulate(self, tile: Tile, feats: dict[str, torch.Tensor], grams: dict[str, torch.Tensor],
                    content: dict[str, float]) -> None:
        """Add a tile's interior positions (C x h x w tensors) to the Gram matrices and the content terms."""
        obj, plan = self.objective, self.plan
        for b in grams:
            (lr, lc), _ = plan.interior(tile, b)
            f = feats[b][:, lr, lc].reshape(feats[b].shape[0], -1)
            grams[b] += torch.mm(f, f.t()).double()  # one product per tile in the engine's dtype
        for b, w in obj.content_weights.items():
            (lr, lc), (gr, gc) = plan.interior(tile, b)
            diff = feats[b][:, lr, lc].double() - torch.from_numpy(obj.content_targets[b][:, gr, gc]).double()
            content[b] += 0.5 * w * float(torch.vdot(diff.flatten(), diff.flatten()))

    def _feature_grads(self, tile: Tile, feats: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
                       ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The gradients of the tile's interior positions, zero elsewhere (what `Engine.vjp` injects)."""
        obj, plan = self.objective, self.plan
        grads: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for b in self.blobs:
                f = feats[b].detach()
                (lr, lc), (gr, gc) = plan.interior(tile, b)
                fi = f[0, :, lr, lc].to(torch.promote_types(f.dtype, torch.float32))  # autocast's bf16 in fp32
                g = torch.zeros_like(fi)
                if b in weights:
                    g += (weights[b].to(f.device, fi.dtype) @ fi.reshape(len(fi), -1)).reshape(fi.shape)
                if b in obj.content_weights:
                    target = torch.from_numpy(np.ascontiguousarray(obj.content_targets[b][:, gr, gc]))
                    g += obj.content_weights[b] * (fi - target.to(f.device, fi.dtype))
                grads[b] = torch.zeros_like(f)
                grads[b][0, :, lr, lc] = g.to(f.dtype)
        return {}, grads


def _float(f: torch.Tensor) -> torch.Tensor:
    """A blob's values as Engine.features gives them: on the CPU, half-precision (autocast) values in float32."""
    return f.detach().to("cpu", torch.promote_types(f.dtype, torch.float32))
