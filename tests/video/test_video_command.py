"""`style.py video` on tiny generated clips with the tiny test net: the output, resuming, sound, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from style_transfer import transfer
from style_transfer.cli import main
from style_transfer.video import io
from tests.conftest import require_shared
from tests.video.clips import panned, write_clip


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_clip(tmp_path / "clip.mp4", panned(8), fps=12, tone=330.0)


@pytest.fixture
def style(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    return tmp_path / "s.png"


def _args(clip: Path, style: Path, out: Path, tiny_args: list[str], *extra: str) -> list[str]:
    return ["video", str(clip), "-s", str(style), "-o", str(out), *tiny_args, "-l", "32", "-n", "6", "--iters", "3",
            "--seed", "1", *extra]


def _one_error_line(code: int, err: str, message: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err


def test_clip_is_stylized_with_sound_and_reports(tmp_path: Path, clip: Path, style: Path, tiny_args: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "v.mp4"
    report = tmp_path / "r.json"
    code = main(_args(clip, style, out, tiny_args, "--start", "2", "--frames", "5", "--report", str(report)))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == str(out)
    assert "frame 5/5 (#6)" in captured.err and "ETA" in captured.err
    info = io.probe(out)
    assert (info.width, info.height, info.frames, info.fps, info.audio_codec) == (32, 24, 5, 12, "aac")
    work = tmp_path / "out" / "v.mp4.work"
    reports = [json.loads((work / f"frame-{i:06d}.json").read_text()) for i in range(2, 7)]
    assert [r["iterations"] for r in reports] == [6, 3, 3, 3, 3]
    assert "temporal_loss" not in reports[0] or not reports[0]["temporal_loss"]
    assert all(r["temporal_loss"] > 0 and 0.5 < r["reliable"] <= 1 for r in reports[1:])
    summary = json.loads(report.read_text())
    assert summary["frames"] == 5 and len(summary["per_frame"]) == 5


class _CtrlC:
    """Ctrl-C in the middle of the n-th frame's optimisation (one iteration in)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, frame: int) -> None:
        self.calls = 0
        real = transfer.Stylization.run

        def run(job: transfer.Stylization, on_step: Any = None) -> transfer.RunResult:
            self.calls += 1
            if self.calls != frame:
                return real(job, on_step)

            def interrupt(step: Any) -> None:
                raise KeyboardInterrupt

            return real(job, interrupt)

        monkeypatch.setattr(transfer.Stylization, "run", run)


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(
        tmp_path: Path, clip: Path, style: Path, tiny_args: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    whole = tmp_path / "whole.mp4"
    assert main(_args(clip, style, whole, tiny_args)) == 0
    out = tmp_path / "cut.mp4"
    with monkeypatch.context() as patch:
        _CtrlC(patch, frame=4)
        assert main(_args(clip, style, out, tiny_args)) == 130
    err = capsys.readouterr().err
    assert "interrupted: 3 of 8 frame(s) done" in err
    assert not out.exists() and not any(p.name.startswith(".cut.mp4") for p in tmp_path.iterdir())
    work = tmp_path / "cut.mp4.work"
    assert sorted(p.name for p in work.glob("frame-*.json")) == [f"frame-{i:06d}.json" for i in range(3)]
    assert main(_args(clip, style, out, tiny_args)) == 0
    assert "carrying on from" in capsys.readouterr().err
    for i in range(8):
        a = np.asarray(Image.open(work / f"frame-{i:06d}.png"), dtype=float)
        b = np.asarray(Image.open(tmp_path / "whole.mp4.work" / f"frame-{i:06d}.png"), dtype=float)
        assert np.abs(a - b).max() <= 1, i
    assert io.probe(out).frames == 8
    # Done frames are not redone: a third run only assembles.
    _CtrlC(monkeypatch, frame=1)
    assert main(_args(clip, style, out, tiny_args)) == 0


def test_other_settings_are_refused_in_the_same_work_folder(tmp_path: Path, clip: Path, style: Path,
                                                            tiny_args: list[str],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v.mp4"
    assert main(_args(clip, style, out, tiny_args, "--frames", "2")) == 0
    capsys.readouterr()
    code = main(_args(clip, style, out, tiny_args, "--frames", "2", "--temporal-weight", "3"))
    _one_error_line(code, capsys.readouterr().err, "holds frames made with other settings (temporal_weight)")


def _empty_video(path: Path) -> Path:
    import av

    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()  # the header, with no frame after it
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("text", "is not a readable video"),
    ("empty", "no video"),
    ("start", "--start 8 is past the end: "),
    ("frames", "--start 5 --frames 4 goes past the end"),
    ("output", "cannot write -o/--output"),
    ("extension", "use a .mp4, .gif, .webp file"),
])
def test_bad_inputs(tmp_path: Path, clip: Path, style: Path, tiny_args: list[str], case: str, message: str,
                    capsys: pytest.CaptureFixture[str]) -> None:
    source, out, extra = clip, tmp_path / "o.mp4", []
    if case == "text":
        source = tmp_path / "t.mp4"
        source.write_text("hello\n")
    elif case == "empty":
        source = _empty_video(tmp_path / "e.mp4")
    elif case == "start":
        extra = ["--start", "8"]
    elif case == "frames":
        extra = ["--start", "5", "--frames", "4"]
    elif case == "output":
        out = clip / "o.mp4"
    elif case == "extension":
        out = tmp_path / "o.avi"
    code = main(_args(source, style, out, tiny_args, *extra))
    _one_error_line(code, capsys.readouterr().err, message)
    assert not out.exists() and not (tmp_path / "o.mp4.work").exists()


