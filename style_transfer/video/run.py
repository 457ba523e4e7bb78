"""Stylizing a clip frame by frame, as Ruder, Dosovitskiy & Brox 2016 did, into a resumable work folder.

Frame k of the range starts from stylized frame k - 1 warped onto it by the backward optical flow, and (with a
temporal weight) is held close to that warped frame where the flow is reliable. Each finished frame is a PNG and a
JSON report in the work folder, written in that order and atomically, so a frame counts as done when its report
exists. A new run with the same settings carries on after the last done frame; other settings are refused rather
than mixed into one clip. The previous stylized frame is always taken as saved (8-bit), so a resumed run gives the
frames an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from style_transfer import images
from style_transfer.errors import StyleTransferError
from style_transfer.options import FINGERPRINTED
from style_transfer.util import write_json
from style_transfer.video import flow, io

SETTINGS = "settings.json"
# Told after each finished frame: its index in the range (0-based), its loss and its seconds.
OnFrame = Callable[[int, float | None, float], None]


@dataclass
class VideoPlan:
    """What to stylize and how; `run_options` are options.py's "run" options (num_iters is the first frame's)."""

    input: Path
    info: io.VideoInfo
    styles: list[np.ndarray]
    work: Path
    start: int
    frames: int
    size: tuple[int, int]  # (height, width), both even: H.264 in yuv420p needs them so
    iters: int  # iterations of every frame after the first
    temporal_weight: float
    warp_init: bool  # start each frame from the previous stylized frame warped (else as the first frame)
    model_options: dict[str, Any]
    run_options: dict[str, Any]

    @property
    def audio(self) -> io.AudioSource | None:
        if not self.info.has_audio:
            return None
        fps = float(self.info.fps)
        return io.AudioSource(self.input, self.start / fps, self.frames / fps)

    def settings(self) -> dict[str, Any]:
        """What the work folder's frames depend on (not the frame count: a longer range carries on)."""
        stat = self.input.stat()
        fingerprinted = {k: v for k, v in {**self.model_options, **self.run_options}.items() if k in FINGERPRINTED}
        styles = hashlib.sha256(b"".join(np.ascontiguousarray(s).tobytes() for s in self.styles)).hexdigest()
        return {"input": str(self.input.resolve()), "input_size": stat.st_size, "input_mtime": stat.st_mtime,
                "start": self.start, "size": list(self.size), "iters": self.iters,
                "temporal_weight": self.temporal_weight, "warp_init": self.warp_init,
                "warped_start": "new picture from the input, recoloured" if self.warp_init else None,
                "new_shot_below": flow.NEW_SHOT_BELOW, "styles": styles,
                "options": json.loads(json.dumps(fingerprinted, default=str))}

    def frame_path(self, k: int) -> Path:
        return self.work / f"frame-{self.start + k:06d}.png"

    def report_path(self, k: int) -> Path:
        return self.work / f"frame-{self.start + k:06d}.json"


def working_size(height: int, width: int, length: int) -> tuple[int, int]:
    """The frame size at long side `length`, each side rounded down to an even number."""
    h, w = images.long_side_size(height, width, length)
    h, w = h - h % 2, w - w % 2
    if min(h, w) < images.MIN_SIDE:
        raise StyleTransferError(f"frames {width}x{height} px would be {w}x{h} px at --length {length}; "
                                 f"each side must be at least {images.MIN_SIDE} px")
    return h, w


