"""From a prototxt and a caffemodel to a checked net holding only what the chosen blobs need."""

from __future__ import annotations

import os
from collections.abc import Iterable

from style_transfer.caffe_model.net import Net, attach_weights, infer_shapes, truncate
from style_transfer.caffe_model.reader import CaffeModelWeights, read_caffemodel, read_prototxt
from style_transfer.errors import ModelError

# The size at which weight shapes are checked when the prototxt gives none; it only has to be big enough.
_CHECK_SIZE = 224


def check_input_shape(net: Net) -> tuple[int, int, int, int]:
    """The input size weight shapes are checked at: the declared one, but at least the check size."""
    _n, _c, h, w = check_input_shape_exact(net)
    return 1, 3, max(h, _CHECK_SIZE), max(w, _CHECK_SIZE)


def load_net(prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str], blobs: Iterable[str],
             pooling: str | None = None) -> Net:
    """Parse both files, cut the net after the deepest of `blobs`, and attach the caffemodel's weights by name."""
    net = truncate(read_prototxt(prototxt), blobs)
    shape = check_input_shape(net)
    infer_shapes(net, shape, pooling)
    weights = read_caffemodel(caffemodel)
    return attach_weights(net, weights, shape, pooling)


def check_caffemodel(prototxt: str | os.PathLike[str], weights: CaffeModelWeights) -> list[str]:
    """Check that every learned layer of the whole prototxt (fc layers included) is in `weights` with the right
    shapes, as a download must be before it counts as good; returns the checked layer names."""
    net = read_prototxt(prototxt)
    checked = attach_weights(net, weights, check_input_shape_exact(net))
    return list(checked.weights)


def check_input_shape_exact(net: Net) -> tuple[int, int, int, int]:
    """The declared input size, which fc layers need; the generic check size when the prototxt declares none."""
    _n, channels, h, w = net.input_shape or (1, 3, _CHECK_SIZE, _CHECK_SIZE)
    if channels != 3:
        raise ModelError(f"the net's input {net.input_name!r} has {channels} channels; style transfer needs a "
                         "3-channel (BGR) input")
    return 1, 3, h, w
