"""Caffemodels for timing: the real VGG16 convolutions from ../shared, random weights for the other shipped nets.

Speed does not depend on weight values, except through denormal numbers, so random weights are drawn with He scaling
(std sqrt(2 / fan_in)), which keeps activations near the input's magnitude through every layer. The files go to a
cache folder outside the repository and are written once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from style_transfer.caffe_model import caffe_schema_pb2 as pb
from style_transfer.caffe_model.net import expected_param_shapes, infer_shapes
from style_transfer.caffe_model.reader import read_prototxt, read_prototxt_message
from style_transfer.caffe_model.registry import get_model

REPO = Path(__file__).resolve().parents[1]


def shared_dir(repo: Path = REPO) -> Path:
    """The shared folder of real weights and images: $STYLE_TRANSFER_SHARED, else `shared` beside the repository,
    else beside the main checkout when this is a git worktree elsewhere (whose parent has no `shared`)."""
    if os.environ.get("STYLE_TRANSFER_SHARED"):
        return Path(os.environ["STYLE_TRANSFER_SHARED"])
    beside = repo.parent / "shared"
    if beside.exists():
        return beside
    git = repo / ".git"
    if git.is_file():  # a worktree: ".git" names its folder inside the main checkout's .git/worktrees/
        text = git.read_text().strip()
        if text.startswith("gitdir:"):
            common = Path(text.split(":", 1)[1].strip()).resolve().parents[1]  # the main checkout's .git
            main_beside = common.parent.parent / "shared"
            if main_beside.exists():
                return main_beside
    return beside


SHARED = shared_dir()
SHARED_VGG16 = SHARED / "models" / "vgg16_hed.caffemodel"
CACHE = Path(os.environ.get("STYLE_TRANSFER_BENCH_CACHE", Path.home() / ".cache" / "style-transfer" / "bench"))


def random_caffemodel(model: str, seed: int = 0) -> Path:
    """A caffemodel (current layout) with random weights for every convolution of a shipped model's prototxt."""
    target = CACHE / f"{model}-random-{seed}.caffemodel"
    if target.exists():
        return target
    info = get_model(model)
    net = read_prototxt(info.prototxt)
    shapes = infer_shapes(net, (1, 3, 224, 224))
    rng = np.random.default_rng(seed)
    msg = read_prototxt_message(info.prototxt)
    by_name = {layer.name: layer for layer in net.layers}
    out = pb.NetParameter()
    out.name = msg.name
    for layer_msg in msg.layer:
        layer = by_name.get(layer_msg.name)
        # Fully connected layers are never run (the net is cut after the deepest style or content blob).
        if layer is None or layer.type != "Convolution":
            continue
        kept = out.layer.add()
        kept.CopyFrom(layer_msg)
        wanted = expected_param_shapes(layer, shapes[layer.bottoms[0]])
        fan_in = int(np.prod(wanted[0][1:]))
        arrays = [rng.standard_normal(wanted[0]) * np.sqrt(2.0 / fan_in)]
        arrays += [rng.standard_normal(s) * 0.01 for s in wanted[1:]]
        for array in arrays:
            blob = kept.blobs.add()
            blob.shape.dim.extend(array.shape)
            blob.data.extend(array.astype(np.float32).ravel().tolist())
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(out.SerializeToString())
    partial.replace(target)
    return target


def weights_for(model: str) -> tuple[Path, str]:
    """The caffemodel to time a model with, and where its weights come from ("real" or "random")."""
    if model == "vgg16" and SHARED_VGG16.exists():
        return SHARED_VGG16, "real"
    return random_caffemodel(model), "random"


if __name__ == "__main__":
    for name in ("vgg19", "vgg16", "googlenet", "caffenet"):
        path, kind = weights_for(name)
        print(name, kind, path)
