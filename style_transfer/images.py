"""Reading, resizing, converting and writing images.

Everything the optimiser sees goes through here: files in any mode Pillow can read become RGB float32 arrays in [0, 1],
those become Caffe's mean-subtracted BGR planes, and results go back to disk without ever leaving a half-written file
behind.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import stat
import struct
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from style_transfer.errors import ImageError
from style_transfer.util import one_line, reason

# Pillow can be built without LittleCMS; colour profiles are then ignored with a notice.
try:
    from PIL import ImageCms
except ImportError:
    ImageCms = None  # type: ignore[assignment]

FloatArray = npt.NDArray[np.float32]

# Per-channel mean of the ImageNet training set, which the Caffe VGG/GoogLeNet weights expect to have been subtracted
# from 0-255 BGR input.  Read-only so that no caller can shift it for everyone by accident.
MEAN_BGR: FloatArray = np.array([104.00699, 116.66877, 122.67891], dtype=np.float32)
MEAN_BGR.setflags(write=False)

# Below this the pooling layers of a VGG-style net shrink a side to zero, and the failure would surface as an obscure
# shape error inside the engine.
MIN_SIDE: int = 16

# Pillow's own default, read before anything here touches the global; the fallback is Pillow's formula, for when other
# code has already switched the guard off.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 1024 * 1024 * 1024 // 4 // 3

# Formats that store a plain 8-bit RGB picture.  The registry alone is not enough: it also lists formats that only take
# bilevel or palette data, documents (PDF, EPS), icons that get resized, and stub handlers with no writer installed.
_RGB_WRITERS = frozenset({"AVIF", "BMP", "GIF", "JPEG", "JPEG2000", "PNG", "PPM", "QOI", "TGA", "TIFF", "WEBP"})
# These map to PPM in the registry, but the name promises bilevel, grey or float data.
_MISLEADING_EXTENSIONS = frozenset({".pbm", ".pgm", ".pfm"})
_LOSSY_WITH_QUALITY = frozenset({"AVIF", "JPEG", "WEBP"})
_COMMON_EXTENSIONS = ".jpg, .jpeg, .png, .webp, .tif, .tiff, .bmp, .gif"

# Pillow's bomb limit is a module global; held while it carries a caller's value.
_PILLOW_GLOBALS_LOCK = threading.Lock()


# ---------------------------------------------------------------------- Caffe layout


def preprocess(image: npt.NDArray[Any]) -> FloatArray:
    """Turn HxWx3 RGB in [0, 1] into 3xHxW mean-subtracted BGR on the 0-255 scale."""
    _require_rgb(image, "preprocess")
    bgr = np.asarray(image, dtype=np.float32)[:, :, ::-1] * np.float32(255.0) - MEAN_BGR
    return np.ascontiguousarray(bgr.transpose(2, 0, 1), dtype=np.float32)


def deprocess(x: npt.NDArray[Any]) -> FloatArray:
    """Inverse of :func:`preprocess`, clipped to [0, 1]: the optimiser overshoots."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"deprocess expects a 3xHxW array, got shape {x.shape}")
    bgr = (np.asarray(x, dtype=np.float32) + MEAN_BGR[:, None, None]) / np.float32(255.0)
    return np.ascontiguousarray(np.clip(bgr[::-1].transpose(1, 2, 0), 0.0, 1.0), dtype=np.float32)


def pixel_bounds(height: int, width: int) -> tuple[FloatArray, FloatArray]:
    """Box constraints for the optimiser: where 0-255 pixels land after preprocess."""
    mean = np.broadcast_to(MEAN_BGR[:, None, None], (3, height, width))
    return -mean, np.float32(255.0) - mean


