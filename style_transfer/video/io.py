"""Reading and writing video with PyAV.

PyAV rather than imageio-ffmpeg: its wheels carry the FFmpeg libraries (libx264 included) and it runs them in this
process, so decoding gives frames with their timestamps, and the input's audio packets can be copied into the output
as they are (remuxed, not re-encoded) in the same pass that encodes the video. imageio-ffmpeg pipes raw frames to an
`ffmpeg` executable and would need a second ffmpeg run, driven by command-line text, to carry the sound over.

Frames are RGB uint8 arrays, H x W x 3. Output: H.264 in mp4 (yuv420p, so even sizes; an odd row or column is
cropped), or an animated GIF/WebP for short clips. Every output is written to a temporary file beside the target and
renamed into place, so nothing appears under the output name until the whole video is there.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from style_transfer.errors import StyleTransferError
from style_transfer.util import check_writable, reason

ANIMATED_FORMATS = (".gif", ".webp")
OUTPUT_FORMATS = (".mp4", *ANIMATED_FORMATS)

# FFmpeg demuxers of still images: such an input is one picture, not a clip.
_IMAGE_DEMUXERS = ("image2", "_pipe", "gif", "webp")


class VideoError(StyleTransferError):
    """A video cannot be read or written."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    frames: int  # counted from the demuxed packets, not the header's estimate
    fps: Fraction
    audio_codec: str | None  # the first audio stream's codec, None without sound

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError("video needs PyAV: pip install av") from None
    return av


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[Any]:
    """The open container; FFmpeg's and the file system's failures as one-line VideoErrors."""
    av = _av()
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if path.is_dir():
        raise VideoError(f"{path} is a folder, not a video")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError(f"{path} is not a readable video: {reason(exc)}") from None
    try:
        yield container
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: cannot decode: {reason(exc)}") from None
    finally:
        container.close()


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Size, frame count, frame rate and sound of the first video stream; a VideoError for anything that is not a
    video with at least one frame."""
    target = Path(path)
    with _reading(target) as container:
        name = container.format.name or ""
        if any(part in name for part in _IMAGE_DEMUXERS) and not container.streams.audio:
            raise VideoError(f"{target} is a still image ({name}), not a video; stylize it with style.py -c")
        if not container.streams.video:
            raise VideoError(f"{target} has no video stream")
        stream = container.streams.video[0]
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = sum(1 for packet in container.demux(stream) if packet.size)
    if frames == 0:
        raise VideoError(f"{target} has no video frames")
    if not fps or fps <= 0:
        raise VideoError(f"{target} has no frame rate")
    return VideoInfo(target, int(width), int(height), frames, Fraction(fps), audio)


def read_frames(path: str | os.PathLike[str], start: int = 0, count: int | None = None) -> Iterator[np.ndarray]:
    """Frames start, start + 1, ... (0-based, in presentation order) as RGB uint8 arrays; at most `count`."""
    if count is not None and count <= 0:
        return
    with _reading(Path(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index >= start:
                yield frame.to_ndarray(format="rgb24")
                if count is not None and index + 1 >= start + count:
                    return


def check_output(path: str | os.PathLike[str], what: str = "-o/--output") -> Path:
    """A video output name this module can write, whose folder takes files; checked before any work."""
    target = Path(path)
    if target.suffix.lower() not in OUTPUT_FORMATS:
        raise VideoError(f"{what} {target}: use a {', '.join(OUTPUT_FORMATS)} file")
    try:
        return check_writable(target, what)
    except StyleTransferError as exc:
        raise VideoError(str(exc)) from None


@dataclass(frozen=True)
class AudioSource:
    """The sound to copy: the first audio stream of `path` from `start` seconds, for `duration` seconds."""

    path: Path
    start: float
    duration: float


def write_video(path: str | os.PathLike[str], frames: Iterable[np.ndarray], fps: Fraction | float,
                audio: AudioSource | None = None, crf: int = 18) -> list[str]:
    """Encode RGB uint8 frames (all one size) to `path` (.mp4: H.264; .gif/.webp: animated), atomically; with
    `audio`, its sound is copied alongside. Returns notices (e.g. sound that could not be copied)."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise VideoError(f"{target}: use a {', '.join(OUTPUT_FORMATS)} file")
    rate = Fraction(fps).limit_denominator(1001 * 1000)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=suffix, dir=target.parent)
    os.close(handle)
    notices: list[str] = []
    try:
        if suffix in ANIMATED_FORMATS:
            _write_animated(Path(temp_name), frames, rate)
            if audio is not None:
                notices.append(f"{target.suffix} has no sound track; the input's sound is left out")
        else:
            frames = list(frames)
            try:
                _write_mp4(Path(temp_name), frames, rate, audio, crf)
            except _AudioCopyError as exc:
                notices.append(f"the input's sound ({exc}) cannot be copied into an mp4; written without sound")
                _write_mp4(Path(temp_name), frames, rate, None, crf)
        # mkstemp makes the file private; the video gets any new file's mode (the umask is read by setting it).
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temp_name, 0o666 & ~mask)
        os.replace(temp_name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        av = _av()
        if isinstance(exc, (OSError, av.FFmpegError, ValueError)):
            raise VideoError(f"cannot write {target}: {reason(exc)}") from None
        raise
    return notices


class _AudioCopyError(Exception):
    pass


def _even(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    return np.ascontiguousarray(frame[: h - h % 2, : w - w % 2])


def _write_mp4(path: Path, frames: list[np.ndarray], rate: Fraction, audio: AudioSource | None, crf: int) -> None:
    av = _av()
    if not frames:
        raise ValueError("no frames to write")
    first = _even(frames[0])
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(av.open(str(path), mode="w", format="mp4"))
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height = first.shape[1], first.shape[0]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": str(crf), "preset": "medium"}
        audio_out = None
        if audio is not None:
            source = stack.enter_context(av.open(str(audio.path), mode="r"))
            if source.streams.audio:
                audio_in = source.streams.audio[0]
                try:
                    audio_out = out.add_stream_from_template(audio_in)
                    out.start_encoding()
                except (av.FFmpegError, ValueError) as exc:
                    raise _AudioCopyError(audio_in.codec_context.name) from exc
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(_even(rgb), format="rgb24")
            frame.pts = index
            frame.time_base = 1 / rate
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio is not None and audio_out is not None:
            _copy_audio(out, source, audio_in, audio_out, audio.start, audio.duration)


def _copy_audio(out: Any, source: Any, audio_in: Any, audio_out: Any, start: float, duration: float) -> None:
    """The audio packets whose time falls in [start, start + duration), shifted to begin at 0."""
    tb = audio_in.time_base
    first_pts: int | None = None
    for packet in source.demux(audio_in):
        if packet.pts is None or not packet.size:
            continue
        t = float(packet.pts * tb)
        if t < start:
            continue
        if t >= start + duration:
            break
        if first_pts is None:
            first_pts = packet.pts
        packet.pts -= first_pts
        packet.dts = packet.pts if packet.dts is None else packet.dts - first_pts
        packet.stream = audio_out
        out.mux(packet)


def _write_animated(path: Path, frames: Iterable[np.ndarray], rate: Fraction) -> None:
    from PIL import Image

    pictures = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    if not pictures:
        raise ValueError("no frames to write")
    duration = max(20, round(1000 / float(rate)))  # browsers slow down GIF frames shorter than 20 ms
    pictures[0].save(path, format=path.suffix[1:].upper(), save_all=True,
                     append_images=pictures[1:], duration=duration, loop=0)
