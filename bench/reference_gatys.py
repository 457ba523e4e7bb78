"""An independent reference run of the same objective, for checking `style.py`'s final loss.

It shares no code with the tool's engine, losses, preprocessing or optimiser loop: VGG16 is written out here layer by
layer, the images are prepared with Pillow directly, the loss and scipy's L-BFGS-B call are spelled out again. Only
the caffemodel is read with the project's protobuf schema (weights are facts; the reader is tested against Caffe).
`Reference` is also the time-to-quality baseline (bench/time_to_quality.py): a straightforward PyTorch + scipy
implementation of the same objective, given the same preprocessed images as the tool.

    python bench/reference_gatys.py --style S --content C --weights vgg16.caffemodel -l 256 -n 100 --pooling max
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from style_transfer.caffe_model import caffe_schema_pb2 as pb

MEAN = np.array([104.00699, 116.66877, 122.67891])
VGG16 = [["conv1_1", "conv1_2"], ["conv2_1", "conv2_2"], ["conv3_1", "conv3_2", "conv3_3"],
         ["conv4_1", "conv4_2", "conv4_3"], ["conv5_1", "conv5_2", "conv5_3"]]
STYLE = {"conv1_1": 0.2, "conv2_1": 0.2, "conv3_1": 0.2, "conv4_1": 0.2, "conv5_1": 0.2}
CONTENT = {"conv4_2": 1.0}


def load_weights(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    net = pb.NetParameter()
    net.ParseFromString(Path(path).read_bytes())
    out = {}
    for layer in list(net.layers) + list(net.layer):
        if layer.name.startswith("conv") and len(layer.blobs) == 2:
            w, b = layer.blobs
            wshape = tuple(w.shape.dim) if w.HasField("shape") else (w.num, w.channels, w.height, w.width)
            out[layer.name] = (torch.tensor(np.array(w.data, np.float32).reshape(wshape)),
                               torch.tensor(np.array(b.data, np.float32)))
    return out


def vgg_features(x: torch.Tensor, weights: dict, pooling: str, wanted: set[str]) -> dict[str, torch.Tensor]:
    feats = {}
    for block, names in enumerate(VGG16):
        for name in names:
            w, b = weights[name]
            x = F.relu(F.conv2d(x, w, b, padding=1))
            if name in wanted:
                feats[name] = x[0]
            if wanted <= feats.keys():
                return feats
        x = F.max_pool2d(x, 2, 2, ceil_mode=True) if pooling == "max" else F.avg_pool2d(x, 2, 2, ceil_mode=True)
        del block
    return feats


def prepare(path: str, long_side: int) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    scale = long_side / max(img.size)
    img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.Resampling.LANCZOS)
    arr = np.asarray(img, np.float64)[:, :, ::-1] - MEAN
    return np.ascontiguousarray(arr.transpose(2, 0, 1), np.float32)


class Reference:
    """The objective of one content and one style image (each 3 x H x W, BGR, mean subtracted), evaluated with plain
    autograd through the net above: `fun` is what scipy calls, `score` the objective alone."""

    def __init__(self, weights: str | Path, content: np.ndarray, style: np.ndarray, pooling: str = "avg",
                 ratio: float = 1e4) -> None:
        self.weights = load_weights(str(weights))
        self.pooling, self.ratio = pooling, ratio
        self.shape = content.shape
        with torch.no_grad():
            sf = vgg_features(torch.from_numpy(np.ascontiguousarray(style, np.float32))[None], self.weights,
                              pooling, set(STYLE))
            self.targets = {k: (lambda f: f @ f.T)(v.reshape(v.shape[0], -1)) for k, v in sf.items()}
            self.content = vgg_features(torch.from_numpy(np.ascontiguousarray(content, np.float32))[None],
                                        self.weights, pooling, set(CONTENT))
        self.evaluations = 0

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        feats = vgg_features(x[None], self.weights, self.pooling, set(STYLE) | set(CONTENT))
        loss = torch.zeros(())
        for k, w in STYLE.items():
            f = feats[k].reshape(feats[k].shape[0], -1)
            c, n = f.shape
            loss = loss + self.ratio * w * ((f @ f.T - self.targets[k]) ** 2).sum() / (4.0 * c * c * n * n)
        for k, w in CONTENT.items():
            loss = loss + w * 0.5 * ((feats[k] - self.content[k]) ** 2).sum()
        return loss

    def fun(self, xflat: np.ndarray) -> tuple[float, np.ndarray]:
        self.evaluations += 1
        with torch.enable_grad():
            x = torch.tensor(np.asarray(xflat).reshape(self.shape), dtype=torch.float32, requires_grad=True)
            loss = self._loss(x)
            loss.backward()
        assert x.grad is not None
        return float(loss.detach()), x.grad.numpy().astype(np.float64).ravel()

    def score(self, image: np.ndarray) -> float:
        """The objective at an image (3 x H x W), in float32."""
        with torch.no_grad():
            return float(self._loss(torch.tensor(np.asarray(image).reshape(self.shape), dtype=torch.float32)))

    def minimize(self, x0: np.ndarray, iterations: int, maxcor: int = 8,
                 fun: Callable[[np.ndarray], tuple[float, np.ndarray]] | None = None,
                 callback: Callable[[Any], None] | None = None) -> Any:
        """scipy's L-BFGS-B from x0 within the pixel range, `iterations` iterations, no tolerance stops. `fun`
        replaces self.fun (a harness wraps it to time it)."""
        shape = self.shape
        lo = np.broadcast_to(-MEAN[:, None, None], shape).ravel()
        hi = np.broadcast_to(255 - MEAN[:, None, None], shape).ravel()
        return minimize(fun or self.fun, np.clip(x0.astype(np.float64).ravel(), lo, hi), jac=True,
                        method="L-BFGS-B", bounds=list(zip(lo, hi, strict=True)), callback=callback,
                        options={"maxiter": iterations, "maxcor": maxcor, "ftol": 0.0, "gtol": 0.0})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--style", required=True)
    ap.add_argument("--content", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("-l", type=int, default=256)
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("-r", type=float, default=1e4)
    ap.add_argument("--pooling", default="max")
    ap.add_argument("--maxcor", type=int, default=8)
    args = ap.parse_args()
    content = prepare(args.content, args.l)
    ref = Reference(args.weights, content, prepare(args.style, round(args.l * 1.2)), args.pooling, args.r)
    t = time.perf_counter()
    res = ref.minimize(content, args.n, args.maxcor)
    seconds = time.perf_counter() - t
    evals = ref.evaluations
    final = ref.score(res.x)
    print(json.dumps({"loss": final, "iterations": int(res.nit), "evaluations": evals, "seconds": seconds,
                      "seconds_per_evaluation": seconds / evals, "message": str(res.message)}))


if __name__ == "__main__":
    main()