@pytest.mark.slow
def test_bikes_clip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A few frames of the shared clip at a small size with the real VGG16 weights."""
    bikes = require_shared("videos", "bikes.mp4")
    weights = require_shared("models", "vgg16_hed.caffemodel")
    style = Path(__file__).resolve().parents[2] / "images" / "style"
    styles = sorted(style.glob("*.jpg"))
    if not styles:
        pytest.skip("no style image shipped")
    out = tmp_path / "bikes.mp4"
    code = main(["video", str(bikes), "-s", str(styles[0]), "-o", str(out), "--weights", str(weights), "-g", "-1",
                 "-l", "96", "-n", "20", "--iters", "8", "--start", "10", "--frames", "4"])
    assert code == 0, capsys.readouterr().err
    info = io.probe(out)
    assert info.frames == 4 and info.fps == 25 and max(info.width, info.height) == 96


def test_a_cut_starts_a_new_shot_as_the_first_frame(tmp_path: Path, style: Path, tiny_args: list[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: across a cut a few chance flow matches are still "reliable", so the first frame of the new shot
    started from, and was held to, bits of the last shot's stylized picture (bikes.mp4, frame 30). A frame with
    little reliable flow now starts a new shot: the first frame's iterations and start, no temporal term."""
    first = panned(6)
    frames = first[:3] + [np.ascontiguousarray(255 - f[::-1, ::-1]) for f in first[3:]]
    clip = write_clip(tmp_path / "cut.mp4", frames, fps=12)
    calls: list[tuple[Any, Any]] = []
    real = transfer.StyleTransfer.stylize

    def spy(self: Any, content: np.ndarray, styles: Any, **kwargs: Any) -> Any:
        calls.append((kwargs.get("init"), kwargs.get("temporal")))
        return real(self, content, styles, **kwargs)

    monkeypatch.setattr(transfer.StyleTransfer, "stylize", spy)
    assert main(_args(clip, style, tmp_path / "v.mp4", tiny_args)) == 0
    work = tmp_path / "v.mp4.work"
    reports = [json.loads((work / f"frame-{i:06d}.json").read_text()) for i in range(6)]
    assert [r["iterations"] for r in reports] == [6, 3, 3, 6, 3, 3]
    assert [r.get("new_shot", False) for r in reports] == [False, False, False, True, False, False]
    assert reports[3]["reliable"] < 0.5 < min(r["reliable"] for i, r in enumerate(reports) if i not in (0, 3))
    starts_from_warp = [isinstance(init, np.ndarray) for init, _ in calls]
    assert starts_from_warp == [False, True, True, False, True, True]
    assert [temporal is not None for _, temporal in calls] == [False, True, True, False, True, True]


def test_picture_entering_the_frame_starts_from_the_input(
        tmp_path: Path, clip: Path, style: Path, tiny_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: each later frame started from the previous stylized frame warped, edge pixels repeated where
    the pan brings new picture in (the right column here), so new objects never appeared; there the start is now
    the input frame in the stylized frame's colours (one affine colour map of the input's pixels)."""
    starts: list[tuple[np.ndarray, np.ndarray]] = []
    real = transfer.StyleTransfer.stylize

    def spy(self: Any, content: np.ndarray, styles: Any, **kwargs: Any) -> Any:
        if isinstance(kwargs.get("init"), np.ndarray):
            starts.append((content, kwargs["init"]))
        return real(self, content, styles, **kwargs)

    monkeypatch.setattr(transfer.StyleTransfer, "stylize", spy)
    assert main(_args(clip, style, tmp_path / "v.mp4", tiny_args, "--frames", "3")) == 0
    assert len(starts) == 2
    for content, start in starts:
        source, entered = content[:, -1].astype(np.float64), start[:, -1].astype(np.float64)
        unclipped = ((entered > 0) & (entered < 1)).all(axis=1)
        assert unclipped.sum() > 8
        design = np.hstack([source, np.ones((len(source), 1))])[unclipped]
        fit = np.linalg.lstsq(design, entered[unclipped], rcond=None)[0]
        assert np.abs(design @ fit - entered[unclipped]).max() < 1e-4
        assert np.abs(entered - source).mean() > 0.02  # recoloured, not the photo's own colours
        assert np.abs(start - content).mean() > 0.02  # elsewhere it is the stylized frame, not the input
