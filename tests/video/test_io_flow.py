"""Video reading and writing, optical flow, warping and the reliability masks, on clips with known motion."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from style_transfer.video import flow, io
from tests.video.clips import audio_samples, panned, write_clip, write_tone


def test_round_trip_keeps_size_rate_and_count(tmp_path: Path) -> None:
    frames = panned(10)
    path = write_clip(tmp_path / "c.mp4", frames, fps=12)
    info = io.probe(path)
    assert (info.width, info.height, info.frames, info.fps, info.has_audio) == (64, 48, 10, Fraction(12), False)
    back = list(io.read_frames(path, 3, 4))
    assert len(back) == 4
    # H.264 at crf 18 is lossy but close.
    assert np.abs(back[0].astype(float) - frames[3]).mean() < 6


def test_odd_sizes_are_cropped_to_even_and_nothing_half_written(tmp_path: Path) -> None:
    frames = [f[:47, :63] for f in panned(3)]
    io.write_video(tmp_path / "o.mp4", frames, 10)
    info = io.probe(tmp_path / "o.mp4")
    assert (info.width, info.height) == (62, 46)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]


def test_audio_is_copied_for_the_frame_range(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", panned(12), fps=12, tone=440.0)
    info = io.probe(clip)
    assert info.audio_codec == "aac"
    out = tmp_path / "o.mp4"
    frames = list(io.read_frames(clip, 2, 6))
    assert io.write_video(out, frames, info.fps, io.AudioSource(clip, 2 / 12, 6 / 12)) == []
    assert io.probe(out).audio_codec == "aac"
    sound = audio_samples(out)
    # Half a second of sound (AAC packets are 1024 samples, so within a packet or two), still the 440 Hz tone.
    assert abs(len(sound) / 22050 - 0.5) < 0.1
    spectrum = np.abs(np.fft.rfft(sound))
    assert abs(np.argmax(spectrum) * 22050 / len(sound) - 440) < 10


def test_gif_output(tmp_path: Path) -> None:
    from PIL import Image

    io.write_video(tmp_path / "o.gif", panned(4), 10)
    with Image.open(tmp_path / "o.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (64, 48)


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 10)
    with pytest.raises(io.VideoError, match="is not a readable video"):
        io.probe(tmp_path / "text.mp4")
    with pytest.raises(io.VideoError, match="no such file"):
        io.probe(tmp_path / "missing.mp4")
    from PIL import Image

    Image.fromarray(panned(1)[0]).save(tmp_path / "still.png")
    with pytest.raises(io.VideoError, match="still image"):
        io.probe(tmp_path / "still.png")
    write_tone(tmp_path / "sound.mp4", 440.0, 0.5)
    with pytest.raises(io.VideoError, match="no video stream"):
        io.probe(tmp_path / "sound.mp4")
    with pytest.raises(io.VideoError, match=r"use a \.mp4"):
        io.check_output(tmp_path / "o.avi")
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(io.VideoError, match="is a folder"):
        io.check_output(tmp_path / "d.mp4")
    # Unwritable: the folder would have to be made inside a file (permission bits mean nothing to root).
    with pytest.raises(io.VideoError, match="cannot write -o/--output"):
        io.check_output(tmp_path / "text.mp4" / "o.mp4")


def test_flow_of_a_known_shift_and_its_masks() -> None:
    a, b = panned(2, dx=3, dy=2)
    backward, forward = flow.flow(b, a), flow.flow(a, b)
    inner = (slice(6, -6), slice(6, -6))
    error = np.sqrt(np.sum((backward[inner] - [3, 2]) ** 2, axis=2))
    assert error.mean() < 0.25
    assert np.sqrt(np.sum((forward[inner] + [3, 2]) ** 2, axis=2)).mean() < 0.25
    mask = flow.reliability(backward, flow.occlusions(backward, forward))
    # The strips that come into view (right 3 columns, bottom 2 rows) are not in the previous frame.
    assert mask[:, -3:].mean() < 0.1 and mask[-2:, :].mean() < 0.1
    assert mask[inner].mean() > 0.95
    # Warping the previous frame by the backward flow gives this frame where the mask trusts it.
    warped = flow.warp(a.astype(np.float32), backward)
    assert np.abs(warped - b)[mask > 0].mean() < 6
    assert flow.warping_error(b, a, backward, mask) < flow.warping_error(b, a, np.zeros_like(backward), mask) / 4


def _affine_fit(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """The least-squares affine colour map source -> target (N x 3 each) and its largest residual."""
    design = np.hstack([source, np.ones((len(source), 1))]).astype(np.float64)
    coefficients = np.linalg.lstsq(design, target.astype(np.float64), rcond=None)[0]
    return coefficients, float(np.abs(design @ coefficients - target).max())


def test_warped_start_takes_new_picture_from_the_input_in_the_stylized_colours() -> None:
    """Regressions: the strips entering the frame started as the warp's repeated edge pixels, which a short
    optimisation left as streaks (and new objects never appeared); then as the input photo itself, whose colours
    stayed a pale band beside the stylized picture for several frames. They now start from the input frame under
    one colour map that gives it the trusted stylized picture's mean and covariance."""
    a, b = panned(2, dx=3, dy=2)
    backward, forward = flow.flow(b, a), flow.flow(a, b)
    rng = np.random.default_rng(0)
    # A "stylized" previous frame: the input's structure in other colours, plus texture.
    mix = np.array([[0.2, 0.5, 0.1], [0.1, 0.1, 0.6], [0.5, 0.2, 0.1]])
    previous = np.clip(a.astype(np.float32) / 255 @ mix.T.astype(np.float32) + 0.15
                       + rng.normal(0, 0.02, a.shape).astype(np.float32), 0, 1)
    current = b.astype(np.float32) / 255
    occluded = flow.occlusions(backward, forward)
    assert occluded[:, -3:].mean() > 0.9 and occluded[-2:, :].mean() > 0.9
    warped = np.clip(flow.warp(previous, backward), 0, 1)
    start = flow.warped_start(warped, current, occluded)
    assert start.dtype == np.float32 and start.shape == current.shape
    np.testing.assert_array_equal(start[~occluded], warped[~occluded])
    # The new strips are the input under one affine colour map (the picture, not streaks)...
    new, source = start[occluded], current[occluded]
    unclipped = ((new > 0) & (new < 1)).all(axis=1)
    coefficients, residual = _affine_fit(source[unclipped], new[unclipped])
    assert residual < 1e-4
    assert np.abs(new - source).mean() > 0.05  # ... that is not the identity
    # ... and that gives the whole input the colours of the trusted stylized picture, not the photo's.
    pixels = current.reshape(-1, 3)
    mapped = np.hstack([pixels, np.ones((len(pixels), 1))]) @ coefficients
    trusted = warped[~occluded]
    assert np.abs(mapped.mean(0) - trusted.mean(0)).max() < 0.01 < 0.05 < np.abs(pixels.mean(0) - trusted.mean(0)).max()
    np.testing.assert_allclose(np.cov(mapped, rowvar=False), np.cov(trusted, rowvar=False), atol=2e-3)
    # A frame with nothing in common with the last (a cut) starts from the input as it is.
    np.testing.assert_array_equal(flow.warped_start(warped, current, np.ones_like(occluded)), current)
    np.testing.assert_array_equal(flow.warped_start(warped, current, np.zeros_like(occluded)), warped)


def test_occluded_object_and_motion_boundary() -> None:
    """A square moving right over a still photo: the background it uncovers is occluded in the previous frame,
    and the square's edges are motion boundaries."""
    background = panned(1, height=64, width=64)[0]
    square = np.full((16, 16, 3), 250, np.uint8)
    frames = []
    for x in (20, 26):
        frame = background.copy()
        frame[24:40, x:x + 16] = square
        frame[24:40, x:x + 16, 0] = np.arange(16, dtype=np.uint8)[None, :] * 15  # texture for the flow to follow
        frames.append(frame)
    backward, forward = flow.flow(frames[1], frames[0]), flow.flow(frames[0], frames[1])
    unreliable = flow.reliability(backward, flow.occlusions(backward, forward)) < 0.5
    # The uncovered strip, columns 20..25 of rows 24..39: mostly flagged; the far background: mostly trusted.
    assert unreliable[26:38, 21:25].mean() > 0.6
    assert unreliable[:12, :].mean() < 0.1 and unreliable[52:, :].mean() < 0.1
