"""Every run option, defined once: name, flags, default, check and help.

The CLI parser, the batch parser, the manifest columns, the batch's resume fingerprint and the library's keyword
arguments are all built from `OPTIONS`, so adding an option touches this table and the code that uses its value.

Values arrive as text (command line, manifest cells) or as Python values (library calls); `check` takes either and
returns the value the library works with, or raises a StyleTransferError that names the flag. The original parsed
`-r` and `-i` as text and named its outputs after that text, so the checks of those two return the text as given and
the values are converted where they are used.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from style_transfer.caffe_model.registry import MODELS
from style_transfer.engines import ENGINES, PRECISIONS
from style_transfer.errors import StyleTransferError
from style_transfer.images import DEFAULT_MAX_PIXELS, MIN_SIDE
from style_transfer.plan import AUTO

Check = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Option:
    name: str  # the keyword argument, the argparse dest and the manifest column
    flags: tuple[str, ...]
    help: str
    default: Any = None
    check: Check | None = None  # (value or text, label) -> value
    scope: str = "run"  # "model": StyleTransfer(...); "run": stylize(...); "cli": style.py's own
    column: bool = True  # a batch manifest column (and a batch default on its command line)
    fingerprint: bool = True  # a change makes finished batch jobs run again
    is_path: bool = False  # relative to the manifest's folder in a manifest
    flag: bool = False  # on/off switch without a value
    nargs: str | None = None
    choices: tuple[str, ...] | None = None  # checked by `convert` when there is no `check`
    metavar: str | None = None

    @property
    def label(self) -> str:
        """How messages name the option: "-r/--ratio", "--tv-weight"."""
        short = [f for f in self.flags if not f.startswith("--")]
        return "/".join([*short[:1], self.flags[len(short)]])

    def convert(self, value: Any) -> Any:
        if value is not None and self.check is not None:
            return self.check(value, self.label)
        if value is not None and self.choices is not None and value not in self.choices:
            raise StyleTransferError(f"{self.label} must be one of {', '.join(self.choices)}, got {value!r}")
        return value


# ------------------------------------------------------------------------------------------------ checks


def number(minimum: float = 0.0, strict: bool = False) -> Check:
    def check(value: Any, label: str) -> float:
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise StyleTransferError(f"{label} needs a number, got {value!r}") from None
        if not math.isfinite(result) or result < minimum or (strict and result == minimum):
            relation = ">" if strict else ">="
            raise StyleTransferError(f"{label} must be a finite number {relation} {minimum:g}, got {value!r}")
        return result

    return check


def whole(minimum: int | None = 1) -> Check:
    def check(value: Any, label: str) -> int:
        try:
            result = int(value)
        except (TypeError, ValueError):
            raise StyleTransferError(f"{label} needs a whole number, got {value!r}") from None
        if isinstance(value, float) and value != result:
            raise StyleTransferError(f"{label} needs a whole number, got {value!r}")
        if minimum is not None and result < minimum:
            raise StyleTransferError(f"{label} must be at least {minimum}, got {result}")
        return result

    return check


def _scales(value: Any, label: str) -> int | str:
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        return int(whole()(value, label))
    except StyleTransferError:
        raise StyleTransferError(f"{label} needs a whole number >= 1 or {AUTO}, got {value!r}") from None


def _length(value: Any, label: str) -> int:
    # The original parsed -l as a float; "512.0" is accepted, the work is in whole pixels.
    return round(number(float(MIN_SIDE))(value, label))


def _gpu(value: Any, label: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StyleTransferError(f"{label} needs a device number (-1 for the CPU), got {value!r}") from None


def _ratio_text(value: Any, label: str) -> Any:
    number()(value, label)
    return value


def _weights(value: Any, label: str) -> list[float]:
    items = value.replace(";", " ").split() if isinstance(value, str) else list(value)
    return [number()(v, label) for v in items]


def _flag(value: Any, label: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "yes", "true", "y", "on"):
        return True
    if text in ("0", "no", "false", "n", "off"):
        return False
    raise StyleTransferError(f"{label} must be yes or no (1/0, true/false), got {value!r}")


def init_kind(value: Any) -> str:
    """What an --init value is: "content", "mixed", "noise" (a number, the 1/f exponent), "image" (an array) or
    "file" (a path). The one place this is decided."""
    if isinstance(value, np.ndarray):
        return "image"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "noise"
    if isinstance(value, Path):
        return "file"
    text = str(value)
    if text in ("content", "mixed"):
        return text
    try:
        float(text)
    except ValueError:
        return "file"
    return "noise"


def _init(value: Any, label: str) -> Any:
    kind = init_kind(value)
    if kind == "noise":
        exponent = float(value)
        if not math.isfinite(exponent) or exponent < 0:
            raise StyleTransferError(f"{label} noise exponent must be a finite number >= 0, got {value!r}")
    elif kind == "file" and not str(value):
        raise StyleTransferError(f"{label} must be content, mixed, a number or an image file, got ''")
    return value


def parse_layer_weights(spec: str | Mapping[str, float] | Sequence[str], label: str = "layers") -> dict[str, float]:
    """`"a:0.5,b:0.5"` or `"a,b"` (equal weights summing to 1) -> {"a": 0.5, "b": 0.5}."""
    if isinstance(spec, Mapping):
        out = {str(k): float(v) for k, v in spec.items()}
    else:
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
        items = [s for s in items if s]
        if not items:
            raise StyleTransferError(f"{label}: no layers given")
        named: dict[str, float | None] = {}
        for item in items:
            name, sep, value = item.rpartition(":")
            if not sep:
                named[item] = None
                continue
            try:
                named[name] = float(value)
            except ValueError:
                raise StyleTransferError(f"{label}: the weight of {name!r} must be a number, got {value!r}") \
                    from None
        given = [v for v in named.values() if v is not None]
        if given and len(given) != len(named):
            raise StyleTransferError(f"{label}: give a weight to every layer or to none ({spec!r})")
        out = {k: (v if v is not None else 1.0 / len(named)) for k, v in named.items()}
    for name, weight in out.items():
        if not math.isfinite(weight) or weight < 0:
            raise StyleTransferError(f"{label}: weight of {name!r} must be a finite number >= 0, got {weight}")
    return out


def _layers(value: Any, label: str) -> Any:
    # Parsed here so that a bad spec fails before anything loads; the library keeps what the user wrote.
    parse_layer_weights(value, label)
    return value


# ------------------------------------------------------------------------------------------------ the table


OPTIONS: tuple[Option, ...] = (
    # What to stylize and where the result goes: the manifest has columns of its own for these.
    Option("style", ("-s", "--style-img", "--style_img"), "style (art) image(s); required", nargs="+",
           metavar="STYLE", scope="cli", column=False),
    Option("content", ("-c", "--content-img", "--content_img"), "content image; required", scope="cli",
           column=False),
    # The original tool's flags, with its defaults.
    Option("model", ("-m", "--model"), f"model: {', '.join(MODELS)} (or any net with --prototxt)", "vgg16",
           scope="model"),
    Option("gpu", ("-g", "--gpu", "--gpu_id"), "CUDA device number, -1 for the CPU", 0, _gpu, scope="model",
           fingerprint=False),
    Option("init", ("-i", "--init"), "initial image: content, mixed, a number N (1/f^N noise) or an image file",
           "content", _init, is_path=True),
    Option("ratio", ("-r", "--ratio"), "style-to-content ratio", "1e4", _ratio_text),
    Option("num_iters", ("-n", "--num-iters", "--num_iters"), "L-BFGS-B iterations", 512, whole()),
    Option("length", ("-l", "--length"), "long side of the output, pixels", 512, _length),
    Option("verbose", ("-v", "--verbose"), "print per-layer losses and engine logs", False, _flag, scope="model",
           flag=True, fingerprint=False, column=False),
    Option("output", ("-o", "--output"), "output image (format by extension); default "
           "outputs/{content}-{style}-{model}-{init}-{ratio}-{iters}.jpg", scope="cli", column=False),
    # Added beside them.
    Option("style_weights", ("--style-weights",), "blend weights of several style images (normalised)", None,
           _weights, nargs="+"),
    Option("weights", ("--weights",), "use this caffemodel instead of the model's default file", scope="model",
           is_path=True),
    Option("prototxt", ("--prototxt",), "use this net definition (needs --weights and the layer flags)",
           scope="model", is_path=True),
    Option("models_dir", ("--models-dir",), "folder holding <model>/<weights>.caffemodel (env "
           "STYLE_TRANSFER_MODELS; default: the checkout's models/)", scope="model", is_path=True,
           fingerprint=False),
    Option("style_layers", ("--style-layers",), "style blobs, e.g. conv1_1:0.5,conv2_1:0.5 (default: the model's "
           "preset)", None, _layers, scope="model"),
    Option("content_layers", ("--content-layers",), "content blobs, e.g. conv4_2:1 (default: the model's preset)",
           None, _layers, scope="model"),
    Option("pooling", ("--pooling",), "pooling used in every pooling layer (the original used avg)", "avg",
           scope="model", choices=("avg", "max")),
    Option("style_scale", ("--style-scale",), "style image long side as a multiple of --length", 1.2,
           number(0.0, strict=True)),
    Option("seed", ("--seed",), "random seed for noise initialisation (default: drawn, and reported)", None,
           whole(None)),
    Option("engine", ("--engine",), "network engine", "torch", scope="model", choices=ENGINES),
    Option("precision", ("--precision",), "torch engine arithmetic: fp32, or bf16/fp16 autocast convolutions "
           "(Gram products in fp32); auto is bf16 on CPUs with AMX, where it reaches a given loss about twice as "
           "soon and scores the result in fp32, and fp32 elsewhere; fp16 is for GPUs only", "auto", scope="model",
           choices=("auto", *PRECISIONS)),
    Option("lbfgs_memory", ("--lbfgs-memory",), "L-BFGS-B history size (scipy's maxcor)", 8, whole()),
    Option("tv_weight", ("--tv-weight",), "total-variation weight (on the 0-255 pixel scale)", 0.0, number()),
    Option("max_pixels", ("--max-pixels",), "largest input image accepted, in pixels (decompression-bomb guard)",
           DEFAULT_MAX_PIXELS, whole(), fingerprint=False),
    Option("max_memory", ("--max-memory",), "memory a run may use, in GB (RAM on the CPU, free device memory on "
           "CUDA): an image whose evaluation needs more is evaluated in tiles, exactly (default: what is available)",
           None, number(0.0, strict=True), fingerprint=False, metavar="GB"),
    Option("scales", ("--scales",), "coarse-to-fine: N sizes from --min-length to --length, -n split in proportion "
           "to 1/size; or auto, for big outputs: from 512 px (--min-length) doubling up to --length, -n split in "
           "proportion to 1/pixels (every scale about the same time, a few iterations at full size); -n is the total "
           "either way; 1 is the original single-scale run", 1, _scales, metavar="N|auto"),
    Option("min_length", ("--min-length",), "long side of the smallest scale, with --scales (default: halving per "
           "scale, at least 64; 512 with auto)", None, whole()),
    Option("color_match", ("--color-match",), "recolour the style image(s) to the content's colour statistics "
           "first", "none", choices=("none", "meancov", "histogram")),
    Option("original_colors", ("--original-colors",), "keep the content's colours: the result's luminance with "
           "the content's chroma", False, _flag, flag=True),
    Option("save_every", ("--save-every",), "also save OUT-NNNN.ext every N iterations", None, whole(),
           scope="cli", column=False),
    Option("animation", ("--animation",), "assemble the intermediate images into an animated .gif/.webp/.png or "
           "an .mp4 video", scope="cli", column=False),
    Option("report", ("--report",), "write a JSON report of the run here", scope="cli", column=False),
    Option("download_missing", ("--download-missing",), "fetch the model's weights first when they are missing",
           False, _flag, scope="model", flag=True, column=False, fingerprint=False),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
MANIFEST_COLUMNS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.column)
FINGERPRINTED: frozenset[str] = frozenset(o.name for o in OPTIONS if o.fingerprint)


def defaults() -> dict[str, Any]:
    return {o.name: o.default for o in OPTIONS}


def parse_value(name: str, text: Any) -> Any:
    """A value as the command line or a manifest cell gives it, checked."""
    return BY_NAME[name].convert(text)


def values_for(scope: str, values: dict[str, Any]) -> dict[str, Any]:
    """The options of one scope ("model" or "run") from a dict that holds them all, e.g. `vars(args)`."""
    return {o.name: values[o.name] for o in OPTIONS if o.scope == scope and o.name in values}


def check_all(scope: str, given: dict[str, Any]) -> dict[str, Any]:
    """Library keyword arguments: unknown names refused, every value checked, the rest from the defaults."""
    known = {o.name: o.default for o in OPTIONS if o.scope == scope}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return {name: BY_NAME[name].convert(value) for name, value in {**known, **given}.items()}


# ------------------------------------------------------------------------------------------------ argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        # "(default: None)" says nothing; those options say their default in words.
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Errors as one line, not argparse's usage block, so batch logs stay readable."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n")


def arg_type(check: Check, label: str) -> Callable[[str], Any]:
    """An argparse `type` from a check: the table's options and a command's own arguments fail alike."""
    def parse(text: str) -> Any:
        try:
            return check(text, label)
        except StyleTransferError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _item(option: Option) -> Check:
    """`option`'s check of one command-line item: argparse converts the items of nargs one at a time."""
    def check(text: str, _label: str) -> Any:
        return option.convert([text])[0] if option.nargs else option.convert(text)

    return check


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str], *, defaults_from: dict[str, Any],
                  helps: dict[str, str] | None = None) -> None:
    """The named options as arguments, in the table's order; `helps` rewords an option for a command where it
    means something narrower (e.g. -n in `style.py video`)."""
    wanted, helps = set(names), helps or {}
    for option in OPTIONS:
        if option.name not in wanted:
            continue
        kinds = {"action": "store_true"} if option.flag else {
            "type": arg_type(_item(option), option.label), "default": defaults_from.get(option.name),
            "nargs": option.nargs, "choices": option.choices, "metavar": option.metavar}
        parser.add_argument(*option.flags, dest=option.name, help=helps.get(option.name, option.help), **kinds)
