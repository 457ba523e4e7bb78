"""`style.py`: the original tool's flags and meanings, plus the new options beside them.

The options come from options.py; the run itself is the library's (`Stylization.run`). What stays here is what a
terminal user sees: the progress bar, intermediate saves, the animation, the output name and the exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from style_transfer import images
from style_transfer.caffe_model.registry import MODELS
from style_transfer.errors import StyleTransferError
from style_transfer.openmp import prefer_short_spin
from style_transfer.options import OPTIONS, HelpFormatter, Parser, add_arguments, defaults, init_kind, values_for
from style_transfer.plan import SUGGEST_AUTO_ABOVE, Progress, ScaleCost
from style_transfer.util import check_writable, guarded, reason, write_json

ANIMATION_FORMATS = (".gif", ".webp", ".png", ".mp4")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="style.py", formatter_class=HelpFormatter,
               description="Neural artistic style transfer (Gatys et al.) on Caffe nets.",
               epilog="Many runs from a CSV manifest, resumable, on local workers or Dask: "
                      "style.py batch MANIFEST.csv (see style.py batch --help). A video clip: "
                      "style.py video INPUT.mp4 -s STYLE -o OUT.mp4 (see style.py video --help).")
    add_arguments(p, [o.name for o in OPTIONS], defaults_from=defaults())
    p.add_argument("--download", nargs="+", metavar="MODEL", default=None,
                   help=f"fetch and verify model weights ({', '.join(MODELS)} or all) and exit")
    p.add_argument("--mirror", default=None, help="with --download: fetch from this URL, folder or file instead")
    return p


def default_output(args: argparse.Namespace, model: str) -> Path:
    content = Path(args.content).stem
    style = "+".join(Path(s).stem for s in args.style)
    init = Path(args.init).stem if init_kind(args.init) == "file" else args.init
    return Path("outputs") / f"{content}-{style}-{model}-{init}-{args.ratio}-{args.num_iters}.jpg"


def _say(message: str) -> None:
    print(f"style.py: {message}", file=sys.stderr)


def _check_outputs(args: argparse.Namespace, output: Path) -> Path | None:
    """Every file the run will write, checked before any work."""
    images.check_output_path(output)
    animation = None
    if args.animation:
        animation = Path(args.animation)
        if animation.suffix.lower() not in ANIMATION_FORMATS:
            raise StyleTransferError(f"--animation {animation}: use a .gif, .webp, .png (APNG) or .mp4 file")
        if animation.absolute() == output.absolute():
            raise StyleTransferError(f"--animation {animation} is the output image itself; give it another name")
        if animation.suffix.lower() == ".mp4":
            from style_transfer.video.io import check_output

            check_output(animation, "--animation")
        else:
            images.check_output_path(animation)
    if args.report:
        check_writable(args.report, "--report")
    return animation


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from style_transfer.transfer import StyleTransfer

    notices: list[str] = []
    content = images.load_image(args.content, max_pixels=args.max_pixels, notices=notices)
    styles = [images.load_image(s, max_pixels=args.max_pixels, notices=notices) for s in args.style]
    model_name = args.model if args.prototxt is None else Path(args.prototxt).stem
    output = Path(args.output) if args.output else default_output(args, model_name)
    animation = _check_outputs(args, output)

    values = vars(args)
    st = StyleTransfer(**values_for("model", values))
    job = st.stylize(content, styles, **values_for("run", values))
    for notice in [*notices, *job.notices]:
        _say(notice)
    told = len(job.notices)
    if args.scales == 1 and args.length > SUGGEST_AUTO_ABOVE:
        _say(f"-l {args.length} in one scale: every iteration evaluates the full size ({(args.length / 512) ** 2:.0f}x "
             "the work of one at 512 px); --scales auto does most of them at smaller sizes")
    if args.verbose:
        for line in plan_lines(job.costs()):
            _say(line)

    frame_every = args.save_every or max(1, job.iterations // 50)
    frames: list[np.ndarray] = []
    # The time left is the library's estimate (plan.Clock), which knows that later scales cost more.
    bar = tqdm(total=job.iterations, desc="stylizing", unit="it", dynamic_ncols=True, file=sys.stderr,
               disable=None, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    status = Status(bar, verbose=args.verbose)

    def on_step(step: Any) -> None:
        bar.update(1)
        if step.evaluation is not None:
            status.loss = f"{step.evaluation.loss:.4g}"
            if args.verbose and (step.iteration == 1 or step.iteration % 10 == 0 or step.iteration == job.iterations):
                layers = "  ".join(f"{k}={v:.4g}" for k, v in step.evaluation.layers.items())
                bar.write(f"iter {step.iteration}: loss={step.evaluation.loss:.6g}  {layers}", file=sys.stderr)
        if args.save_every and step.iteration % args.save_every == 0:
            every = output.with_name(f"{output.stem}-{step.iteration:04d}{output.suffix}")
            images.save_image(every, job.to_rgb(step.image))
        if animation is not None and (step.iteration % frame_every == 0 or step.iteration == 1):
            frames.append(job.to_rgb(step.image))

    try:
        result = job.run(on_step, status.update)
    finally:
        bar.close()
    if result.iterations == 0 and result.stop_reason in ("interrupted", "nonfinite"):
        if result.interrupted:
            _say("interrupted before the first iteration; nothing saved")
            return 130
        raise StyleTransferError(result.error or "the optimisation stopped before its first iteration")
    if result.stop_reason == "scale_failed":  # smaller than asked: kept beside the output, not under its name
        height, width = result.rgb.shape[:2]
        kept = output.with_name(f"{output.stem}-{width}x{height}{output.suffix}")
        images.save_image(kept, result.rgb)
        _say(f"error: {result.error}; saved the last finished scale ({width}x{height}) to {kept}")
        return 1
    images.save_image(output, result.rgb)
    if animation is not None:
        _save_animation(animation, [*frames, result.rgb])
    if result.stop_reason == "nonfinite":
        _say(f"error: {result.error}; saved the last good image (iteration {result.iterations}) to {output}")
        return 1
    for notice in job.notices[told:]:
        _say(notice)
    if result.interrupted:
        _say(f"interrupted after {result.iterations} iteration(s); saved the current image to {output}")

    report = {**result.report, "output": str(output), "options": {k: v for k, v in values.items() if k != "report"}}
    if args.report:
        write_json(args.report, report, "--report")
    if args.verbose and result.evaluation is not None:
        ev = result.evaluation
        _say(f"loss {ev.loss:.6g} (style {ev.style_loss:.6g}, content {ev.content_loss:.6g}) in "
             f"{report['seconds']:.1f} s, {job.evaluations} evaluations")
    print(output)
    return 130 if result.interrupted else 0


def duration(seconds: float) -> str:
    """12s, 4m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def plan_lines(costs: Sequence[ScaleCost]) -> list[str]:
    """-v's picture of the plan: each scale's size, iterations, tiling and share of the work."""
    total = sum(c.work() for c in costs) or 1.0
    lines = [f"plan: {len(costs)} scale(s), {sum(c.iterations for c in costs)} iterations, "
             f"{total / 1e12:.3g} TFLOP; the time is estimated once the first evaluations are timed"]
    for i, c in enumerate(costs, 1):
        tiles = f"{c.tiles} tiles" if c.tiles else "whole"
        iterations = f"{c.iterations} iteration{'s' * (c.iterations != 1)}"
        precision = ", bf16" if c.bf16 else ""
        lines.append(f"  scale {i}: {c.width}x{c.height}, {iterations}, {tiles}{precision}, "
                     f"{c.evaluation / 1e9:.4g} GFLOP per evaluation, {100 * c.work() / total:.0f}% of the work")
    return lines


