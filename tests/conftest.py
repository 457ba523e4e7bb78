"""Fixtures shared by the test files: a tiny Caffe net written by the tests, small images, and ../shared."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.weights import shared_dir
from tests import tinynets

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_dir(ROOT)  # ../shared, or beside the main checkout when this is a git worktree


def require_shared(*parts: str) -> Path:
    """A file under ../shared; tests that need it skip without it, except in CI (CI=true), where they fail."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing (../shared beside the checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tiles and small inputs on shared cores: one torch thread is faster than several waiting for each
    other. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_net(tmp_path: Path) -> tuple[Path, Path]:
    """tiny.prototxt and tiny.caffemodel (random weights, max pooling) in the test's folder."""
    return tinynets.write_net(tmp_path)


@pytest.fixture
def tiny_args(tiny_net: tuple[Path, Path]) -> list[str]:
    """style.py flags that select the tiny net on the CPU."""
    proto, model = tiny_net
    return ["--prototxt", str(proto), "--weights", str(model), "--style-layers", "conv1,conv2",
            "--content-layers", "conv3", "-g", "-1"]


def tiny_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth 36x48 content image and two 30x30 styles (noise, stripes), RGB float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:36, 0:48] / 48.0
    content = np.stack([xx, yy, 0.5 * (xx + yy)], -1).astype(np.float32)
    style_a = rng.uniform(0, 1, (30, 30, 3)).astype(np.float32)
    style_b = np.clip(np.sin(np.mgrid[0:30, 0:30].sum(0) / 2.0)[..., None] * [0.5, 0.2, 0.9] + 0.5, 0, 1)
    return content, style_a, style_b.astype(np.float32)


@pytest.fixture
def image_files(tmp_path: Path) -> tuple[Path, Path]:
    """s.png (30x30 noise) and c.png (48x36 noise) in the test's folder."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    return tmp_path / "s.png", tmp_path / "c.png"
