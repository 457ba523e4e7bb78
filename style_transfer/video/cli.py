"""`style.py video INPUT -s STYLE [...] -o OUT.mp4`: a clip stylized with temporal consistency.

The still-image options that make sense for a clip come from options.py's table (VIDEO_OPTIONS); the video's own
are below. -n/--num-iters is the first frame's iterations, --iters every later frame's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from style_transfer import images
from style_transfer.errors import StyleTransferError
from style_transfer.openmp import prefer_short_spin
from style_transfer.options import HelpFormatter, Parser, add_arguments, arg_type, defaults, number, values_for, whole
from style_transfer.util import check_writable, guarded, write_json

# Options of the still-image command that a clip uses as they are. Left out: -c (the input is the clip), -o (a
# video here), --scales/--min-length (one scale per frame), --save-every/--animation/--report (per-frame reports
# are in the work folder).
VIDEO_OPTIONS = ("style", "model", "gpu", "init", "ratio", "num_iters", "length", "verbose", "style_weights",
                 "weights", "prototxt", "models_dir", "style_layers", "content_layers", "pooling", "style_scale",
                 "seed", "engine", "precision", "lbfgs_memory", "tv_weight", "max_pixels", "color_match",
                 "original_colors", "download_missing")

# Video defaults where the still image's do not fit: smaller frames and fewer first-frame iterations, since a clip
# multiplies every second spent per frame.
VIDEO_DEFAULTS = {"length": 256, "num_iters": 200}
LATER_ITERS = 40
TEMPORAL_WEIGHT = 0.1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="style.py video", formatter_class=HelpFormatter,
               description="Stylize a video clip with temporal consistency (Ruder, Dosovitskiy & Brox 2016): each "
                           "frame starts from the previous stylized frame warped by optical flow, and a temporal "
                           "term keeps it there where the flow is reliable. Resumable: run the same command again "
                           "to carry on.")
    p.add_argument("input", help="input video (any container FFmpeg reads)")
    p.add_argument("-o", "--output", required=True, help="output video: .mp4 (H.264, the input's sound copied), or "
                   ".gif/.webp for short clips")
    add_arguments(p, VIDEO_OPTIONS, defaults_from={**defaults(), **VIDEO_DEFAULTS},
                  helps={"num_iters": "L-BFGS-B iterations of the first frame"})
    p.add_argument("--iters", type=arg_type(whole(), "--iters"), default=LATER_ITERS,
                   help="L-BFGS-B iterations of every frame after the first")
    p.add_argument("--temporal-weight", type=arg_type(number(), "--temporal-weight"), default=TEMPORAL_WEIGHT,
                   help="weight of the temporal term (sum of squared differences from the warped previous frame, "
                        "0-255 scale, beside the content term's weight 1); 0 turns it off")
    p.add_argument("--independent", action="store_true",
                   help="stylize every frame on its own, as the first (no warped start, no temporal term)")
    p.add_argument("--start", type=arg_type(whole(0), "--start"), default=0, help="first frame (0-based)")
    p.add_argument("--frames", type=arg_type(whole(), "--frames"), default=None,
                   help="number of frames (default: to the end)")
    p.add_argument("--work-dir", default=None,
                   help="folder for the stylized frames and their reports (default: OUTPUT's name + .work beside "
                        "it); kept afterwards, so the run can be resumed or reassembled")
    p.add_argument("--report", default=None, help="write a JSON report of the clip here")
    return p


def _say(message: str) -> None:
    print(f"style.py video: {message}", file=sys.stderr)


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def make_plan(args: argparse.Namespace) -> Any:
    from style_transfer.video import io
    from style_transfer.video.run import VideoPlan, working_size

    output = io.check_output(args.output)
    info = io.probe(args.input)
    if args.start >= info.frames:
        raise StyleTransferError(f"--start {args.start} is past the end: {args.input} has {info.frames} frame(s) "
                                 f"(0..{info.frames - 1})")
    available = info.frames - args.start
    if args.frames is not None and args.frames > available:
        raise StyleTransferError(f"--start {args.start} --frames {args.frames} goes past the end: {args.input} has "
                                 f"{info.frames} frame(s), {available} from frame {args.start}")
    frames = args.frames if args.frames is not None else available
    notices: list[str] = []
    styles = [images.load_image(s, max_pixels=args.max_pixels, notices=notices) for s in args.style]
    for notice in notices:
        _say(notice)
    work = Path(args.work_dir) if args.work_dir else output.with_name(output.name + ".work")
    if work.resolve() == output.resolve():
        raise StyleTransferError("--work-dir is the output itself; give another folder")
    independent = bool(args.independent)
    plan = VideoPlan(input=Path(args.input), info=info, styles=styles, work=work, start=args.start,
                     frames=frames, size=working_size(info.height, info.width, args.length),
                     iters=args.num_iters if independent else args.iters,
                     temporal_weight=0.0 if independent else args.temporal_weight, warp_init=not independent,
                     model_options=values_for("model", vars(args)), run_options=values_for("run", vars(args)))
    return plan, output


def run(args: argparse.Namespace) -> int:
    from style_transfer.transfer import StyleTransfer
    from style_transfer.video.run import assemble, clip_summary, open_work, stylize_frames

    if args.report:
        check_writable(args.report, "--report")
    plan, output = make_plan(args)
    st = StyleTransfer(**plan.model_options)
    for notice in st.notices:
        _say(notice)
    started = time.perf_counter()
    later: list[float] = []

    def on_frame(index: int, loss: float | None, seconds: float) -> None:
        if index > 0:
            later.append(seconds)
        remaining = plan.frames - index - 1
        per_frame = sum(later) / len(later) if later else seconds
        shown = f"{loss:.4g}" if loss is not None else "?"
        _say(f"frame {index + 1}/{plan.frames} (#{plan.start + index}): loss {shown}, "
             f"{seconds:.1f} s; ETA {_clock(remaining * per_frame)}")

    def on_step(step: Any) -> None:
        if args.verbose and step.evaluation is not None and step.iteration % 10 == 0:
            _say(f"  iter {step.iteration}: loss {step.evaluation.loss:.6g}")

    done = open_work(plan)
    if done:
        _say(f"carrying on from {plan.work}: {done} of {plan.frames} frame(s) already done")
    result = stylize_frames(plan, st, on_frame, on_step)
    if result.interrupted:
        _say(f"interrupted: {result.done} of {plan.frames} frame(s) done, kept in {plan.work}; run the same command "
             "again to carry on")
        return 130
    if result.error:
        _say(f"error: {result.error}; {result.done} frame(s) kept in {plan.work}")
        return 1
    for notice in assemble(plan, output):
        _say(notice)
    if args.report:
        summary = {**clip_summary(plan), "input": str(plan.input), "output": str(output),
                   "seconds": time.perf_counter() - started, "work_dir": str(plan.work),
                   "temporal_weight": plan.temporal_weight, "iters": plan.iters, "independent": args.independent}
        write_json(args.report, summary, "--report")
    print(output)
    return 0


def video_main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if not args.style:
        parser.error("the following arguments are required: -s/--style-img")
    prefer_short_spin([args.model] if args.prototxt is None else [], args.engine)
    return guarded(lambda: run(args), verbose=args.verbose, say=_say,
                   interrupted="interrupted; finished frames are kept in the work folder")
