"""`style.py`: the original tool's flags and meanings, plus the new options beside them."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from style_transfer import images
from style_transfer.caffe_model.registry import MODELS
from style_transfer.engines import ENGINES, PRECISIONS
from style_transfer.errors import StyleTransferError
from style_transfer.openmp import prefer_short_spin

# Every default lives here, and the help text shows it.
DEFAULTS: dict[str, Any] = {
    "model": "vgg16",
    "gpu": 0,
    "init": "content",
    "ratio": "1e4",
    "num_iters": 512,
    "length": 512,
    "style_scale": 1.2,
    "pooling": "avg",
    "engine": "torch",
    "precision": "fp32",
    "lbfgs_memory": 8,
    "tv_weight": 0.0,
    "max_pixels": images.DEFAULT_MAX_PIXELS,
    "scales": 1,
    "color_match": "none",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block, so batch logs stay readable.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(flag: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} needs a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {value}")
        return value

    return parse


def _number(flag: str, minimum: float = 0.0, strict: bool = False):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} needs a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            relation = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number {relation} {minimum:g}, got {text!r}")
        return value

    return parse


def _length(text: str) -> int:
    # The original parsed -l as a float; accept "512.0" but work in whole pixels.
    value = _number("-l/--length", float(images.MIN_SIDE))(text)
    return round(value)


def _gpu(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-g/--gpu needs a device number (-1 for the CPU), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = _Parser(prog="style.py", description="Neural artistic style transfer (Gatys et al.) on Caffe nets.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # -s and -c are checked in main(), so that --download works without them.
    p.add_argument("-s", "--style-img", "--style_img", dest="style", nargs="+", metavar="STYLE",
                   help="style (art) image(s); required")
    p.add_argument("-c", "--content-img", "--content_img", dest="content", help="content image; required")
    p.add_argument("-m", "--model", default=d["model"],
                   help=f"model: {', '.join(MODELS)} (or any net with --prototxt)")
    p.add_argument("-g", "--gpu", "--gpu_id", dest="gpu", type=_gpu, default=d["gpu"],
                   help="CUDA device number, -1 for the CPU")
    p.add_argument("-i", "--init", default=d["init"],
                   help="initial image: content, mixed, a number N (1/f^N noise) or an image file")
    p.add_argument("-r", "--ratio", default=d["ratio"], help="style-to-content ratio")
    p.add_argument("-n", "--num-iters", "--num_iters", dest="num_iters", type=_positive_int("-n/--num-iters"),
                   default=d["num_iters"], help="L-BFGS-B iterations")
    p.add_argument("-l", "--length", type=_length, default=d["length"], help="long side of the output, pixels")
    p.add_argument("-v", "--verbose", action="store_true", help="print per-layer losses and engine logs")
    p.add_argument("-o", "--output", default=None,
                   help="output image (format by extension); default "
                        "outputs/{content}-{style}-{model}-{init}-{ratio}-{iters}.jpg")
    p.add_argument("--style-weights", type=_number("--style-weights"), nargs="+", default=None,
                   help="blend weights of several style images (normalised)")
    p.add_argument("--weights", default=None, help="use this caffemodel instead of the model's default file")
    p.add_argument("--prototxt", default=None, help="use this net definition (needs --weights and the layer flags)")
    p.add_argument("--models-dir", default=None,
                   help="folder holding <model>/<weights>.caffemodel (env STYLE_TRANSFER_MODELS; default models/)")
    p.add_argument("--style-layers", default=None, help="style blobs, e.g. conv1_1:0.5,conv2_1:0.5 (default: preset)")
    p.add_argument("--content-layers", default=None, help="content blobs, e.g. conv4_2:1 (default: preset)")
    p.add_argument("--pooling", choices=("avg", "max"), default=d["pooling"],
                   help="pooling used in every pooling layer (the original used avg)")
    p.add_argument("--style-scale", type=_number("--style-scale", 0.0, strict=True), default=d["style_scale"],
                   help="style image long side as a multiple of --length")
    p.add_argument("--seed", type=int, default=None, help="random seed for noise initialisation")
    p.add_argument("--engine", choices=ENGINES, default=d["engine"], help="network engine")
    p.add_argument("--precision", choices=PRECISIONS, default=d["precision"],
                   help="torch engine arithmetic: fp32, or bf16/fp16 autocast (Gram matrices in fp32); bf16 is "
                        "faster on CPUs with AVX512-BF16/AMX and on recent GPUs, fp16 on GPUs")
    p.add_argument("--lbfgs-memory", type=_positive_int("--lbfgs-memory"), default=d["lbfgs_memory"],
                   help="L-BFGS-B history size (scipy's maxcor)")
    p.add_argument("--tv-weight", type=_number("--tv-weight"), default=d["tv_weight"],
                   help="total-variation weight (on the 0-255 pixel scale)")
    p.add_argument("--max-pixels", type=_positive_int("--max-pixels"), default=d["max_pixels"],
                   help="largest input image accepted, in pixels (decompression-bomb guard)")
    p.add_argument("--scales", type=_positive_int("--scales"), default=d["scales"],
                   help="coarse-to-fine scales; 1 is the original single-scale run")
    p.add_argument("--min-length", type=_positive_int("--min-length"), default=None,
                   help="long side of the smallest scale (default: halving per scale, at least 64)")
    p.add_argument("--color-match", choices=("none", "meancov", "histogram"), default=d["color_match"],
                   help="recolour the style image(s) to the content's colour statistics first")
    p.add_argument("--original-colors", action="store_true",
                   help="keep the content's colours: the result's luminance with the content's chroma")
    p.add_argument("--save-every", type=_positive_int("--save-every"), default=None,
                   help="also save OUT-NNNN.ext every N iterations")
    p.add_argument("--animation", default=None,
                   help="assemble the intermediate images into an animated .gif/.webp/.png")
    p.add_argument("--report", default=None, help="write a JSON report of the run here")
    p.add_argument("--download", nargs="+", metavar="MODEL", default=None,
                   help=f"fetch and verify model weights ({', '.join(MODELS)} or all) and exit")
    p.add_argument("--download-missing", action="store_true",
                   help="fetch the model's weights first when they are missing")
    p.add_argument("--mirror", default=None, help="with --download: fetch from this URL, folder or file instead")
    return p


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise StyleTransferError(f"-r/--ratio needs a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise StyleTransferError(f"-r/--ratio must be a finite number >= 0, got {text!r}")
    return value


def default_output(args: argparse.Namespace, model: str) -> Path:
    content = Path(args.content).stem
    style = "+".join(Path(s).stem for s in args.style)
    init = Path(args.init).stem if os.sep in args.init or Path(args.init).suffix else args.init
    return Path("outputs") / f"{content}-{style}-{model}-{init}-{args.ratio}-{args.num_iters}.jpg"


def _init_value(text: str, max_pixels: int) -> str | np.ndarray:
    if text in ("content", "mixed"):
        return text
    try:
        float(text)
        return text
    except ValueError:
        pass
    if Path(text).exists():
        return images.load_image(text, max_pixels=max_pixels)
    raise StyleTransferError(f"-i/--init must be content, mixed, a number or an existing image file, got {text!r}")


def _say(message: str) -> None:
    print(f"style.py: {message}", file=sys.stderr)


def _save_name(output: Path, iteration: int) -> Path:
    return output.with_name(f"{output.stem}-{iteration:04d}{output.suffix}")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from style_transfer.colors import original_colors
    from style_transfer.optimize import NonFiniteLossError
    from style_transfer.transfer import StyleTransfer

    ratio = _ratio(args.ratio)
    if args.style_weights is not None and len(args.style_weights) != len(args.style):
        raise StyleTransferError(f"--style-weights: {len(args.style)} style image(s) but "
                                 f"{len(args.style_weights)} weight(s)")
    notices: list[str] = []
    content = images.load_image(args.content, max_pixels=args.max_pixels, notices=notices)
    styles = [images.load_image(s, max_pixels=args.max_pixels, notices=notices) for s in args.style]
    init = _init_value(args.init, args.max_pixels)
    model_name = args.model if args.prototxt is None else Path(args.prototxt).stem
    output = Path(args.output) if args.output else default_output(args, model_name)
    images.check_output_path(output)
    if args.animation:
        animation = images.check_output_path(args.animation)
        if animation.suffix.lower() not in (".gif", ".webp", ".png"):
            raise StyleTransferError(f"--animation {animation}: use a .gif, .webp or .png (APNG) file")
    if args.report:
        _check_report_path(Path(args.report))

    started = time.perf_counter()
    st = StyleTransfer(args.model, prototxt=args.prototxt, weights=args.weights, models_dir=args.models_dir,
                       style_layers=args.style_layers, content_layers=args.content_layers, pooling=args.pooling,
                       engine=args.engine, gpu=args.gpu, verbose=args.verbose,
                       download_missing=args.download_missing, precision=args.precision)
    run_ = st.stylize(content, styles, style_blend=args.style_weights, ratio=ratio, iterations=args.num_iters,
                      length=args.length, style_scale=args.style_scale, init=init, seed=args.seed,
                      lbfgs_memory=args.lbfgs_memory, tv_weight=args.tv_weight, scales=args.scales,
                      min_length=args.min_length, color_match=args.color_match)
    for notice in [*notices, *run_.notices]:
        _say(notice)
    setup_seconds = time.perf_counter() - started

    def to_rgb(x: np.ndarray) -> np.ndarray:
        rgb = run_.to_rgb(x)
        if args.original_colors:
            rgb = original_colors(rgb, images.resize_to(content, rgb.shape[0], rgb.shape[1]))
        return rgb

    frame_every = args.save_every or max(1, run_.iterations // 50)
    frames: list[np.ndarray] = []
    last = None
    interrupted = False
    failure: StyleTransferError | None = None
    optimise_started = time.perf_counter()
    bar = tqdm(total=run_.iterations, desc="stylizing", unit="it", dynamic_ncols=True, file=sys.stderr,
               disable=None)
    try:
        for step in run_.steps():
            last = step
            bar.update(1)
            if step.evaluation is not None:
                bar.set_postfix(loss=f"{step.evaluation.loss:.4g}", scale=step.scale + 1, refresh=False)
                if args.verbose and (step.iteration == 1 or step.iteration % 10 == 0
                                     or step.iteration == run_.iterations):
                    layers = "  ".join(f"{k}={v:.4g}" for k, v in step.evaluation.layers.items())
                    bar.write(f"iter {step.iteration}: loss={step.evaluation.loss:.6g}  {layers}")
            if args.save_every and step.iteration % args.save_every == 0:
                images.save_image(_save_name(output, step.iteration), to_rgb(step.image))
            if args.animation and (step.iteration % frame_every == 0 or step.iteration == 1):
                frames.append(to_rgb(step.image))
    except KeyboardInterrupt:
        interrupted = True
    except NonFiniteLossError as exc:
        failure = exc
    finally:
        bar.close()
    seconds = time.perf_counter() - optimise_started

    result = run_.result
    if interrupted or failure is not None:
        final = last.image if last is not None else None
    else:
        final = result.image if result.image is not None else (last.image if last is not None else None)
    if final is None:
        if failure is not None:
            raise failure
        raise StyleTransferError("the optimisation stopped before its first iteration; nothing to save")
    final_rgb = to_rgb(final)
    images.save_image(output, final_rgb)
    if args.animation:
        _save_animation(Path(args.animation), [*frames, final_rgb])
    if failure is not None:
        _say(f"error: {failure}; saved the last good image (iteration {last.iteration if last else 0}) to {output}")
        return 1
    if interrupted:
        _say(f"interrupted after {last.iteration if last else 0} iteration(s); saved the current image to {output}")
    elif result.stopped_early:
        _say(f"L-BFGS-B stopped after {result.iterations} of {run_.iterations} iterations: {result.message}")

    evaluations = run_.evaluations
    if last is not None and last.evaluation is not None and np.array_equal(last.image, final):
        final_eval = last.evaluation
    else:
        final_eval = st.engine.evaluate(final)
    report = {
        "engine": args.engine,
        "model": model_name,
        "iterations": last.iteration if last else 0,
        **run_.report(final, final_eval, seconds, setup_seconds),
        "stop_reason": "interrupted" if interrupted else result.message,
        "output": str(output),
        "options": {k: v for k, v in vars(args).items() if k != "report"},
    }
    if args.report:
        _write_json(Path(args.report), report)
    if args.verbose:
        _say(f"loss {final_eval.loss:.6g} (style {final_eval.style_loss:.6g}, content {final_eval.content_loss:.6g})"
             f" in {seconds:.1f} s, {evaluations} evaluations")
    print(output)
    return 130 if interrupted else 0


def _save_animation(path: Path, frames: list[np.ndarray]) -> None:
    """All frames at the final size (coarse-to-fine frames are smaller), written atomically."""
    from PIL import Image

    h, w = frames[-1].shape[:2]
    pictures = [Image.fromarray(np.round(images.resize_to(f, h, w) * 255).astype(np.uint8)) for f in frames]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=100, loop=0)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StyleTransferError(f"cannot write --animation {path}: {exc.strerror or exc}") from None


def _check_report_path(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StyleTransferError(f"cannot create the folder of --report {path}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise StyleTransferError(f"--report {path} is a folder")
    if not os.access(path.parent, os.W_OK):
        raise StyleTransferError(f"cannot write --report {path}: folder is not writable")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StyleTransferError(f"cannot write --report {path}: {exc.strerror or exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:
        from style_transfer.batch import batch_main

        return batch_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.download:
        from style_transfer.download import download_main

        extra = ["--models-dir", args.models_dir] if args.models_dir else []
        extra += ["--mirror", args.mirror] if args.mirror else []
        return download_main([*args.download, *extra])
    if not args.style or not args.content:
        parser.error("the following arguments are required: -s/--style-img, -c/--content-img")
    # Before anything imports torch.
    prefer_short_spin([args.model] if args.prototxt is None else [], args.engine)
    try:
        return run(args)
    except StyleTransferError as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted before the optimisation started; nothing saved")
        return 130
    except MemoryError:
        _say("error: out of memory; try a smaller -l/--length")
        return 1
    except Exception as exc:
        # A bug rather than bad input: one line by default, the traceback with -v.
        if args.verbose:
            raise
        _say(f"error: unexpected {type(exc).__name__}: {exc} (rerun with -v for the traceback)")
        return 1
