"""style.py end to end on a tiny net, and its one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from style_transfer import images
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


# ------------------------------------------------------------------------------------ defects, each with its test


def _one_error_line(code: int | None, err: str, message: str) -> None:
    assert code not in (0, None)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]


def _main(args: list[str]) -> int | None:
    try:
        return main(args)
    except SystemExit as exc:  # argparse's own exit
        return exc.code  # type: ignore[return-value]


@pytest.mark.parametrize(("extra", "message"), [
    (["-i", "nan"], "-i/--init noise exponent must be a finite number >= 0"),
    (["-i", "inf"], "-i/--init noise exponent must be a finite number >= 0"),
    (["-i", "-1"], "-i/--init noise exponent must be a finite number >= 0"),
    (["--min-length", "20"], "--min-length sets the smallest of several --scales"),
    (["-l", "64", "--scales", "3", "-n", "9"], "repeats sizes (64, 64, 64)"),
    (["-l", "64", "--style-scale", "0.3"], "--style-scale 0.3 x --length 64 = 19"),
    (["--style-layers", "conv1:abc"], "the weight of 'conv1' must be a number, got 'abc'"),
    (["--animation", "a.avi"], "use a .gif, .webp, .png"),
])
def test_defects_give_the_right_one_line_error(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str],
                                               extra: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    style, content = pair
    monkeypatch.chdir(tmp_path)
    code = _main(["-s", str(style), "-c", str(content), *tiny, "-n", "2", "-l", "24", *extra])
    _one_error_line(code, capsys.readouterr().err, message)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_animation_may_not_replace_the_output(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    style, content = pair
    out = tmp_path / "o.png"
    code = _main(["-s", str(style), "-c", str(content), *tiny, "-n", "2", "-l", "24", "-o", str(out),
                  "--animation", str(out)])
    _one_error_line(code, capsys.readouterr().err, "is the output image itself")
    assert not out.exists()


def test_unwritable_report_is_found_before_the_run(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    style, content = pair
    if os.geteuid() == 0:
        report = Path("/proc/style-transfer-report.json")  # root may write anywhere but into /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        report = locked / "r.json"
    out = tmp_path / "o.png"
    code = _main(["-s", str(style), "-c", str(content), *tiny, "-n", "2", "-l", "24", "-o", str(out),
                  "--report", str(report)])
    _one_error_line(code, capsys.readouterr().err, "--report")
    assert not out.exists()


def test_default_output_name_keeps_a_fractional_init(tmp_path: Path, pair: tuple[Path, Path],
                                                     tiny: list[str]) -> None:
    style, content = pair
    res = run_style("-s", str(style), "-c", str(content), *tiny, "-l", "24", "-n", "1", "-i", "0.5", "--seed", "1",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "outputs" / "content-style-tiny-v1-input_dim-0.5-1e4-1.jpg").exists(), res.stdout


def test_verbose_losses_go_to_stderr_and_stdout_is_only_the_output(tmp_path: Path, pair: tuple[Path, Path],
                                                                   tiny: list[str]) -> None:
    style, content = pair
    out = tmp_path / "o.png"
    res = run_style("-s", str(style), "-c", str(content), *tiny, "-l", "24", "-n", "10", "-v", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(out)]
    assert "iter 10: loss=" in res.stderr


def test_fp16_on_the_cpu_says_it_is_slow(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str]) -> None:
    style, content = pair
    res = run_style("-s", str(style), "-c", str(content), *tiny, "-l", "24", "-n", "1", "--precision", "fp16",
                    "-o", str(tmp_path / "o.png"))
    assert res.returncode == 0, res.stderr
    assert "fp16 has no fast kernels on the CPU" in res.stderr


def test_help_names_batch_and_says_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "style.py batch MANIFEST.csv" in " ".join(text.split())
    entries: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith("     "):
            entries[-1] += " " + line.strip()
    assert len(entries) > 30
    for entry in entries:
        assert entry.count("default") <= 1, entry


def test_save_every_and_animation(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str]) -> None:
    style, content = pair
    out = tmp_path / "o" / "out.png"
    code = main(["-s", str(style), "-c", str(content), *tiny, "-l", "32", "-n", "9", "--save-every", "3",
                 "--animation", str(tmp_path / "a.gif"), "-o", str(out), "--original-colors"])
    assert code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out-0003.png", "out-0006.png", "out-0009.png",
                                                            "out.png"]
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames >= 4 and gif.size == (32, 24)


# The child makes its 12th evaluation (a few iterations in) long, the real evaluation many times over, and says so
# in a file; the parent then sends SIGINT, which lands in the middle of that evaluation. SIGINT's disposition is
# set in the child, since a test runner started in the background of a non-interactive shell passes it on ignored.
_SLOW_CHILD = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
from typing import Any
from style_transfer import transfer
from style_transfer.cli import main
marker = Path(sys.argv[1])
real = transfer.Stylization._bound
def slow(self, engine, objective, plan):
    evaluate = real(self, engine, objective, plan)
    count = [0]
    def wrapped(image):
        count[0] += 1
        if count[0] == 12:
            marker.write_text("in evaluation 12")
            for _ in range(2000):
                evaluate(image)
        return evaluate(image)
    return wrapped
transfer.Stylization._bound = slow
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_in_the_middle_of_an_evaluation_saves_and_exits_130(tmp_path: Path, pair: tuple[Path, Path],
                                                                   tiny: list[str]) -> None:
    style, content = pair
    out = tmp_path / "out.png"
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, str(marker), "-s", str(style), "-c", str(content),
                             *tiny, "-l", "64", "-n", "1000", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "Traceback" not in err and "terminate" not in err
    assert Image.open(out).size == (64, 48)


def test_cli_passes_every_run_option_to_the_library(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str]) -> None:
    """The CLI's image is the library's for the same options: colour match, original colours, noise, blend, scale."""
    from style_transfer import images
    from style_transfer.transfer import StyleTransfer

    style, content = pair
    out = tmp_path / "o.png"
    flags = ["--color-match", "meancov", "--original-colors", "-i", "1", "--seed", "3", "--style-scale", "1.5",
             "-r", "3e3", "--tv-weight", "0.01", "--lbfgs-memory", "4", "--pooling", "avg"]
    assert main(["-s", str(style), str(content), "-c", str(content), *tiny, "-l", "32", "-n", "6", "-o", str(out),
                 "--style-weights", "2", "1", *flags]) == 0
    proto, weights = tiny[1], tiny[3]
    st = StyleTransfer(prototxt=proto, weights=weights, style_layers="conv1,conv2", content_layers="conv3", gpu=-1,
                       pooling="avg")
    result = st.stylize(images.load_image(content), [images.load_image(style), images.load_image(content)],
                        length=32, num_iters=6, color_match="meancov", original_colors=True, init="1", seed=3,
                        style_scale=1.5, ratio="3e3", tv_weight=0.01, lbfgs_memory=4, style_weights=[2, 1]).run()
    expected = np.rint(np.clip(result.rgb, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


def test_animation_as_mp4(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str]) -> None:
    """--animation out.mp4 goes through the video writer: H.264 at the final size (rounded down to even sides)."""
    from style_transfer.video import io

    style, content = pair
    out = tmp_path / "out.png"
    code = main(["-s", str(style), "-c", str(content), *tiny, "-l", "32", "-n", "9",
                 "--animation", str(tmp_path / "a.mp4"), "-o", str(out)])
    assert code == 0
    info = io.probe(tmp_path / "a.mp4")
    assert info.frames >= 4 and (info.width, info.height) == (32, 24) and info.fps == 10


# ------------------------------------------------------------------------------------------- big outputs


def test_scales_auto_and_verbose_show_the_plan_and_the_time(tmp_path: Path, pair: tuple[Path, Path],
                                                           tiny: list[str], capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from style_transfer import memory

    style, content = pair
    monkeypatch.setattr(memory, "run_bytes", lambda *args: 0)  # a budget of a few tiles' worth forces tiling
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    report = tmp_path / "r.json"
    code = main(["-s", str(style), "-c", str(content), *tiny, "-l", "64", "--min-length", "32", "-n", "12",
                 "--scales", "auto", "-v", "--max-memory", "0.0003", "-o", str(tmp_path / "o.png"),
                 "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "plan: 2 scale(s), 12 iterations" in err
    assert "  scale 1: 32x24, 10 iterations, whole" in err
    assert "  scale 2: 64x48, 2 iterations, " in err and "tiles, " in err
    assert "in all at the" in err  # the estimate of the whole run, once some evaluations are timed
    data = json.loads(report.read_text())
    assert [(s["length"], s["iterations"]) for s in data["scales"]] == [(32, 10), (64, 2)]
    assert data["scales"][1]["tiling"]["tiles"] >= 2 and data["options"]["scales"] == "auto"


def test_a_scale_that_cannot_start_keeps_the_earlier_scales_work(
        tmp_path: Path, pair: tuple[Path, Path], tiny: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a later scale that could not start (its memory no longer there) ended the run with an error and
    nothing saved, after all the earlier scales' work. Now the last finished scale is saved beside the output, never
    under its name, and the error says where."""
    from style_transfer import memory
    from style_transfer.errors import StyleTransferError

    style, content = pair
    real = memory.choose_tiles
    started: list[int] = []

    def choose(net: Any, pooling: Any, height: int, width: int, *args: Any, **kwargs: Any) -> Any:
        if width == 64 and len(started) > 0:  # the plan at the start fits; when scale 2 starts, memory is gone
            raise StyleTransferError("--max-memory 1 is too small for a 64x48 image with this net")
        return real(net, pooling, height, width, *args, **kwargs)

    monkeypatch.setattr(memory, "choose_tiles", choose)
    monkeypatch.setattr(memory, "release_free_memory", lambda: started.append(1))
    output = tmp_path / "o.png"
    code = main(["-s", str(style), "-c", str(content), *tiny, "-l", "64", "--min-length", "32", "-n", "6",
                 "--scales", "2", "--max-memory", "1", "-o", str(output)])
    err = capsys.readouterr().err
    assert code == 1
    assert not output.exists()
    kept = tmp_path / "o-32x24.png"
    assert images.load_image(kept).shape == (24, 32, 3)
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "scale 2 of 2 (64x48)" in lines[0] and str(kept) in lines[0]


