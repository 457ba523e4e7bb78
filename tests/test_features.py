"""Creative options: scales, several styles, colours, TV, saves, animation, Ctrl-C, reproducibility."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from style_transfer.cli import main
from style_transfer.errors import StyleTransferError
from style_transfer.transfer import StyleTransfer, scale_plan
from tests import tinynets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def transfer(tmp_path: Path) -> StyleTransfer:
    proto, model = tinynets.write_net(tmp_path)
    return StyleTransfer(prototxt=proto, weights=model, style_layers="conv1,conv2", content_layers="conv3", gpu=-1)


def _images(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:36, 0:48] / 48.0
    content = np.stack([xx, yy, 0.5 * (xx + yy)], -1).astype(np.float32)
    style_a = rng.uniform(0, 1, (30, 30, 3)).astype(np.float32)
    style_b = np.clip(np.sin(np.mgrid[0:30, 0:30].sum(0) / 2.0)[..., None] * [0.5, 0.2, 0.9] + 0.5, 0, 1)
    return content, style_a, style_b.astype(np.float32)


def _run(st: StyleTransfer, content: np.ndarray, styles: list[np.ndarray], **kw: object) -> np.ndarray:
    run = st.stylize(content, styles, length=32, iterations=kw.pop("iterations", 8), **kw)  # type: ignore[arg-type]
    for _ in run.steps():
        pass
    assert run.result.image is not None
    return run.result.image


def test_scale_plan() -> None:
    assert scale_plan(512, 1, None, 512) == [(512, 512)]
    plan = scale_plan(512, 2, 256, 180)
    assert [s for s, _ in plan] == [256, 512] and sum(n for _, n in plan) == 180 and plan[0][1] > plan[1][1]
    plan = scale_plan(512, 3, None, 90)
    assert [s for s, _ in plan] == [128, 256, 512] and sum(n for _, n in plan) == 90


def test_multiscale_ends_at_full_size(transfer: StyleTransfer) -> None:
    content, style, _ = _images()
    run = transfer.stylize(content, [style], length=40, iterations=9, scales=3, min_length=24)
    sizes = {}
    for step in run.steps():
        sizes.setdefault(step.scale, step.image.shape)
    assert sorted(sizes) == [0, 1, 2]
    assert sizes[2] == (3, 30, 40)
    assert sizes[0][2] == 24
    assert run.result.image is not None and run.result.image.shape == (3, 30, 40)


def test_too_small_first_scale_names_min_length(transfer: StyleTransfer) -> None:
    content, style, _ = _images()
    with pytest.raises(StyleTransferError, match="--min-length"):
        transfer.stylize(content, [style], length=40, iterations=9, scales=2, min_length=16)


def test_blend_one_to_zero_equals_single_style(transfer: StyleTransfer) -> None:
    content, a, b = _images()
    single = _run(transfer, content, [a])
    blended = _run(transfer, content, [a, b], style_blend=[1.0, 0.0])
    mixed = _run(transfer, content, [a, b], style_blend=[0.5, 0.5])
    np.testing.assert_allclose(blended, single, atol=1e-3)
    assert not np.allclose(mixed, single, atol=1e-1)


def test_seed_reproducible(transfer: StyleTransfer) -> None:
    content, a, _ = _images()
    one = _run(transfer, content, [a], init="1", seed=5)
    two = _run(transfer, content, [a], init="1", seed=5)
    other = _run(transfer, content, [a], init="1", seed=6)
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(one, other)


def _tv(x: np.ndarray) -> float:
    return float(np.sum(np.diff(x, axis=1) ** 2) + np.sum(np.diff(x, axis=2) ** 2))


def test_tv_weight_lowers_total_variation(transfer: StyleTransfer) -> None:
    content, a, _ = _images()
    plain = _run(transfer, content, [a], init="0", seed=1, iterations=20)
    smooth = _run(transfer, content, [a], init="0", seed=1, iterations=20, tv_weight=10.0)
    assert _tv(smooth) < 0.5 * _tv(plain)


def _tiny_args(tmp_path: Path) -> list[str]:
    proto, model = tinynets.write_net(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    return ["-s", str(tmp_path / "s.png"), "-c", str(tmp_path / "c.png"), "--prototxt", str(proto), "--weights",
            str(model), "--style-layers", "conv1,conv2", "--content-layers", "conv3", "-g", "-1", "-l", "32"]


def test_save_every_and_animation(tmp_path: Path) -> None:
    out = tmp_path / "o" / "out.png"
    code = main([*_tiny_args(tmp_path), "-n", "9", "--save-every", "3", "--animation", str(tmp_path / "a.gif"),
                 "-o", str(out), "--original-colors"])
    assert code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out-0003.png", "out-0006.png", "out-0009.png",
                                                            "out.png"]
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames >= 4 and gif.size == (32, 24)


def test_ctrl_c_saves_current_image_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    args = [*_tiny_args(tmp_path), "-n", "100000", "--save-every", "1", "-o", str(out), "--lbfgs-memory", "3",
            "-i", "1", "--seed", "2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "style.py"), *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not (tmp_path / "out-0002.png").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert out.exists() and Image.open(out).size == (32, 24)
    assert "interrupted" in err and "Traceback" not in err
