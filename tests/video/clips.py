"""Tiny test clips: a real photo (images/content/chelsea.jpg) panned by a known shift per frame, optionally with a
generated tone as its sound track."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from style_transfer.video import io

ROOT = Path(__file__).resolve().parents[2]
PHOTO = ROOT / "images" / "content" / "chelsea.jpg"


def panned(frames: int, height: int = 48, width: int = 64, dx: int = 2, dy: int = 1) -> list[np.ndarray]:
    """Frame t is the window at (t * dy, t * dx) of the photo scaled down: frame t at p shows frame t - 1 at
    p + (dx, dy), so the backward flow is (dx, dy) everywhere and the right and bottom strips are new."""
    with Image.open(PHOTO) as photo:
        small = np.asarray(photo.convert("RGB").resize((width + dx * frames + 8, height + dy * frames + 8)))
    return [np.ascontiguousarray(small[t * dy: t * dy + height, t * dx: t * dx + width]) for t in range(frames)]


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 12, tone: float | None = None) -> Path:
    """An mp4 of the frames through the project's writer; with `tone` (Hz), first a sound-only mp4 of that sine
    (AAC, made with PyAV's audio frames) whose track the writer copies."""
    audio = None
    if tone is not None:
        sound = path.with_name(path.stem + "-tone.mp4")
        write_tone(sound, tone, len(frames) / fps + 0.5)
        audio = io.AudioSource(sound, 0.0, len(frames) / fps)
    io.write_video(path, frames, Fraction(fps), audio)
    return path


def write_tone(path: Path, hz: float, seconds: float, rate: int = 22050) -> None:
    import av

    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        t = np.arange(int(seconds * rate)) / rate
        samples = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
        chunk = 1024
        for i in range(0, len(samples), chunk):
            part = samples[i: i + chunk]
            frame = av.AudioFrame.from_ndarray(part[None, :], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def audio_samples(path: Path) -> np.ndarray:
    """The first audio stream decoded, mono float."""
    import av

    with av.open(str(path)) as container:
        parts = [f.to_ndarray().mean(axis=0) for f in container.decode(audio=0)]
    return np.concatenate(parts) if parts else np.zeros(0)
