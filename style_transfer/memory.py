"""Memory: what one evaluation and a whole run need (estimates that BENCHMARKS.md checks against peak RSS), what
the machine has free, and the tiles (tiling.py) an image gets when its evaluation does not fit."""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import functools
import gc
import math
import os
from collections.abc import Sequence
from typing import Any

from style_transfer.caffe_model.net import Net, infer_shapes
from style_transfer.errors import StyleTransferError
from style_transfer.tiling import TilePlan, geometry, plan_tiles

GB = 1024**3


# Peak bytes of one evaluation per byte of the blobs' float32 values: the activations autograd keeps, the gradients
# flowing back beside them, pooling indices and the allocator's slack. An estimate; BENCHMARKS.md checks it.
ACTIVATION_FACTOR = 5.0


def evaluation_bytes(net: Net, pooling: str | None, height: int, width: int) -> int:
    """Estimated peak memory of one evaluation of an image of this size."""
    return int(ACTIVATION_FACTOR * blob_bytes(net, pooling, height, width))


# Bytes per image value (there are 3 H W) a run keeps beside setulb's work array while it evaluates: setulb's iterate
# and the gradient handed back to it (float64 each), the bounds (two float64), their codes and setulb's integer work
# array (four int32); optimize.LBFGSB's two recent evaluations (a float32 image and gradient each); the image being
# evaluated and the gradient it returns (float32 each).
RUN_BYTES_PER_VALUE = 8 + 8 + 16 + 16 + 16 + 8
# With scipy.optimize.minimize instead (a scipy whose setulb optimize.py does not drive itself): its Python lists of
# bounds. An estimate; BENCHMARKS.md has the measurement.
MINIMIZE_BYTES_PER_VALUE = 240


def run_bytes(net: Net, height: int, width: int, lbfgs_memory: int, kept: int = 0) -> int:
    """Memory a run needs beside its evaluations: scipy's L-BFGS-B work array ((2m + 5) n doubles and its
    bookkeeping, optimize.workspace_doubles), the run's other full-size arrays (RUN_BYTES_PER_VALUE), `kept` bytes
    the caller holds for the whole run (the content targets) and the weights."""
    from style_transfer import optimize

    n = 3 * height * width
    weights = sum(a.nbytes for arrays in net.weights.values() for a in arrays)
    per_value = RUN_BYTES_PER_VALUE + (0 if optimize.SETULB is not None else MINIMIZE_BYTES_PER_VALUE)
    return 8 * optimize.workspace_doubles(n, lbfgs_memory) + per_value * n + kept + weights


def blob_bytes(net: Net, pooling: str | None, height: int, width: int, blobs: Sequence[str] | None = None) -> int:
    """Float32 bytes of these blobs (all by default) at this image size, e.g. the content targets a run keeps."""
    shapes = infer_shapes(net, (1, 3, height, width), pooling)
    return 4 * sum(math.prod(shapes[b]) for b in (shapes if blobs is None else blobs))


def resident_bytes() -> int:
    """This process's resident memory now (the net's weights, the libraries, the run so far); 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


@functools.cache
def _libc() -> Any:
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def release_free_memory() -> None:
    """Hand the memory that Python and torch have freed back to the system (glibc's malloc_trim), so that the
    resident size and MemAvailable say what the next scale can have; a no-op where glibc is absent. The cyclic
    collection takes most of its time (about 0.1 s with torch loaded), so it runs between scales only."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def available_bytes(device: str) -> int:
    """Memory free for a run: free device memory on CUDA, MemAvailable on the CPU."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: no limit but the cap


def choose_tiles(net: Net, pooling: str | None, height: int, width: int, blobs: Sequence[str], budget: int,
                 fixed: int = 0, what: str = "") -> TilePlan | None:
    """None when one evaluation of the whole image fits in `budget` bytes beside `fixed` ones; otherwise the tiles
    with the largest square cores that fit. A budget too small for the smallest tile is an error naming the
    smallest workable budget (`what` names where the budget came from, e.g. "--max-memory 2")."""
    room = budget - fixed
    if evaluation_bytes(net, pooling, height, width) <= room:
        return None
    _reach, align, ((lo_h, hi_h), (lo_w, hi_w)) = geometry(net, pooling, blobs)

    def tile_bytes(k: int) -> int:
        return evaluation_bytes(net, pooling, min(height, k * align[0] + lo_h + hi_h),
                                min(width, k * align[1] + lo_w + hi_w))

    if tile_bytes(1) > room:
        need = math.ceil((fixed + tile_bytes(1)) / GB * 100) / 100
        raise StyleTransferError(f"{what or 'the memory available'} is too small for a {width}x{height} image with "
                                 f"this net: even the smallest tile needs {need:g} GB in all; give --max-memory "
                                 f"{need:g} or more")
    # The largest k whose tile fits (tile_bytes grows with k).
    k = bisect.bisect_right(range(1, max(-(-height // align[0]), -(-width // align[1])) + 1), room, key=tile_bytes)
    return plan_tiles(net, pooling, height, width, blobs, (k * align[0], k * align[1]))
