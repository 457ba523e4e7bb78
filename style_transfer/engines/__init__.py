"""Engines run a Caffe net: `torch` (PyTorch, the default) and `caffe` (pycaffe, the original's engine)."""

from __future__ import annotations

from style_transfer.caffe_model.net import Net
from style_transfer.engines.base import PRECISIONS, Engine, Evaluation, Evaluator
from style_transfer.errors import EngineError

ENGINES = ("torch", "caffe")

__all__ = ["ENGINES", "PRECISIONS", "Engine", "Evaluation", "Evaluator", "create_engine", "fast_bf16"]


def create_engine(name: str, net: Net, pooling: str, gpu: int, verbose: bool = False,
                  precision: str = "fp32") -> tuple[Engine, str | None]:
    """The engine on the device the original's `-g` names, and a one-line notice about the device, if any."""
    if name == "torch":
        from style_transfer.engines.torch import TorchEngine, resolve_device

        device, notice = resolve_device(gpu)
        return TorchEngine(net, pooling, device, precision=precision), notice
    if precision != "fp32":
        raise EngineError(f"--precision {precision} needs the torch engine; the Caffe engine computes in float32")
    if name == "caffe":
        from style_transfer.engines.caffe import create_caffe_engine

        return create_caffe_engine(net, pooling, gpu, verbose)
    raise EngineError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")


def fast_bf16(device: str) -> bool:
    """Whether bf16 convolutions on `device` are fast enough for `--precision auto` to use them: CPUs with AMX tiles.
    AVX512-BF16 alone gained too little per evaluation to pay for bf16's slower progress per iteration, and GPUs are
    not measured (BENCHMARKS.md, "bf16 by default where it pays")."""
    if device != "cpu":
        return False
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence the guard; absent means no AMX
    return bool(probe is not None and probe())
