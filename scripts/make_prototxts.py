"""Generate the deploy prototxts under style_transfer/models/ (package data) from compact architecture tables.

Layer and blob names must match the public caffemodels exactly, because weights
are matched to layers by name when a caffemodel is loaded:

    style_transfer/models/vgg19/deploy.prototxt      VGG_ILSVRC_19_layers.caffemodel
    style_transfer/models/vgg16/deploy.prototxt      VGG_ILSVRC_16_layers.caffemodel
    style_transfer/models/googlenet/deploy.prototxt  bvlc_googlenet.caffemodel
    style_transfer/models/caffenet/deploy.prototxt   bvlc_reference_caffenet.caffemodel
    style_transfer/models/vgg16-hed/deploy.prototxt  vgg16_hed.caffemodel (VGG16's conv layers only)

Only what inference needs is emitted: no lr_mult/decay_mult, no fillers.

Usage:
    python scripts/make_prototxts.py          # (re)write the five files
    python scripts/make_prototxts.py --check  # exit 1 if any file on disk differs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "style_transfer" / "models"
SCRIPT_NAME = "scripts/make_prototxts.py"

# Batch size of the Input layer. The public deploy files use 10; the tool reshapes
# the input blob to the image size anyway, so 1 keeps the initial allocation small.
BATCH = 1


class Bare(str):
    """A protobuf enum value, emitted without quotes (e.g. MAX, AVE)."""

    __slots__ = ()


Scalar = int | float | str | Bare
Fields = list[tuple[str, "Scalar | Fields"]]


@dataclass(frozen=True)
class Layer:
    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: tuple[tuple[str, Fields], ...] = ()


# --------------------------------------------------------------------------- #
# Layer constructors
# --------------------------------------------------------------------------- #


def input_layer(size: int) -> Layer:
    dims: Fields = [("dim", d) for d in (BATCH, 3, size, size)]
    return Layer("data", "Input", (), ("data",), (("input_param", [("shape", dims)]),))


def conv(
    name: str,
    bottom: str,
    num_output: int,
    kernel: int,
    *,
    stride: int = 1,
    pad: int = 0,
    group: int = 1,
) -> Layer:
    fields: Fields = [("num_output", num_output)]
    if pad:
        fields.append(("pad", pad))
    fields.append(("kernel_size", kernel))
    if stride != 1:
        fields.append(("stride", stride))
    if group != 1:
        fields.append(("group", group))
    return Layer(
        name, "Convolution", (bottom,), (name,), (("convolution_param", fields),)
    )


def relu(name: str, blob: str) -> Layer:
    return Layer(name, "ReLU", (blob,), (blob,))


def pool(
    name: str, bottom: str, method: str, kernel: int, stride: int, pad: int = 0
) -> Layer:
    fields: Fields = [
        ("pool", Bare(method)),
        ("kernel_size", kernel),
        ("stride", stride),
    ]
    if pad:
        fields.append(("pad", pad))
    return Layer(name, "Pooling", (bottom,), (name,), (("pooling_param", fields),))


def lrn(name: str, bottom: str) -> Layer:
    # Same LRN settings in CaffeNet and GoogLeNet.
    fields: Fields = [("local_size", 5), ("alpha", 0.0001), ("beta", 0.75)]
    return Layer(name, "LRN", (bottom,), (name,), (("lrn_param", fields),))


def inner_product(name: str, bottom: str, num_output: int) -> Layer:
    fields: Fields = [("num_output", num_output)]
    return Layer(
        name, "InnerProduct", (bottom,), (name,), (("inner_product_param", fields),)
    )


def dropout(name: str, blob: str, ratio: float) -> Layer:
    fields: Fields = [("dropout_ratio", ratio)]
    return Layer(name, "Dropout", (blob,), (blob,), (("dropout_param", fields),))


def concat(name: str, bottoms: Sequence[str]) -> Layer:
    return Layer(name, "Concat", tuple(bottoms), (name,))


def softmax(name: str, bottom: str) -> Layer:
    return Layer(name, "Softmax", (bottom,), (name,))


def fc_head(bottom: str) -> list[Layer]:
    """fc6-relu6-drop6-fc7-relu7-drop7-fc8-prob, shared by VGG and CaffeNet."""
    return [
        inner_product("fc6", bottom, 4096),
        relu("relu6", "fc6"),
        dropout("drop6", "fc6", 0.5),
        inner_product("fc7", "fc6", 4096),
        relu("relu7", "fc7"),
        dropout("drop7", "fc7", 0.5),
        inner_product("fc8", "fc7", 1000),
        softmax("prob", "fc8"),
    ]


# --------------------------------------------------------------------------- #
# VGG (Simonyan & Zisserman): stages of 3x3/pad 1 convs, each followed by a
# 2x2/stride 2 max pool. Entry = (num_output, number of convs in the stage).
# --------------------------------------------------------------------------- #

VGG16_STAGES: tuple[tuple[int, int], ...] = (
    (64, 2),
    (128, 2),
    (256, 3),
    (512, 3),
    (512, 3),
)
VGG19_STAGES: tuple[tuple[int, int], ...] = (
    (64, 2),
    (128, 2),
    (256, 4),
    (512, 4),
    (512, 4),
)


def vgg(stages: Sequence[tuple[int, int]], *, fc: bool = True) -> list[Layer]:
    layers = [input_layer(224)]
    blob = "data"
    for s, (channels, count) in enumerate(stages, start=1):
        for i in range(1, count + 1):
            name = f"conv{s}_{i}"
            layers.append(conv(name, blob, channels, 3, pad=1))
            layers.append(relu(f"relu{s}_{i}", name))
            blob = name
        layers.append(pool(f"pool{s}", blob, "MAX", 2, 2))
        blob = f"pool{s}"
    return layers + fc_head(blob) if fc else layers


# --------------------------------------------------------------------------- #
# CaffeNet (BVLC reference): AlexNet variant that pools before normalising.
# --------------------------------------------------------------------------- #


def caffenet() -> list[Layer]:
    return [
        input_layer(227),
        conv("conv1", "data", 96, 11, stride=4),
        relu("relu1", "conv1"),
        pool("pool1", "conv1", "MAX", 3, 2),
        lrn("norm1", "pool1"),
        conv("conv2", "norm1", 256, 5, pad=2, group=2),
        relu("relu2", "conv2"),
        pool("pool2", "conv2", "MAX", 3, 2),
        lrn("norm2", "pool2"),
        conv("conv3", "norm2", 384, 3, pad=1),
        relu("relu3", "conv3"),
        conv("conv4", "conv3", 384, 3, pad=1, group=2),
        relu("relu4", "conv4"),
        conv("conv5", "conv4", 256, 3, pad=1, group=2),
        relu("relu5", "conv5"),
        pool("pool5", "conv5", "MAX", 3, 2),
        *fc_head("pool5"),
    ]


# --------------------------------------------------------------------------- #
# GoogLeNet (BVLC replication of Szegedy et al.).
# Inception table: module -> (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
# A string entry is a 3x3/stride 2 max pool between module groups.
# --------------------------------------------------------------------------- #

InceptionSpec = tuple[str, int, int, int, int, int, int]

GOOGLENET_BODY: tuple[InceptionSpec | str, ...] = (
    ("3a", 64, 96, 128, 16, 32, 32),
    ("3b", 128, 128, 192, 32, 96, 64),
    "pool3/3x3_s2",
    ("4a", 192, 96, 208, 16, 48, 64),
    ("4b", 160, 112, 224, 24, 64, 64),
    ("4c", 128, 128, 256, 24, 64, 64),
    ("4d", 112, 144, 288, 32, 64, 64),
    ("4e", 256, 160, 320, 32, 128, 128),
    "pool4/3x3_s2",
    ("5a", 256, 160, 320, 32, 128, 128),
    ("5b", 384, 192, 384, 48, 128, 128),
)


def conv_relu(
    prefix: str, branch: str, bottom: str, num_output: int, kernel: int
) -> list[Layer]:
    name = f"{prefix}/{branch}"
    return [
        conv(name, bottom, num_output, kernel, pad=kernel // 2),
        relu(f"{prefix}/relu_{branch}", name),
    ]


def inception(spec: InceptionSpec, bottom: str) -> list[Layer]:
    tag, n1x1, n3x3r, n3x3, n5x5r, n5x5, nproj = spec
    p = f"inception_{tag}"
    return [
        *conv_relu(p, "1x1", bottom, n1x1, 1),
        *conv_relu(p, "3x3_reduce", bottom, n3x3r, 1),
        *conv_relu(p, "3x3", f"{p}/3x3_reduce", n3x3, 3),
        *conv_relu(p, "5x5_reduce", bottom, n5x5r, 1),
        *conv_relu(p, "5x5", f"{p}/5x5_reduce", n5x5, 5),
        pool(f"{p}/pool", bottom, "MAX", 3, 1, pad=1),
        *conv_relu(p, "pool_proj", f"{p}/pool", nproj, 1),
        concat(f"{p}/output", [f"{p}/1x1", f"{p}/3x3", f"{p}/5x5", f"{p}/pool_proj"]),
    ]


def googlenet() -> list[Layer]:
    layers = [
        input_layer(224),
        conv("conv1/7x7_s2", "data", 64, 7, stride=2, pad=3),
        relu("conv1/relu_7x7", "conv1/7x7_s2"),
        pool("pool1/3x3_s2", "conv1/7x7_s2", "MAX", 3, 2),
        lrn("pool1/norm1", "pool1/3x3_s2"),
        *conv_relu("conv2", "3x3_reduce", "pool1/norm1", 64, 1),
        *conv_relu("conv2", "3x3", "conv2/3x3_reduce", 192, 3),
        lrn("conv2/norm2", "conv2/3x3"),
        pool("pool2/3x3_s2", "conv2/norm2", "MAX", 3, 2),
    ]
    blob = "pool2/3x3_s2"
    for entry in GOOGLENET_BODY:
        if isinstance(entry, str):
            layers.append(pool(entry, blob, "MAX", 3, 2))
        else:
            layers.extend(inception(entry, blob))
        blob = layers[-1].tops[0]
    layers += [
        pool("pool5/7x7_s1", blob, "AVE", 7, 1),
        dropout("pool5/drop_7x7_s1", "pool5/7x7_s1", 0.4),
        inner_product("loss3/classifier", "pool5/7x7_s1", 1000),
        softmax("prob", "loss3/classifier"),
    ]
    return layers


# --------------------------------------------------------------------------- #
# Text emission
# --------------------------------------------------------------------------- #


def format_scalar(value: Scalar) -> str:
    if isinstance(value, Bare):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def emit_fields(fields: Fields, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for key, value in fields:
        if isinstance(value, list):
            out.append(f"{pad}{key} {{")
            emit_fields(value, indent + 1, out)
            out.append(f"{pad}}}")
        else:
            out.append(f"{pad}{key}: {format_scalar(value)}")


def render(net_name: str, caffemodel: str, layers: Sequence[Layer]) -> str:
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        msg = f"{net_name}: duplicate layer names"
        raise ValueError(msg)
    out = [
        f"# Generated by {SCRIPT_NAME}; do not edit by hand.",
        f"# Layer and blob names match {caffemodel}.",
        f'name: "{net_name}"',
    ]
    for layer in layers:
        fields: Fields = [("name", layer.name), ("type", layer.type)]
        fields += [("bottom", b) for b in layer.bottoms]
        fields += [("top", t) for t in layer.tops]
        fields += list(layer.params)
        out.append("layer {")
        emit_fields(fields, 1, out)
        out.append("}")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Target:
    path: str  # relative to MODELS_DIR
    net_name: str
    caffemodel: str
    build: Callable[[], list[Layer]]


TARGETS: tuple[Target, ...] = (
    Target(
        "vgg19/deploy.prototxt",
        "VGG_ILSVRC_19_layers",
        "VGG_ILSVRC_19_layers.caffemodel",
        lambda: vgg(VGG19_STAGES),
    ),
    Target(
        "vgg16/deploy.prototxt",
        "VGG_ILSVRC_16_layers",
        "VGG_ILSVRC_16_layers.caffemodel",
        lambda: vgg(VGG16_STAGES),
    ),
    Target(
        "googlenet/deploy.prototxt", "GoogleNet", "bvlc_googlenet.caffemodel", googlenet
    ),
    Target(
        "caffenet/deploy.prototxt",
        "CaffeNet",
        "bvlc_reference_caffenet.caffemodel",
        caffenet,
    ),
    # The convolution layers of VGG16 alone (through pool5): the vgg16-hed weights have no fc layers.
    Target(
        "vgg16-hed/deploy.prototxt",
        "VGG_ILSVRC_16_layers",
        "vgg16_hed.caffemodel",
        lambda: vgg(VGG16_STAGES, fc=False),
    ),
)


def generate() -> dict[Path, str]:
    return {
        MODELS_DIR / t.path: render(t.net_name, t.caffemodel, t.build())
        for t in TARGETS
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if any generated file is missing or differs",
    )
    args = parser.parse_args(argv)

    stale: list[Path] = []
    for path, text in generate().items():
        rel = path.relative_to(REPO_ROOT)
        if args.check:
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = None
            if current != text.encode("utf-8"):
                stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            print(f"wrote {rel}")

    if stale:
        for rel in stale:
            print(f"out of date: {rel} (run python {SCRIPT_NAME})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