def test_a_big_single_scale_run_suggests_auto(tmp_path: Path, pair: tuple[Path, Path], tiny: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    style, content = pair
    code = main(["-s", str(style), "-c", str(content), *tiny, "-l", "1100", "-n", "1", "-o",
                 str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "-l 1100 in one scale" in err and "--scales auto" in err
    code = main(["-s", str(style), "-c", str(content), *tiny, "-l", "64", "-n", "1", "-o", str(tmp_path / "p.png")])
    assert "--scales auto" not in capsys.readouterr().err


class FakeBar:
    def __init__(self) -> None:
        self.postfix: dict[str, str] = {}
        self.written: list[str] = []

    def set_postfix(self, fields: dict[str, str], refresh: bool = True) -> None:
        self.postfix = dict(fields)

    def write(self, text: str, file: object = None) -> None:
        self.written.append(text)


def test_status_shows_tiles_and_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    from style_transfer import cli
    from style_transfer.plan import Progress

    def progress(**changes: object) -> Progress:
        base: dict[str, object] = dict(scale=3, scales=4, width=4096, height=3072, iteration=507, iterations=512,
                                       evaluations=2, stage="evaluation", tile_pass=2, tile=7, tiles=12,
                                       elapsed=2460.0, remaining=None, flops_per_second=None)
        return Progress(**{**base, **changes})  # type: ignore[arg-type]

    bar = FakeBar()
    status = cli.Status(bar, verbose=True)
    status.loss = "1.5e+08"
    status.update(progress())
    assert bar.postfix == {"loss": "1.5e+08", "scale": "4/4", "tiles": "pass 2/2 7/12"} and not bar.written
    status.update(progress(evaluations=3, remaining=390.0, flops_per_second=2.5e11))
    assert bar.postfix["left"] == "6m30s"
    assert bar.written == ["style.py: about 47m30s in all at the 250 GFLOP/s measured so far"]
    monkeypatch.setattr(cli, "STATUS_EVERY", 0.0)
    status.update(progress(evaluations=4, remaining=300.0, flops_per_second=2.5e11))
    assert bar.written[-1] == ("style.py: scale 4/4 (4096x3072), iteration 507/512, evaluation 4 (pass 2/2, tile 7 "
                               "of 12); 41m00s so far, about 5m00s left")
    status.update(progress(stage="targets", tile_pass=1, tile=3, tiles=20, remaining=300.0))
    assert bar.postfix["tiles"] == "targets 3/20"
    assert [cli.duration(s) for s in (0.4, 59, 61, 3599, 3725)] == ["0s", "59s", "1m01s", "59m59s", "1h02m"]
