"""The setting every benchmark shares: a model on an engine with the preset objective of one content and one style.

The objective is built here from the library's pieces (loader, engine, Gram matrices, Objective) rather than through
`StyleTransfer`, so the timings measure the engine and the optimiser and stay valid while the pipeline evolves.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.weights import REPO, SHARED, weights_for
from style_transfer import images
from style_transfer.caffe_model.loader import load_net
from style_transfer.caffe_model.net import Net
from style_transfer.caffe_model.registry import get_model
from style_transfer.engines import Engine, Evaluation, create_engine
from style_transfer.losses import Objective, gram_numpy

SHARED_IMAGES = SHARED / "images"
CONTENT = SHARED_IMAGES / "content" / "tubingen.jpg"
STYLE = SHARED_IMAGES / "style" / "starry_night.jpg"


@dataclass
class Case:
    model: str
    weights_kind: str  # "real" or "random"
    engine: Engine
    objective: Objective
    x0: np.ndarray  # preprocessed content image, float32 3 x H x W
    lower: np.ndarray
    upper: np.ndarray
    evaluate: Callable[[np.ndarray], Evaluation]  # the objective bound to the engine

    @property
    def height(self) -> int:
        return int(self.x0.shape[1])

    @property
    def width(self) -> int:
        return int(self.x0.shape[2])


def load_rgb(path: Path, fallback_seed: int) -> np.ndarray:
    """An RGB image in [0, 1]; a smooth random one when ../shared is absent, so the harness runs anywhere."""
    if path.exists():
        return images.load_image(path)
    rng = np.random.default_rng(fallback_seed)
    coarse = rng.random((24, 32, 3))
    return images.resize_to(coarse, 480, 640)


def build_net(model: str, pooling: str = "avg") -> tuple[Net, str]:
    info = get_model(model)
    weights, kind = weights_for(model)
    blobs = list(dict.fromkeys([*info.style_layers, *info.content_layers]))
    return load_net(info.prototxt, weights, blobs, pooling), kind


def build_case(model: str, engine_name: str, length: int, *, pooling: str = "avg", gpu: int = -1,
               ratio: float = 1e4, style_scale: float = 1.2, engine: Engine | None = None,
               content_path: Path = CONTENT, style_path: Path = STYLE) -> Case:
    """The preset objective of `model` for Tübingen in the style of Starry Night (or the given pair) at `length` px
    (long side)."""
    info = get_model(model)
    if engine is None:
        net, kind = build_net(model, pooling)
        engine, _notice = create_engine(engine_name, net, pooling, gpu)
    else:
        kind = weights_for(model)[1]
    content = images.resize_long_side(load_rgb(content_path, 1), length)
    style = images.resize_long_side(load_rgb(style_path, 2), round(length * style_scale))
    style_feats = engine.features(images.preprocess(style), list(info.style_layers))
    content_x = images.preprocess(content)
    content_feats = engine.features(content_x, list(info.content_layers))
    objective = Objective(content_weights=dict(info.content_layers), style_weights=dict(info.style_layers),
                          ratio=ratio, content_targets=content_feats,
                          style_targets={k: gram_numpy(v)[None] for k, v in style_feats.items()},
                          style_blend=np.ones(1))
    if hasattr(engine, "bind"):
        evaluate = engine.bind(objective)
    else:  # the torch engine as an older revision wrote it (bench/worker.py's "torch-rev:"), before bind
        engine.set_objective(objective)  # type: ignore[attr-defined]
        evaluate = engine.evaluate  # type: ignore[attr-defined]
    lower, upper = images.pixel_bounds(*content.shape[:2])
    return Case(model, kind, engine, objective, content_x.astype(np.float32), lower, upper, evaluate)


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")  # type: ignore[call-arg]
        blas = str(cfg["Build Dependencies"]["blas"]["name"])  # type: ignore[index]
    except Exception:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "cpu": cpu,
        "logical_cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": f"{np.__version__} ({blas})",
        "platform": platform.platform(),
        "commit": commit,
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
