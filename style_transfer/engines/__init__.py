"""Engines run a Caffe net: `torch` (PyTorch, the default) and `caffe` (pycaffe, the original's engine)."""

from __future__ import annotations

from style_transfer.caffe_model.net import Net
from style_transfer.engines.base import PRECISIONS, Engine, Evaluation, Evaluator
from style_transfer.errors import EngineError

ENGINES = ("torch", "caffe")

__all__ = ["ENGINES", "PRECISIONS", "Engine", "Evaluation", "Evaluator", "create_engine"]


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
