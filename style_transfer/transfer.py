"""The library's front door: a model loaded once, then any number of stylizations as iteration generators."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from style_transfer import images
from style_transfer.caffe_model.loader import load_net
from style_transfer.caffe_model.registry import get_model
from style_transfer.colors import COLOR_MATCH_MODES, match_colors
from style_transfer.engines import Evaluation, create_engine
from style_transfer.errors import ImageError, ModelError, StyleTransferError
from style_transfer.initial import mixed, pink_noise
from style_transfer.losses import Objective, gram_numpy
from style_transfer.optimize import LBFGSB, Result, Step


def parse_layer_weights(spec: str | Mapping[str, float] | Sequence[str], flag: str = "layers") -> dict[str, float]:
    """`"a:0.5,b:0.5"` or `"a,b"` (equal weights summing to 1) -> {"a": 0.5, "b": 0.5}."""
    if isinstance(spec, Mapping):
        out = {str(k): float(v) for k, v in spec.items()}
    else:
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
        items = [s for s in items if s]
        if not items:
            raise StyleTransferError(f"--{flag}: no layers given")
        named: dict[str, float | None] = {}
        for item in items:
            name, sep, value = item.rpartition(":")
            if sep:
                try:
                    named[name] = float(value)
                    continue
                except ValueError:
                    pass
            named[item] = None
        given = [v for v in named.values() if v is not None]
        if given and len(given) != len(named):
            raise StyleTransferError(f"--{flag}: give a weight to every layer or to none ({spec!r})")
        out = {k: (v if v is not None else 1.0 / len(named)) for k, v in named.items()}
    for name, weight in out.items():
        if not np.isfinite(weight) or weight < 0:
            raise StyleTransferError(f"--{flag}: weight of {name!r} must be a finite number >= 0, got {weight}")
    return out


def scale_plan(length: int, scales: int, min_length: int | None, iterations: int) -> list[tuple[int, int]]:
    """(long side, iterations) per scale, smallest first.

    Sizes grow geometrically from `min_length` (default: half of `length` per step down, at least 64 px) to
    `length`. Iterations are split in proportion to 1/size: a coarse iteration costs a fraction of a fine one and
    moves the image further, so coarse scales get more of them. `scales == 1` is the original single-scale run.
    """
    if scales < 1:
        raise StyleTransferError(f"--scales must be at least 1, got {scales}")
    if scales == 1:
        return [(length, iterations)]
    if iterations < scales:
        raise StyleTransferError(f"-n/--num-iters {iterations} is fewer than --scales {scales}: each scale needs "
                                 "at least one iteration")
    smallest = min_length if min_length is not None else max(64, length >> (scales - 1))
    if not images.MIN_SIDE <= smallest <= length:
        raise StyleTransferError(f"--min-length must be between {images.MIN_SIDE} and --length {length}, "
                                 f"got {smallest}")
    sizes = [round(smallest * (length / smallest) ** (i / (scales - 1))) for i in range(scales)]
    shares = np.array([1.0 / s for s in sizes])
    counts = np.maximum(1, np.floor(iterations * shares / shares.sum()).astype(int))
    counts[0] += iterations - int(counts.sum())  # rounding leftovers go to the cheapest scale
    return list(zip(sizes, (int(c) for c in counts), strict=True))


@dataclass
class Stylization:
    """One run: iterate `steps()` (each L-BFGS-B iteration of every scale), then read `result`."""

    transfer: StyleTransfer
    content: np.ndarray
    styles: list[np.ndarray]
    blend: np.ndarray
    plan: list[tuple[int, int]]
    init: str | float | np.ndarray
    seed: int | None
    ratio: float
    style_scale: float
    lbfgs_memory: int
    tv_weight: float
    color_match: str
    notices: list[str] = field(default_factory=list)
    result: Result = field(default_factory=Result)
    evaluations: int = 0

    def __post_init__(self) -> None:
        last = images.resize_long_side(self.content, self.plan[-1][0])
        self.height, self.width = last.shape[:2]
        self.iterations = sum(n for _, n in self.plan)
        # Check every scale's size before any work, so a bad size fails at once.
        for index, (length, _) in enumerate(self.plan):
            try:
                images.resize_long_side(self.content, length)
                for style in self.styles:
                    images.resize_long_side(style, round(length * self.style_scale))
            except ImageError as exc:
                if index == len(self.plan) - 1:
                    raise
                raise StyleTransferError(f"scale {index + 1} of {len(self.plan)} is too small: {exc}; "
                                         "raise --min-length or use fewer --scales") from None

    def steps(self) -> Iterator[Step]:
        x: np.ndarray | None = None
        done = 0
        for index, (length, iters) in enumerate(self.plan):
            content = images.resize_long_side(self.content, length)
            h, w = content.shape[:2]
            self._set_objective(content, length)
            if x is None:
                start = self.transfer.initial_image(self.init, content, self.styles, self.blend, self.seed)
            else:
                start = images.resize_to(images.deprocess(x), h, w)
            lower, upper = images.pixel_bounds(h, w)
            optimizer = LBFGSB(self.evaluate, images.preprocess(start), lower, upper, iters, self.lbfgs_memory)
            last: Step | None = None
            for step in optimizer.steps():
                last = replace(step, iteration=done + step.iteration, scale=index,
                               evaluations=self.evaluations)
                yield last
            res = optimizer.result
            done = last.iteration if last is not None else done
            x = res.image if res.image is not None else (last.image if last is not None else images.preprocess(start))
            self.result = Result(success=res.success, message=res.message, iterations=done,
                                 evaluations=self.evaluations,
                                 stopped_early=self.result.stopped_early or res.stopped_early, image=x)

    def evaluate(self, image: np.ndarray) -> Evaluation:
        self.evaluations += 1
        return self.transfer.engine.evaluate(image)

    def _set_objective(self, content: np.ndarray, length: int) -> None:
        st = self.transfer
        grams = []
        for style in self.styles:
            resized = images.resize_long_side(style, round(length * self.style_scale))
            grams.append(st.style_grams(match_colors(resized, content, self.color_match)))
        content_feats = st.engine.features(images.preprocess(content), list(st.content_weights))
        st.engine.set_objective(Objective(
            content_weights=st.content_weights, style_weights=st.style_weights, ratio=self.ratio,
            content_targets=content_feats,
            style_targets={layer: np.stack([g[layer] for g in grams]) for layer in st.style_weights},
            style_blend=self.blend, tv_weight=self.tv_weight))

    @staticmethod
    def to_rgb(x: np.ndarray) -> np.ndarray:
        return images.deprocess(x)

    def report(self, image: np.ndarray, evaluation: Evaluation, seconds: float, setup_seconds: float
               ) -> dict[str, Any]:
        """The run's numbers for a JSON report (the CLI and batch jobs add their own fields)."""
        return {
            "device": self.transfer.engine.device,
            "precision": self.transfer.engine.precision,
            "width": int(image.shape[2]),
            "height": int(image.shape[1]),
            "evaluations": self.evaluations,
            "loss": evaluation.loss,
            "style_loss": evaluation.style_loss,
            "content_loss": evaluation.content_loss,
            "tv_loss": evaluation.tv_loss,
            "layers": evaluation.layers,
            "seconds": seconds,
            "setup_seconds": setup_seconds,
            "seconds_per_evaluation": seconds / self.evaluations if self.evaluations else None,
            "scales": [{"length": length, "iterations": n} for length, n in self.plan],
        }