def open_work(plan: VideoPlan) -> int:
    """Create or check the work folder; the number of frames already done (0..plan.frames)."""
    settings = plan.settings()
    target = plan.work / SETTINGS
    try:
        plan.work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StyleTransferError(f"cannot create the work folder {plan.work}: {exc.strerror or exc}") from None
    if target.exists():
        try:
            old = json.loads(target.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            raise StyleTransferError(f"{target} is unreadable; delete the work folder {plan.work} to start over")
        old_options = old.get("options") or {}
        changed = sorted(k for k in settings if k != "options" and old.get(k) != settings[k])
        changed += sorted(f"options.{k}" for k in set(settings["options"]) | set(old_options)
                          if old_options.get(k) != settings["options"].get(k))
        if changed:
            raise StyleTransferError(f"the work folder {plan.work} holds frames made with other settings "
                                     f"({', '.join(changed)}); delete it or give another --work-dir")
    else:
        write_json(target, settings, "the work folder's settings")
    done = 0
    while done < plan.frames and plan.report_path(done).exists() and plan.frame_path(done).exists():
        done += 1
    return done


@dataclass
class VideoResult:
    done: int  # frames finished, in the range
    interrupted: bool = False
    error: str | None = None


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0


def stylize_frames(plan: VideoPlan, transfer: Any, on_frame: OnFrame | None = None,
                   on_step: Callable[[Any], None] | None = None) -> VideoResult:
    """Stylize the frames not yet done. Ctrl-C during a frame ends the run with the finished frames kept."""
    from style_transfer.transfer import TemporalTarget

    done = open_work(plan)
    result = VideoResult(done=done)
    previous_input: np.ndarray | None = None
    for k, frame in enumerate(io.read_frames(plan.input, plan.start, plan.frames)):
        content = images.resize_to(frame.astype(np.float32) / 255.0, *plan.size)
        if k < done:
            previous_input = content
            continue
        started = time.perf_counter()
        options = {**plan.run_options, "length": max(plan.size)}
        temporal = None
        flow_stats: dict[str, Any] = {}
        if previous_input is not None:
            backward = flow.flow(content, previous_input)
            forward = flow.flow(previous_input, content)
            occluded = flow.occlusions(backward, forward)
            mask = flow.reliability(backward, occluded)
            new_shot = float(mask.mean()) < flow.NEW_SHOT_BELOW
            flow_stats = {"reliable": float(mask.mean()), "new_shot": new_shot,
                          "flow_seconds": time.perf_counter() - started}
            if not new_shot:  # a new shot is stylized as the first frame is
                # The previous stylized frame as saved (8-bit), as a resumed run has it.
                warped = np.clip(flow.warp(_load_rgb(plan.frame_path(k - 1)), backward), 0.0, 1.0)
                options["num_iters"] = plan.iters
                if plan.warp_init:
                    options["init"] = flow.warped_start(warped, content, occluded)
                if plan.temporal_weight > 0:
                    temporal = TemporalTarget(warped, mask, plan.temporal_weight)
        job = transfer.stylize(content, plan.styles, temporal=temporal, **options)
        outcome = job.run(on_step)
        if outcome.interrupted:
            result.interrupted = True
            return result
        if outcome.failed:
            result.error = f"frame {plan.start + k}: {outcome.error}"
            return result
        images.save_image(plan.frame_path(k), outcome.rgb)
        seconds = time.perf_counter() - started
        report = {**outcome.report, "frame": plan.start + k, "seconds_total": seconds, **flow_stats,
                  "temporal_weight": plan.temporal_weight if temporal is not None else 0.0}
        write_json(plan.report_path(k), report, "the frame report")
        result.done = k + 1
        if on_frame is not None:
            on_frame(k, outcome.evaluation.loss if outcome.evaluation is not None else None, seconds)
        previous_input = content
    return result


def assemble(plan: VideoPlan, output: Path) -> list[str]:
    """The finished frames as the output video (with the input's sound where it can be copied)."""
    frames = (np.rint(_load_rgb(plan.frame_path(k)) * 255).astype(np.uint8) for k in range(plan.frames))
    return io.write_video(output, frames, plan.info.fps, plan.audio)


def clip_summary(plan: VideoPlan) -> dict[str, Any]:
    """Per-frame reports of the range gathered: losses, seconds, and means after the first frame."""
    reports = [json.loads(plan.report_path(k).read_text()) for k in range(plan.frames)]
    later = reports[1:] or reports  # a range has at least one frame (cli.make_plan)
    return {"frames": len(reports), "fps": str(Fraction(plan.info.fps)), "width": plan.size[1],
            "height": plan.size[0], "start": plan.start, "seconds_first": reports[0]["seconds_total"],
            "seconds_per_frame_after_first": float(np.mean([r["seconds_total"] for r in later])),
            "mean_style_loss": float(np.mean([r["style_loss"] or 0.0 for r in reports])),
            "per_frame": [{k: r.get(k) for k in ("frame", "loss", "style_loss", "content_loss", "temporal_loss",
                                                  "reliable", "seconds_total")} for r in reports]}
