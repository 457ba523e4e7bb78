"""Temporal consistency of `style.py video`: the warping error of frame-by-frame and temporal runs (issue 13).

The warping error of a clip is the mean, over consecutive frame pairs, of the mean squared difference (0-255
values) between frame i and frame i - 1 warped onto it by the INPUT's backward flow, over the pixels the input's
forward-backward check trusts. The input clip's own figure is the floor.

    python -m bench.video_consistency VIDEO STYLE --weights W.caffemodel --frames 10 --length 128 --iters 40 \
        --out bench/results/video
    python -m bench.video_consistency merge FOLDER... --json bench/results/video_consistency.json

The modes can run as separate processes side by side (`--modes`, one each, with OMP_NUM_THREADS=1) and be merged
afterwards; their seconds per frame then measure that setting, not the tool on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from style_transfer.cli import main as style_main
from style_transfer.video import flow, io
from style_transfer.video.run import working_size

MODES = {"frame-by-frame": ["--independent"], "warped-init": ["--temporal-weight", "0"], "temporal": []}


def clip_error(frames: list[np.ndarray], inputs: list[np.ndarray]) -> float:
    errors = []
    for i in range(1, len(frames)):
        backward, forward = flow.flow(inputs[i], inputs[i - 1]), flow.flow(inputs[i - 1], inputs[i])
        mask = flow.reliability(backward, flow.occlusions(backward, forward))
        errors.append(flow.warping_error(frames[i], frames[i - 1], backward, mask))
    return float(np.mean(errors))


def merge(folders: list[str], target: Path) -> None:
    """One results file from runs of single modes made side by side (each folder's results.json); their inputs and
    settings must agree, apart from the modes."""
    merged: dict[str, dict[str, float | str]] = {}
    for folder in folders:
        results = json.loads((Path(folder) / "results.json").read_text())
        for key in ("input", "settings", "threads"):
            if key in merged and merged[key] != results[key]:
                raise SystemExit(f"{folder}: its {key} differ from the others'")
        merged.update(results)
    target.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(merged, indent=2))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "merge":
        ap = argparse.ArgumentParser(prog="video_consistency merge")
        ap.add_argument("folders", nargs="+")
        ap.add_argument("--json", type=Path, required=True)
        args = ap.parse_args(sys.argv[2:])
        merge(args.folders, args.json)
        return
    p = argparse.ArgumentParser()
    p.add_argument("video")
    p.add_argument("style")
    p.add_argument("--weights", required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--iters", type=int, default=60, help="iterations of every frame, the first included")
    p.add_argument("--temporal-weight", help="default: the tool's own")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--out", default="bench/results/video")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = io.probe(a.video)
    h, w = working_size(info.height, info.width, a.length)
    inputs = [np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.LANCZOS))
              for f in io.read_frames(a.video, a.start, a.frames)]
    results: dict[str, dict[str, float | str]] = {"input": {"warping_error": clip_error(inputs, inputs)}}
    results["settings"] = {"video": Path(a.video).name, "style": Path(a.style).name, "start": a.start,
                           "frames": a.frames, "length": a.length, "iters": a.iters,
                           "temporal_weight": a.temporal_weight or "default"}
    results["threads"] = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset (the tool's choice)")}
    strips = [np.concatenate(inputs[:5], axis=1)]
    for mode in a.modes:
        extra = MODES[mode]
        target = out / f"{mode}.mp4"
        report = out / f"{mode}.json"
        argv = ["video", a.video, "-s", a.style, "-o", str(target), "--weights", a.weights, "-g", "-1",
                "-l", str(a.length), "-n", str(a.iters), "--iters", str(a.iters), "--start", str(a.start),
                "--frames", str(a.frames), "--seed", "0", "--report", str(report), *extra]
        if a.temporal_weight is not None and mode == "temporal":
            argv += ["--temporal-weight", a.temporal_weight]
        if style_main(argv) != 0:
            raise SystemExit(f"{mode} failed")
        work = out / f"{mode}.mp4.work"
        frames = [np.asarray(Image.open(work / f"frame-{a.start + k:06d}.png").convert("RGB"))
                  for k in range(a.frames)]
        summary = json.loads(report.read_text())
        content_losses = [f["content_loss"] for f in summary["per_frame"] if f["content_loss"] is not None]
        results[mode] = {"warping_error": clip_error(frames, inputs), "mean_style_loss": summary["mean_style_loss"],
                         "mean_content_loss": float(np.mean(content_losses)) if content_losses else float("nan"),
                         "seconds_per_frame_after_first": summary["seconds_per_frame_after_first"]}
        strips.append(np.concatenate(frames[:5], axis=1))
        print(mode, results[mode], flush=True)
    Image.fromarray(np.concatenate(strips, axis=0)).save(out / "strip.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