class Status:
    """The progress bar's loss, scale, tiles and time left, from the library's plan.Progress; with -v also a line
    when the first estimate of the whole run's time is known and then every STATUS_EVERY seconds (for logs, where
    the bar is off)."""

    def __init__(self, bar: Any, verbose: bool) -> None:
        self.bar, self.verbose = bar, verbose
        self.loss = ""
        self.estimated = False
        self.shown = self.written = 0.0

    def update(self, p: Progress) -> None:
        fields = {"loss": self.loss} if self.loss else {}
        if p.scales > 1:
            fields["scale"] = f"{p.scale + 1}/{p.scales}"
        if p.tiles:
            fields["tiles"] = f"pass {p.tile_pass}/2 {p.tile}/{p.tiles}" if p.stage == "evaluation" else \
                f"targets {p.tile}/{p.tiles}"
        if p.remaining is not None:
            fields["left"] = duration(p.remaining)
        now = time.monotonic()
        refresh = bool(p.tiles) and now - self.shown >= 0.5  # a long evaluation: the bar's count does not move
        if refresh:
            self.shown = now
        self.bar.set_postfix(fields, refresh=refresh)
        if not self.verbose or p.remaining is None:
            return
        if not self.estimated and p.evaluations >= 3:
            self.estimated, self.written = True, now
            self.bar.write(f"style.py: about {duration(p.elapsed + p.remaining)} in all at the "
                           f"{(p.flops_per_second or 0) / 1e9:.3g} GFLOP/s measured so far", file=sys.stderr)
        elif self.estimated and now - self.written >= STATUS_EVERY:
            self.written = now
            where = f"pass {p.tile_pass}/2, tile {p.tile} of {p.tiles}" if p.tiles and p.tile_pass else p.stage
            self.bar.write(f"style.py: scale {p.scale + 1}/{p.scales} ({p.width}x{p.height}), iteration "
                           f"{p.iteration}/{p.iterations}, evaluation {p.evaluations} ({where}); "
                           f"{duration(p.elapsed)} so far, about {duration(p.remaining)} left", file=sys.stderr)


STATUS_EVERY = 60.0


def _save_animation(path: Path, frames: list[np.ndarray]) -> None:
    """All frames at the final size (coarse-to-fine frames are smaller), written atomically."""
    from PIL import Image

    h, w = frames[-1].shape[:2]
    pixels = [np.round(images.resize_to(f, h, w) * 255).astype(np.uint8) for f in frames]
    if path.suffix.lower() == ".mp4":
        from style_transfer.video.io import write_video

        write_video(path, pixels, 10)
        return
    pictures = [Image.fromarray(p) for p in pixels]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=100, loop=0)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StyleTransferError(f"cannot write --animation {path}: {reason(exc)}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:
        from style_transfer.batch import batch_main

        return batch_main(argv[1:])
    if argv[:1] == ["video"]:
        from style_transfer.video.cli import video_main

        return video_main(argv[1:])
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
    return guarded(lambda: run(args), verbose=args.verbose, say=_say,
                   interrupted="interrupted before the optimisation started; nothing saved")