def _require_rgb(image: npt.NDArray[Any], caller: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{caller} expects an HxWx3 RGB array, got shape {image.shape}")


# -------------------------------------------------------------------------- resizing


def resize_long_side(image: npt.NDArray[Any], length: int) -> FloatArray:
    """Scale so the longer side is ``length`` px, keeping the aspect ratio."""
    _require_rgb(image, "resize_long_side")
    return _resample(image, *long_side_size(image.shape[0], image.shape[1], length))


def long_side_size(height: int, width: int, length: int, what: str = "--length") -> tuple[int, int]:
    """(height, width) with the longer side ``length`` px and the aspect ratio kept; an error if a side would be
    below MIN_SIDE. ``what`` names the option the length came from in that error."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    scale = length / max(height, width)
    new_height = max(1, round(height * scale))
    new_width = max(1, round(width * scale))
    if min(new_height, new_width) < MIN_SIDE:
        raise ImageError(f"image {width}x{height} px would be {new_width}x{new_height} px at {what} {length}; each "
                         f"side must be at least {MIN_SIDE} px")
    return new_height, new_width


def resize_to(image: npt.NDArray[Any], height: int, width: int) -> FloatArray:
    """Scale to exactly ``height`` x ``width`` px, ignoring the aspect ratio."""
    _require_rgb(image, "resize_to")
    if min(height, width) < MIN_SIDE:
        old_height, old_width = image.shape[:2]
        raise ImageError(f"image {old_width}x{old_height} px cannot be resized to {width}x{height} px; each side "
                         f"must be at least {MIN_SIDE} px")
    return _resample(image, height, width)


def _resample(image: npt.NDArray[Any], height: int, width: int) -> FloatArray:
    source = np.asarray(image, dtype=np.float32)
    if source.shape[:2] == (height, width):
        return np.ascontiguousarray(source)
    out = np.empty((height, width, 3), dtype=np.float32)
    for channel in range(3):
        # Mode "F" keeps full precision through the filter; an 8-bit round trip would band smooth gradients, which the
        # optimiser would then faithfully reproduce.
        plane = Image.fromarray(np.ascontiguousarray(source[:, :, channel]))
        out[:, :, channel] = np.asarray(plane.resize((width, height), Image.Resampling.LANCZOS))
    # Lanczos lobes ring past the input range at hard edges.
    np.clip(out, 0.0, 1.0, out=out)
    return out


# --------------------------------------------------------------------------- loading


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               background: tuple[int, int, int] = (255, 255, 255), notices: list[str] | None = None,
               data: bytes | None = None) -> FloatArray:
    """Read an image file as an RGB float32 array HxWx3 in [0, 1].

    Transparency is composited onto ``background``, embedded colour profiles are converted to sRGB, EXIF rotation is
    applied and only the first frame of an animation is used. What the user may want to know about (dropped frames, an
    unusable profile, Pillow's warnings) is appended to ``notices``. Every failure is an :class:`ImageError` with a
    one-line message naming the file. ``data``, when given, is the file's content read elsewhere (see
    :func:`read_file`); ``path`` then only names it.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    if len(background) != 3 or not all(0 <= int(v) <= 255 for v in background):
        raise ValueError(f"background must be three values in 0-255, got {background!r}")
    label = os.fspath(path)
    collected: list[str] = []

    if data is not None:
        fp: IO[bytes] = io.BytesIO(data)
    else:
        with _reading(label):
            fp = open(path, "rb")  # noqa: SIM115 - closed by the with-block right below

    with fp:
        if _is_empty(fp):
            raise ImageError(f"{label} is empty (0 bytes)")
        with _pillow_guard(label, collected):
            try:
                image = _decode(fp, label, max_pixels, background, collected)
            except ImageError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageError(_bomb_message(label, None, max_pixels)) from None
            except UnidentifiedImageError:
                raise ImageError(f"{label} is not an image file that can be read (unknown or unsupported "
                                 "format)") from None
            except MemoryError:
                raise ImageError(f"not enough memory to decode {label}") from None
            except Exception as exc:
                # Decoders fed damaged files fail in many ways (OSError, ValueError, EOFError, struct.error, ...); to
                # the user they all mean the same.
                detail = reason(exc)
                if "truncated" in detail.lower():
                    raise ImageError(f"{label} is truncated: the image data ends early (an incomplete download or "
                                     "copy?)") from exc
                raise ImageError(f"{label} is damaged or unsupported and could not be decoded: {detail}") from exc

    if notices is not None:
        notices.extend(collected)
    return image


def read_file(path: str | os.PathLike[str]) -> bytes:
    """An image file's bytes, with the errors :func:`load_image` gives (a batch reads its inputs in the parent
    process, so that workers on other hosts need not see the files)."""
    with _reading(os.fspath(path)):
        return Path(path).read_bytes()


@contextlib.contextmanager
def _reading(label: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise ImageError(f"image not found: {label}") from None
    except IsADirectoryError:
        raise ImageError(f"{label} is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"cannot read {label}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"cannot read {label}: {reason(exc)}") from None


def _decode(fp: IO[bytes], label: str, max_pixels: int | None, background: tuple[int, int, int],
            notes: list[str]) -> FloatArray:
    # Opening EPS runs Ghostscript on the file, a long history of exploits for no gain: nobody needs a PostScript style
    # image.
    Image.init()
    with Image.open(fp, formats=[name for name in Image.ID if name != "EPS"]) as opened:
        width, height = opened.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(_bomb_message(label, (width, height), max_pixels))
        # Pillow's guard was off while opening so the check above could report the size; from here on it watches frames
        # and tiles the header did not announce.
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            frames = str(getattr(opened, "n_frames", 1))
        except (OSError, EOFError, ValueError, SyntaxError, IndexError, struct.error):
            # Counting walks every frame; a broken tail should not cost the first frame.
            frames = "several"
        if frames != "1":
            notes.append(f"{label} is animated ({frames} frames); only the first frame is used")
            opened.seek(0)
        opened.load()
        upright = ImageOps.exif_transpose(opened)
    return _to_unit_rgb(upright, background, label, notes)


@contextlib.contextmanager
def _pillow_guard(label: str, notes: list[str]) -> Iterator[None]:
    """Own Pillow's pixel-limit global while decoding, and collect Pillow's warnings."""
    saved = Image.MAX_IMAGE_PIXELS
    with _PILLOW_GLOBALS_LOCK, warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        # Pillow only warns between 1x and 2x its limit; a limit should be a limit.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    for caught in recorded:
        if issubclass(caught.category, UserWarning):
            # Printed as warnings, Pillow's remarks on corrupt EXIF and the like come with a source line and read like a
            # crash; as notices they read as advice.
            notes.append(f"{label}: {one_line(str(caught.message))}")
        else:
            warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)


def _to_unit_rgb(image: Image.Image, background: tuple[int, int, int], label: str, notes: list[str]) -> FloatArray:
    image = _flatten_mode(image)
    if image.mode in {"L", "LA", "RGB", "RGBA", "CMYK"}:
        image = _to_srgb(image, label, notes)
    if image.mode == "CMYK":
        image = image.convert("RGB")
    values = np.atleast_3d(_unit_values(np.asarray(image), label, notes))
    channels = values.shape[2]
    if channels in (2, 4):
        alpha = values[:, :, -1:]
        backdrop = np.asarray(background, dtype=np.float32) / np.float32(255.0)
        values = values[:, :, :-1] * alpha + backdrop * (np.float32(1.0) - alpha)
    elif channels not in (1, 3):
        raise ImageError(f"{label} has an unsupported layout ({image.mode}, {channels} channels)")
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return np.ascontiguousarray(np.clip(values, 0.0, 1.0), dtype=np.float32)


def _flatten_mode(image: Image.Image) -> Image.Image:
    """Reduce Pillow's many modes to L, LA, RGB, RGBA, CMYK or a single high-depth band.

    Colour spaces a profile can describe (grey, RGB, CMYK) are kept as they are so the profile can still be applied;
    everything else becomes 8-bit RGB(A) here.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in {"I", "F", "CMYK", "RGBA", "LA"}:
        return image
    if mode == "La":
        return image.convert("LA")
    if mode == "1":
        return image.convert("L")
    if mode in {"L", "RGB"}:
        # A tRNS colour key: Pillow turns it into a real alpha band on conversion.
        return image.convert(mode + "A") if image.has_transparency_data else image
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def _to_srgb(image: Image.Image, label: str, notes: list[str]) -> Image.Image:
    profile_bytes = image.info.get("icc_profile")
    if not profile_bytes:
        return image
    if ImageCms is None:
        notes.append(f"{label}: colour profile ignored (Pillow was built without LittleCMS)")
        return image
    alpha = image.getchannel("A") if image.mode in {"LA", "RGBA"} else None
    colour = image.convert(image.mode[:-1]) if alpha is not None else image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile_bytes))
        converted = ImageCms.profileToProfile(colour, source, _srgb_profile(), outputMode="RGB")
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError) as exc:
        # Typically an RGB profile inside a CMYK or grey file, or a damaged profile; uncorrected colours are still far
        # better than refusing the image.
        notes.append(f"{label}: embedded colour profile could not be applied ({reason(exc)}); colours may be "
                     "slightly off")
        return image
    if converted is None:  # only happens with inPlace=True, which is not used
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


@functools.cache
def _srgb_profile() -> Any:
    return ImageCms.createProfile("sRGB")


def _unit_values(array: npt.NDArray[Any], label: str, notes: list[str]) -> FloatArray:
    """Scale raw samples to [0, 1] according to their depth."""
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        # 16-bit data keeps its full precision instead of going through 8 bits first.
        return array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    if array.dtype.kind not in "if":
        raise ImageError(f"{label}: unsupported sample type {array.dtype}")
    values = array.astype(np.float64)
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0
    # Mode "I" is also what 16-bit grey data becomes in some readers and after some operations, and then it should
    # look the same as I;16.
    top = 65535.0 if array.dtype.kind == "i" else 1.0
    if finite.size == values.size and low >= 0.0 and high <= top:
        return (values / top).astype(np.float32)
    kind = "32-bit integer" if array.dtype.kind == "i" else "floating-point"
    notes.append(f"{label}: {kind} samples from {low:g} to {high:g}; stretched to the full range")
    values = np.where(np.isfinite(values), values, low)
    if high <= low:
        return np.clip(values, 0.0, 1.0).astype(np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _is_empty(fp: IO[bytes]) -> bool:
    if isinstance(fp, io.BytesIO):
        return not fp.getbuffer().nbytes
    # Pipes and character devices report size 0 and may still carry an image.
    info = os.fstat(fp.fileno())
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


def _bomb_message(label: str, size: tuple[int, int] | None, max_pixels: int | None) -> str:
    limit = "the pixel limit" if max_pixels is None else f"the limit of {max_pixels:,} pixels"
    what = f"{label} is larger than {limit}"
    hint = "--max-pixels"
    if size is not None:
        pixels = size[0] * size[1]
        what = f"{label} is {size[0]}x{size[1]} px = {pixels:,} pixels, more than {limit}"
        hint = f"--max-pixels {pixels}"
    return f"{what} (a guard against decompression bombs); if you trust it, raise it with {hint}"


# --------------------------------------------------------------------------- saving


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Fail fast, before a long run, if ``path`` could not receive the result: the extension must name a format that
    can be written, and the folder is created and proved writable with a scratch file (permission bits mean nothing
    to root and say nothing about ACLs or read-only mounts)."""
    target = Path(path)
    image_format = _output_format(target)
    # Some plugins register their extensions even without their codec library, which would otherwise only show up when
    # saving the finished result.
    try:
        Image.new("RGB", (MIN_SIDE, MIN_SIDE)).save(io.BytesIO(), format=image_format)
    except (OSError, ValueError, KeyError) as exc:
        raise ImageError(f"cannot save {target}: this installation of Pillow cannot write {image_format} "
                         f"({reason(exc)})") from None
    if target.is_dir():
        raise ImageError(f"cannot save to {target}: it is a folder")
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create the folder {folder} for {target}: {reason(exc)}") from None
    try:
        with tempfile.NamedTemporaryFile(prefix=f".{target.name}.tmp-", dir=folder):
            pass
    except OSError as exc:
        raise ImageError(f"cannot write to the folder {folder}: {reason(exc)}") from None
    return target


def save_image(path: str | os.PathLike[str], image: npt.NDArray[Any], *, quality: int = 95) -> None:
    """Write an HxWx3 RGB image in [0, 1]; the format follows the file extension.

    The data goes to a temporary file in the target folder which then replaces the target in one step, so an interrupted
    or failed write never leaves a truncated image under the final name, nor destroys an older one.
    """
    _require_rgb(image, "save_image")
    if not 1 <= quality <= 100:
        raise ImageError(f"image quality must be between 1 and 100, got {quality}")
    target = Path(path)
    image_format = _output_format(target)
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    data = np.rint(np.clip(pixels, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(data))
    options: dict[str, Any] = {"quality": quality} if image_format in _LOSSY_WITH_QUALITY else {}

    folder = target.parent
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=folder)
    except FileNotFoundError:
        raise ImageError(f"cannot write {target}: the folder {folder} does not exist") from None
    except OSError as exc:
        raise ImageError(f"cannot write {target}: {reason(exc)}") from None
    try:
        with os.fdopen(handle, "wb") as out:
            picture.save(out, format=image_format, **options)
            out.flush()
            # Without it a crash shortly after the rename can leave an empty file.
            os.fsync(out.fileno())
        # mkstemp makes the file private to its owner; an output image should get the permissions any other new file
        # would. The umask can only be read by setting it; this is a single-threaded CLI step.
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(temp_name, 0o666 & ~mask)
        os.replace(temp_name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        if isinstance(exc, (OSError, ValueError)):
            raise ImageError(f"cannot write {target}: {reason(exc)}") from exc
        raise


def _output_format(target: Path) -> str:
    extension = target.suffix.lower()
    if not extension:
        raise ImageError(f"cannot save {target}: no file extension to choose the format from; use one of "
                         f"{_COMMON_EXTENSIONS}")
    image_format = Image.registered_extensions().get(extension)
    if image_format not in _RGB_WRITERS or image_format not in Image.SAVE or extension in _MISLEADING_EXTENSIONS:
        raise ImageError(f"cannot save {target}: unknown image extension '{target.suffix}'; use one of "
                         f"{_COMMON_EXTENSIONS}")
    return image_format
