"""Floating-point work of one L-BFGS evaluation of a shipped model, as style_transfer/flops.py counts it (the
convolutions forward and input-gradient backward, the Gram matrices; see there). The benchmarks' floor is this
matrix work divided by the machine's measured sgemm throughput.

    python -m bench.flops vgg19 512 384
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from style_transfer.flops import LayerWork, Work, count

__all__ = ["LayerWork", "Work", "count", "count_model"]


def count_model(model: str, height: int, width: int, pooling: str = "avg",
                style_layers: Mapping[str, float] | None = None,
                content_layers: Mapping[str, float] | None = None) -> Work:
    """The work of one evaluation of a shipped model with its preset layers (or the ones given)."""
    from style_transfer.caffe_model.reader import read_prototxt
    from style_transfer.caffe_model.registry import get_model

    info = get_model(model)
    style = list(style_layers if style_layers is not None else info.style_layers)
    content = list(content_layers if content_layers is not None else info.content_layers)
    return count(read_prototxt(info.prototxt), height, width, style, content, pooling)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("height", type=int)
    ap.add_argument("width", type=int)
    args = ap.parse_args()
    work = count_model(args.model, args.height, args.width)
    for w in work.layers:
        print(f"{w.name:28s} {w.kind:5s} fwd {w.forward_macs / 1e9:8.3f} GMAC  bwd {w.backward_macs / 1e9:8.3f} GMAC")
    print(f"conv forward {work.conv_forward_macs / 1e9:.3f} GMAC, conv input-gradient "
          f"{work.conv_backward_macs / 1e9:.3f} GMAC, Gram fwd+bwd {work.gram_macs / 1e9:.3f} GMAC")
    print(f"conv FLOPs {work.conv_flops / 1e9:.2f} G, with Gram {work.total_flops / 1e9:.2f} G")


if __name__ == "__main__":
    main()