class StyleTransfer:
    """A Caffe net on an engine, with the layers and weights of the style and content terms."""

    def __init__(self, model: str = "vgg16", *, prototxt: str | os.PathLike[str] | None = None,
                 weights: str | os.PathLike[str] | None = None, models_dir: str | os.PathLike[str] | None = None,
                 style_layers: str | Mapping[str, float] | None = None,
                 content_layers: str | Mapping[str, float] | None = None, pooling: str = "avg",
                 engine: str = "torch", gpu: int = 0, verbose: bool = False,
                 download_missing: bool = False, precision: str = "fp32") -> None:
        if pooling not in ("avg", "max"):
            raise StyleTransferError(f"--pooling must be avg or max, got {pooling!r}")
        self.notices: list[str] = []
        if prototxt is None:
            info = get_model(model)
            prototxt_path = info.prototxt
            if weights:
                weights_path = Path(weights)
            else:
                from style_transfer.download import ensure_model

                weights_path = ensure_model(model, models_dir, download_missing)
            default_style, default_content = info.style_layers, info.content_layers
        else:
            prototxt_path = Path(prototxt)
            if weights is None:
                raise ModelError("--prototxt needs --weights (the caffemodel for that net)")
            weights_path = Path(weights)
            if style_layers is None or content_layers is None:
                raise ModelError("--prototxt needs --style-layers and --content-layers (which blobs to use)")
            default_style, default_content = {}, {}
        self.model = model if prototxt is None else Path(prototxt).stem
        self.style_weights = parse_layer_weights(style_layers, "style-layers") if style_layers is not None \
            else dict(default_style)
        self.content_weights = parse_layer_weights(content_layers, "content-layers") \
            if content_layers is not None else dict(default_content)
        blobs = list(dict.fromkeys([*self.style_weights, *self.content_weights]))
        self.net = load_net(prototxt_path, weights_path, blobs, pooling)
        self.pooling = pooling
        self.engine, notice = create_engine(engine, self.net, pooling, gpu, verbose, precision)
        if notice:
            self.notices.append(notice)

    def style_grams(self, style: np.ndarray) -> dict[str, np.ndarray]:
        feats = self.engine.features(images.preprocess(style), list(self.style_weights))
        return {k: gram_numpy(v) for k, v in feats.items()}

    def stylize(self, content: np.ndarray, styles: Sequence[np.ndarray], *,
                style_blend: Sequence[float] | None = None, ratio: float = 1e4, iterations: int = 512,
                length: int = 512, style_scale: float = 1.2, init: str | float | np.ndarray = "content",
                seed: int | None = None, lbfgs_memory: int = 8, tv_weight: float = 0.0, scales: int = 1,
                min_length: int | None = None, color_match: str = "none") -> Stylization:
        """Prepare a run on RGB images (H x W x 3 in [0, 1]); the work happens while iterating its steps."""
        if not styles:
            raise StyleTransferError("at least one style image is needed")
        blend = np.ones(len(styles)) if style_blend is None else np.asarray(style_blend, dtype=np.float64)
        if blend.shape != (len(styles),) or not np.all(np.isfinite(blend)) or np.any(blend < 0) or blend.sum() <= 0:
            raise StyleTransferError(f"--style-weights: need {len(styles)} non-negative weights with a positive sum")
        blend = blend / blend.sum()
        for name, value in (("ratio", ratio), ("tv-weight", tv_weight)):
            if not np.isfinite(value) or value < 0:
                raise StyleTransferError(f"--{name} must be a finite number >= 0, got {value}")
        if length < images.MIN_SIDE:
            raise StyleTransferError(f"--length must be at least {images.MIN_SIDE}, got {length}")
        if not np.isfinite(style_scale) or style_scale <= 0:
            raise StyleTransferError(f"--style-scale must be a positive number, got {style_scale}")
        if iterations < 1:
            raise StyleTransferError(f"--num-iters must be at least 1, got {iterations}")
        if lbfgs_memory < 1:
            raise StyleTransferError(f"--lbfgs-memory must be at least 1, got {lbfgs_memory}")
        if color_match not in COLOR_MATCH_MODES:
            raise StyleTransferError(f"--color-match must be one of {', '.join(COLOR_MATCH_MODES)}, "
                                     f"got {color_match!r}")
        if not isinstance(init, np.ndarray) and init not in ("content", "mixed"):
            try:
                float(init)
            except (TypeError, ValueError):
                raise StyleTransferError(f"--init must be content, mixed, a noise exponent or an image, "
                                         f"got {init!r}") from None
        plan = scale_plan(length, scales, min_length, iterations)
        return Stylization(self, content, list(styles), blend, plan, init, seed, float(ratio), style_scale,
                           lbfgs_memory, float(tv_weight), color_match, notices=list(self.notices))

    @staticmethod
    def initial_image(init: str | float | np.ndarray, content: np.ndarray, styles: Sequence[np.ndarray],
                      blend: np.ndarray, seed: int | None) -> np.ndarray:
        """The starting image at the content's size: content, mixed, 1/f^N noise, or a given image resized."""
        h, w = content.shape[:2]
        if isinstance(init, np.ndarray):
            return images.resize_to(init, h, w)
        if init == "content":
            return content
        if init == "mixed":
            main_style = styles[int(np.argmax(blend))]
            return mixed(content, images.resize_to(main_style, h, w))
        try:
            exponent = float(init)
        except (TypeError, ValueError):
            raise StyleTransferError(f"--init must be content, mixed, a noise exponent or an image, got {init!r}") \
                from None
        return pink_noise(h, w, exponent, np.random.default_rng(seed))
