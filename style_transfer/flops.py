"""Floating-point work of one objective evaluation, counted from the net definition (the run's cost model in
plan.py, the benchmarks' floor in bench/flops.py).

One evaluation is a forward pass to the deepest used blob, the losses, and the gradient with respect to the input
image only. Its matrix work is:

- every convolution's forward multiply-adds: N * C_out * H_out * W_out * (C_in / group) * k_h * k_w;
- the same count again for the gradient with respect to each convolution's input (a transposed convolution), for
  every convolution that lies between the image and a loss blob (no weight or bias gradients);
- for each style layer, the Gram matrix F F^T (C^2 * HW multiply-adds) and its backward 4 (G - A) F (the same again).

FLOPs are 2 per multiply-add. Element-wise layers, pooling and LRN are memory-bound and left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from style_transfer.caffe_model.net import Net, conv_geometry, infer_shapes, truncate


@dataclass
class LayerWork:
    name: str
    kind: str  # "conv", "fc" or "gram"
    forward_macs: int
    backward_macs: int  # input-gradient only


@dataclass
class Work:
    layers: list[LayerWork] = field(default_factory=list)

    @property
    def conv_forward_macs(self) -> int:
        return sum(w.forward_macs for w in self.layers if w.kind == "conv")

    @property
    def conv_backward_macs(self) -> int:
        return sum(w.backward_macs for w in self.layers if w.kind == "conv")

    @property
    def gram_macs(self) -> int:
        return sum(w.forward_macs + w.backward_macs for w in self.layers if w.kind == "gram")

    @property
    def forward_macs(self) -> int:
        """Every counted layer's forward work (convolutions and fully connected layers; no Gram matrices)."""
        return sum(w.forward_macs for w in self.layers if w.kind != "gram")

    @property
    def conv_flops(self) -> int:
        """The issue's floor work: convolution forward and input-gradient backward."""
        return 2 * (self.conv_forward_macs + self.conv_backward_macs)

    @property
    def total_flops(self) -> int:
        """Convolution work plus the Gram matrices of the style layers, forward and backward."""
        return self.conv_flops + 2 * self.gram_macs


def count(net: Net, height: int, width: int, style_layers: Iterable[str] = (),
          loss_blobs: Iterable[str] | None = None, pooling: str | None = None) -> Work:
    """The work of one evaluation at an input of `height` x `width`.

    `loss_blobs` are the blobs the objective reads (style and content layers); by default every blob the net makes.
    The net is cut after the deepest of them first, as the engines do. A convolution gets an input-gradient count
    when its input depends on the image and its output reaches a loss blob.
    """
    style = list(style_layers)
    wanted = None if loss_blobs is None else [*loss_blobs, *style]
    if wanted is not None:
        net = truncate(net, wanted)
    shapes = infer_shapes(net, (1, 3, height, width), pooling)
    # Blob names are reused by in-place layers, so data flow is tracked per layer, not per name.
    depends_on_image: list[bool] = []
    writer: dict[str, int] = {}
    readers_of: list[list[int]] = [[] for _ in net.layers]
    for i, layer in enumerate(net.layers):
        sources = [writer[b] for b in layer.bottoms if b in writer]
        for s in sources:
            readers_of[s].append(i)
        depends_on_image.append(any(b == net.input_name and b not in writer for b in layer.bottoms)
                                or any(depends_on_image[s] for s in sources))
        for top in layer.tops:
            writer[top] = i
    # A layer feeds a loss when it writes the final value of a loss blob or feeds a layer that does.
    targets = set(wanted) if wanted is not None else set(writer)
    feeds_loss = [False] * len(net.layers)
    for i in reversed(range(len(net.layers))):
        final = any(writer.get(t) == i and t in targets for t in net.layers[i].tops)
        feeds_loss[i] = final or any(feeds_loss[r] for r in readers_of[i])

    work = Work()
    for i, layer in enumerate(net.layers):
        if layer.type not in ("Convolution", "InnerProduct"):
            continue
        bottom, out = shapes[layer.bottoms[0]], shapes[layer.tops[0]]
        if layer.type == "Convolution":
            g = conv_geometry(layer)
            kind, macs = "conv", math.prod(out) * (bottom[1] // g.group) * g.kernel[0] * g.kernel[1]
        else:
            kind, macs = "fc", math.prod(bottom) * out[1]
        backward = macs if depends_on_image[i] and feeds_loss[i] else 0
        work.layers.append(LayerWork(layer.name, kind, macs, backward))
    for blob in style:
        _n, c, h, w = shapes[blob]
        macs = c * c * h * w
        work.layers.append(LayerWork(blob, "gram", macs, macs))
    return work
