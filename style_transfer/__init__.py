"""Neural artistic style transfer (Gatys, Ecker & Bethge) on Caffe nets."""

from style_transfer.errors import EngineError, ImageError, ModelError, StyleTransferError

__all__ = ["EngineError", "ImageError", "ModelError", "StyleTransferError"]
__version__ = "0.1.0"  # the only place the version is written (pyproject.toml reads it)
