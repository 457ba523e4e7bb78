"""The project's own error types: everything a user can cause ends as one of these."""


class StyleTransferError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""


class ImageError(StyleTransferError):
    """An input image cannot be read or used, or an output image cannot be written."""


class ModelError(StyleTransferError):
    """A prototxt or caffemodel is missing, malformed, or does not fit the options."""


class EngineError(StyleTransferError):
    """The chosen engine or device is unavailable."""
