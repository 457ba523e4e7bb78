"""End to end on the real VGG16 weights in ../shared (slow; `-m "not slow"` leaves them out)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from style_transfer.cli import main
from tests.conftest import require_shared

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "models" / "vgg16_hed.caffemodel"
STYLE = SHARED / "images" / "style" / "starry_night.jpg"
CONTENT = SHARED / "images" / "content" / "tubingen.jpg"

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _shared_files() -> None:
    for path in (WEIGHTS, STYLE, CONTENT):
        require_shared(*path.relative_to(SHARED).parts)


def _run(tmp_path: Path, engine: str, *extra: str) -> tuple[dict[str, float], np.ndarray]:
    out = tmp_path / f"{engine}.png"
    report = tmp_path / f"{engine}.json"
    code = main(["-s", str(STYLE), "-c", str(CONTENT), "-m", "vgg16", "--weights", str(WEIGHTS), "-l", "96",
                 "-n", "25", "--pooling", "max", "-g", "-1", "--engine", engine, "-o", str(out), "--report",
                 str(report), *extra])
    assert code == 0
    return json.loads(report.read_text()), np.asarray(Image.open(out), dtype=np.float64) / 255


def test_real_weights_stylize_toward_the_style(tmp_path: Path) -> None:
    report, image = _run(tmp_path, "torch")
    assert (report["width"], report["height"]) == (96, 72)
    assert report["iterations"] == 25
    # Starting from the content image the style term dominates; 25 iterations must cut the loss by a lot.
    start, _ = _run(tmp_path, "torch", "-n", "1")
    assert report["loss"] < 0.25 * start["loss"]
    # Starry Night is blue: the result must be bluer than the photo.
    content = np.asarray(Image.open(CONTENT).convert("RGB").resize((96, 72)), dtype=np.float64) / 255
    assert image[..., 2].mean() - image[..., 0].mean() > content[..., 2].mean() - content[..., 0].mean() + 0.05


def test_real_weights_caffe_engine_agrees(tmp_path: Path) -> None:
    pytest.importorskip("caffe", reason="pycaffe not installed: PYTHON=.venv/bin/python bash scripts/install_caffe.sh")
    # The Caffe engine computes in fp32; the torch engine's default, auto, is bf16 on CPUs with AMX.
    torch_report, torch_image = _run(tmp_path, "torch", "--precision", "fp32")
    caffe_report, caffe_image = _run(tmp_path, "caffe")
    assert caffe_report["loss"] == pytest.approx(torch_report["loss"], rel=0.02)
    assert np.abs(caffe_image - torch_image).mean() < 2 / 255
