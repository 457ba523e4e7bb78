"""The library's front door: a model loaded once, then any number of stylizations as iteration generators."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from style_transfer import images
from style_transfer.caffe_model.loader import load_net
from style_transfer.caffe_model.registry import get_model
from style_transfer.engines import create_engine
from style_transfer.errors import ModelError, StyleTransferError
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


@dataclass
class Stylization:
    """One run: iterate `steps()` (each L-BFGS-B iteration), then read `result`; images via `to_rgb`."""

    optimizer: LBFGSB
    width: int
    height: int
    notices: list[str] = field(default_factory=list)

    def steps(self) -> Iterator[Step]:
        return self.optimizer.steps()

    @property
    def result(self) -> Result:
        return self.optimizer.result

    @staticmethod
    def to_rgb(x: np.ndarray) -> np.ndarray:
        return images.deprocess(x)


class StyleTransfer:
    """A Caffe net on an engine, with the layers and weights of the style and content terms."""

    def __init__(self, model: str = "vgg16", *, prototxt: str | os.PathLike[str] | None = None,
                 weights: str | os.PathLike[str] | None = None, models_dir: str | os.PathLike[str] | None = None,
                 style_layers: str | Mapping[str, float] | None = None,
                 content_layers: str | Mapping[str, float] | None = None, pooling: str = "avg",
                 engine: str = "torch", gpu: int = 0, verbose: bool = False) -> None:
        if pooling not in ("avg", "max"):
            raise StyleTransferError(f"--pooling must be avg or max, got {pooling!r}")
        self.notices: list[str] = []
        if prototxt is None:
            info = get_model(model)
            prototxt_path = info.prototxt
            weights_path = Path(weights) if weights else info.weights_path(models_dir)
            if not weights_path.exists():
                raise ModelError(f"model weights not found: {weights_path}; fetch them with "
                                 f"`scripts/download_models.sh {model}` (or pass --weights PATH)")
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
        self.engine, notice = create_engine(engine, self.net, pooling, gpu, verbose)
        if notice:
            self.notices.append(notice)

    def style_grams(self, style: np.ndarray) -> dict[str, np.ndarray]:
        feats = self.engine.features(images.preprocess(style), list(self.style_weights))
        return {k: gram_numpy(v) for k, v in feats.items()}

    def stylize(self, content: np.ndarray, styles: Sequence[np.ndarray], *,
                style_blend: Sequence[float] | None = None, ratio: float = 1e4, iterations: int = 512,
                length: int = 512, style_scale: float = 1.2, init: str | float | np.ndarray = "content",
                seed: int | None = None, lbfgs_memory: int = 8, tv_weight: float = 0.0) -> Stylization:
        """Prepare a run on RGB images (H x W x 3 in [0, 1]); the work happens while iterating its steps."""
        if not styles:
            raise StyleTransferError("at least one style image is needed")
        blend = np.ones(len(styles)) if style_blend is None else np.asarray(style_blend, dtype=np.float64)
        if blend.shape != (len(styles),) or not np.all(np.isfinite(blend)) or np.any(blend < 0) or blend.sum() <= 0:
            raise StyleTransferError(f"--style-weights: need {len(styles)} non-negative weights with a positive sum")
        blend = blend / blend.sum()
        for name, value, low in (("ratio", ratio, 0.0), ("tv-weight", tv_weight, 0.0)):
            if not np.isfinite(value) or value < low:
                raise StyleTransferError(f"--{name} must be a finite number >= {low:g}, got {value}")
        if length < images.MIN_SIDE:
            raise StyleTransferError(f"--length must be at least {images.MIN_SIDE}, got {length}")
        if not np.isfinite(style_scale) or style_scale <= 0:
            raise StyleTransferError(f"--style-scale must be a positive number, got {style_scale}")
        if iterations < 1:
            raise StyleTransferError(f"--num-iters must be at least 1, got {iterations}")
        if lbfgs_memory < 1:
            raise StyleTransferError(f"--lbfgs-memory must be at least 1, got {lbfgs_memory}")

        content_img = images.resize_long_side(content, length)
        h, w = content_img.shape[:2]
        grams = []
        for style in styles:
            grams.append(self.style_grams(images.resize_long_side(style, round(length * style_scale))))
        content_x = images.preprocess(content_img)
        content_feats = self.engine.features(content_x, list(self.content_weights))
        objective = Objective(
            content_weights=self.content_weights, style_weights=self.style_weights, ratio=float(ratio),
            content_targets=content_feats,
            style_targets={layer: np.stack([g[layer] for g in grams]) for layer in self.style_weights},
            style_blend=blend, tv_weight=float(tv_weight))
        self.engine.set_objective(objective)

        x0 = images.preprocess(self._initial(init, content_img, styles, blend, seed))
        lower, upper = images.pixel_bounds(h, w)
        optimizer = LBFGSB(self.engine.evaluate, x0, lower, upper, iterations, lbfgs_memory)
        return Stylization(optimizer, width=w, height=h, notices=list(self.notices))

    @staticmethod
    def _initial(init: str | float | np.ndarray, content: np.ndarray, styles: Sequence[np.ndarray],
                 blend: np.ndarray, seed: int | None) -> np.ndarray:
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
