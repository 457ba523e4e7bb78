"""style.py end to end on a tiny net, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from style_transfer.cli import main
from tests import tinynets

ROOT = Path(__file__).resolve().parents[1]


def run_style(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "style.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=300)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    style = tmp_path / "style.png"
    content = tmp_path / "content.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(style)
    yy, xx = np.mgrid[0:48, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)).save(content)
    return style, content


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    proto, model = tinynets.write_net(tmp_path, "v1", "input_dim")
    return ["--prototxt", str(proto), "--weights", str(model), "--style-layers", "conv1:0.5,conv2:0.5",
            "--content-layers", "conv3", "-g", "-1"]


def test_run_writes_image_and_report(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str]) -> None:
    style, content = pair
    out = tmp_path / "sub" / "out.png"
    report = tmp_path / "r.json"
    res = run_style("-s", str(style), "-c", str(content), *tiny, "-l", "32", "-n", "5", "-o", str(out),
                    "--report", str(report))
    assert res.returncode == 0, res.stderr
    img = Image.open(out)
    assert img.size == (32, 24)
    data = json.loads(report.read_text())
    for key in ("engine", "device", "width", "height", "iterations", "evaluations", "loss", "style_loss",
                "content_loss", "seconds", "seconds_per_evaluation"):
        assert key in data
    assert data["engine"] == "torch" and data["device"] == "cpu"
    assert (data["width"], data["height"]) == (32, 24)
    assert 1 <= data["iterations"] <= 5 and data["evaluations"] >= data["iterations"]
    assert data["loss"] == pytest.approx(data["style_loss"] + data["content_loss"], rel=1e-5)
    assert "Traceback" not in res.stderr


def test_half_precision_run_reports_it_and_lands_near_fp32(tmp_path: Path, pair: tuple[Path, Path],
                                                          tiny: list[str]) -> None:
    style, content = pair
    results = {}
    for precision in ("fp32", "bf16"):
        report = tmp_path / f"{precision}.json"
        res = run_style("-s", str(style), "-c", str(content), *tiny, "-l", "32", "-n", "8", "--precision", precision,
                        "-o", str(tmp_path / f"{precision}.png"), "--report", str(report))
        assert res.returncode == 0, res.stderr
        results[precision] = json.loads(report.read_text())
    assert results["bf16"]["precision"] == "bf16" and results["fp32"]["precision"] == "fp32"
    # bfloat16 keeps 8 bits of mantissa: the same optimisation lands at a similar, not identical, objective.
    assert results["bf16"]["loss"] == pytest.approx(results["fp32"]["loss"], rel=0.1)
    assert results["bf16"]["loss"] != results["fp32"]["loss"]


def test_default_output_name(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str]) -> None:
    style, content = pair
    res = run_style("-s", str(style), "-c", str(content), *tiny, "-l", "24", "-n", "2", "-r", "1e3", "-i", "mixed",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "outputs" / "content-style-tiny-v1-input_dim-mixed-1e3-2.jpg").exists()


def test_noise_init_is_reproducible_with_seed(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str]) -> None:
    style, content = pair
    outs = []
    for i, seed in enumerate(["3", "3", "4"]):
        out = tmp_path / f"o{i}.png"
        res = run_style("-s", str(style), "-c", str(content), *tiny, "-l", "24", "-n", "3", "-i", "1",
                        "--seed", seed, "-o", str(out))
        assert res.returncode == 0, res.stderr
        outs.append(np.asarray(Image.open(out)))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize(("extra", "message"), [
    (["-n", "0"], "-n/--num-iters must be at least 1"),
    (["-n", "ten"], "whole number"),
    (["-r", "abc"], "-r/--ratio needs a number"),
    (["-r", "-5"], "-r/--ratio must be"),
    (["-l", "4"], "-l/--length"),
    (["--style-scale", "0"], "--style-scale"),
    (["--pooling", "min"], "--pooling"),
    (["-i", "nonsense"], "-i/--init"),
    (["--style-layers", "conv9"], "no blob 'conv9'"),
    (["--engine", "tf"], "--engine"),
    (["--precision", "fp8"], "--precision"),
    (["--engine", "caffe", "--precision", "bf16"], "--precision bf16 needs the torch engine"),
    (["-o", "out.xyz"], "xyz"),
])
def test_bad_flags_give_one_line_errors(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str], extra: list[str],
                                        message: str, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    style, content = pair
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["-s", str(style), "-c", str(content), *tiny, "-n", "2", "-l", "24", *extra])
    except SystemExit as exc:  # argparse's own exit
        code = exc.code  # type: ignore[assignment]
    assert code not in (0, None)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message in lines[0]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_missing_files_and_models(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str]) -> None:
    style, content = pair
    cases = [
        (["-s", str(tmp_path / "nope.jpg"), "-c", str(content), *tiny], "nope.jpg"),
        (["-s", str(style), "-c", str(tmp_path / "gone.png"), *tiny], "gone.png"),
        (["-s", str(style), "-c", str(content), "-m", "vgg99", "-g", "-1"], "known models: vgg19, vgg16"),
        (["-s", str(style), "-c", str(content), "-m", "vgg19", "-g", "-1", "--models-dir", str(tmp_path / "m")],
         "download_models.sh vgg19"),
    ]
    for args, message in cases:
        res = run_style(*args, "-n", "1", "-o", str(tmp_path / "o.png"))
        assert res.returncode != 0
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], res.stderr
        assert not (tmp_path / "o.png").exists()
