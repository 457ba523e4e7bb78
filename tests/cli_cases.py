"""A fixed set of style.py invocations on tiny nets, and their stored JSON reports (the CLI's golden files).

The reports in tests/data/cli_reports/ were written by the CLI as it was before a refactor; test_cli_reports.py
runs the same invocations and checks that flags, defaults, outputs and reports have not changed.

Regenerate the stored reports (only when a change to them is intended) with

    python -m tests.cli_cases --write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from style_transfer.cli import main
from tests import tinynets

REPORTS = Path(__file__).resolve().parent / "data" / "cli_reports"

# Wall-clock fields: they differ on every run, so they are neither stored nor compared.
TIMING_KEYS = frozenset({"seconds", "setup_seconds", "seconds_per_evaluation"})

TMP = "<tmp>"

INPUT_KEYS = ("style", "style2", "content", "init", "proto_v1", "model_v1", "proto_v2", "model_v2", "folder")


def make_inputs(folder: Path) -> dict[str, Path]:
    """Write the images and nets the cases use into `folder`, the same bytes on every call."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    style = folder / "style.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(style)
    yy, xx = np.mgrid[0:48, 0:64]
    content = folder / "content.png"
    Image.fromarray(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)).save(content)
    # A second style with structure (stripes in two hues) so that a blend differs from either style alone.
    yy2, xx2 = np.mgrid[0:36, 0:36]
    stripes = ((xx2 + 2 * yy2) // 4) % 2
    style2 = folder / "stripes.png"
    Image.fromarray(np.where(stripes[..., None], [200, 40, 30], [20, 60, 220]).astype(np.uint8)).save(style2)
    init = folder / "start.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(init)
    proto_v1, model_v1 = tinynets.write_net(folder, "v1", "input_dim", seed=0)
    proto_v2, model_v2 = tinynets.write_net(folder, "v2", "input_shape", seed=1)
    return {"style": style, "style2": style2, "content": content, "init": init, "proto_v1": proto_v1,
            "model_v1": model_v1, "proto_v2": proto_v2, "model_v2": model_v2, "folder": folder}


def cases(inputs: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(name, argv) of every invocation; each writes its report to <folder>/reports/<name>.json."""
    folder = inputs["folder"]
    net = ["--prototxt", str(inputs["proto_v1"]), "--weights", str(inputs["model_v1"]),
           "--style-layers", "conv1:0.5,conv2:0.5", "--content-layers", "conv3", "-g", "-1"]
    pair = ["-s", str(inputs["style"]), "-c", str(inputs["content"])]
    base = [*pair, *net, "--engine", "torch"]
    table: list[tuple[str, list[str]]] = [
        # Only what a prototxt run needs, plus a small size: every other option keeps its default.
        ("defaults", [*pair, *net, "-l", "32", "-n", "5"]),
        ("init_mixed", [*base, "-l", "32", "-n", "4", "-i", "mixed"]),
        ("init_noise_seed", [*base, "-l", "32", "-n", "5", "-i", "0.5", "--seed", "7"]),
        ("init_image", [*base, "-l", "32", "-n", "4", "-i", str(inputs["init"])]),
        ("style_weights", ["-s", str(inputs["style"]), str(inputs["style2"]), "-c", str(inputs["content"]), *net,
                           "--engine", "torch", "--style-weights", "3", "1", "-l", "32", "-n", "4"]),
        ("scales", [*base, "-l", "48", "-n", "6", "--scales", "2", "--min-length", "24"]),
        ("color_meancov", [*base, "-l", "32", "-n", "4", "--color-match", "meancov"]),
        ("color_histogram", [*base, "-l", "32", "-n", "4", "--color-match", "histogram"]),
        ("original_colors", [*base, "-l", "32", "-n", "4", "--original-colors"]),
        ("tv_weight", [*base, "-l", "32", "-n", "5", "--tv-weight", "0.05"]),
        ("pooling_max", [*base, "-l", "40", "-n", "4", "--pooling", "max"]),
        ("lbfgs_memory", [*base, "-l", "32", "-n", "6", "--lbfgs-memory", "3", "--pooling", "avg"]),
        ("style_scale", [*base, "-l", "40", "-n", "4", "--style-scale", "0.8"]),
        ("ratio_text", [*base, "-l", "32", "-n", "4", "-r", "5e3"]),
        # From the content with no style term the objective is already at its minimum: L-BFGS-B stops at once.
        ("ratio_zero", [*base, "-l", "32", "-n", "3", "-r", "0"]),
        ("ratio_zero_mixed", [*base, "-l", "32", "-n", "3", "-r", "0", "-i", "mixed"]),
        # Another net layout and other layer weights, fp32 and -l given as a float as the original allowed.
        ("net_v2_layers", ["-s", str(inputs["style"]), "-c", str(inputs["content"]),
                           "--prototxt", str(inputs["proto_v2"]), "--weights", str(inputs["model_v2"]),
                           "--style-layers", "conv1:1,conv2:2,conv3:0.5", "--content-layers", "conv2:1",
                           "-g", "-1", "--engine", "torch", "--precision", "fp32", "-l", "36.0", "-n", "4"]),
        # No -o: the default name under outputs/ (relative to the working folder) goes into the report.
        ("default_output", [*base, "-l", "32", "-n", "3", "-r", "1e3", "-i", "mixed"]),
    ]
    out: list[tuple[str, list[str]]] = []
    for name, argv in table:
        if name != "default_output":
            argv = [*argv, "-o", str(folder / "out" / f"{name}.png")]
        out.append((name, [*argv, "--report", str(report_path(folder, name))]))
    return out


def case_names() -> list[str]:
    """The cases' names in order, without writing any input."""
    return [name for name, _ in cases({key: Path(key) for key in INPUT_KEYS})]


def report_path(folder: Path, name: str) -> Path:
    return folder / "reports" / f"{name}.json"


def output_path(report: dict[str, Any], folder: Path) -> Path:
    """The image a report names; a relative name is relative to the folder the case ran in."""
    path = Path(report["output"])
    return path if path.is_absolute() else folder / path


@contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_case(argv: list[str], folder: Path) -> int:
    """Run style.py in this process with `folder` as the working folder; returns its exit code."""
    with _working_folder(folder):
        return main(argv)


def normalise(report: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The report without wall-clock fields and with the run's folder written as <tmp> in every string."""
    roots = sorted({str(folder), str(Path(folder).resolve())}, key=len, reverse=True)

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {clean(k): clean(v) for k, v in value.items() if k not in TIMING_KEYS}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            for root in roots:
                value = value.replace(root, TMP)
            return value
        return value

    return clean(report)


def load_report(folder: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(report_path(folder, name).read_text())
    return data


def write_all(target: Path = REPORTS) -> None:
    """Run every case in a fresh temporary folder and store its normalised report in `target`."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = make_inputs(folder)
        for name, argv in cases(inputs):
            code = run_case(argv, folder)
            if code != 0:
                raise SystemExit(f"case {name} exited with {code}")
            data = normalise(load_report(folder, name), folder)
            (target / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
            print(f"wrote {target / f'{name}.json'}")


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cli_cases", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"regenerate the stored reports in {REPORTS}")
    args = parser.parse_args(argv)
    if not args.write:
        parser.print_help()
        return 0
    write_all()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
