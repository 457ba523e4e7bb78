"""Peak memory and seconds per evaluation against -l, tiled and untiled, each run in a child process of its own.

    .venv/bin/python -m bench.tiling --weights ../shared/models/vgg16_hed.caffemodel        # 512 ... 4096 px
    .venv/bin/python -m bench.tiling --lengths 512 1024 --modes tiled untiled --evaluations 3
    .venv/bin/python -m bench.tiling --dry-run                                           # the caps and estimates only
    .venv/bin/python -m bench.tiling --work                     # tiled over untiled FLOPs (plan.CostModel), no run
    .venv/bin/python -m bench.tiling --turns 1024 --rounds 5    # tiled over untiled time, by turns in one process
    .venv/bin/python -m bench.tiling --render bench/results/tiling.json

Each child does what style.py does for one scale of VGG16 (real weights, `--weights`) on Tübingen in the style of
Starry Night at -l: StyleTransfer, stylize(), the style and content targets (tiled when the run is), and L-BFGS-B
from the content image, stopped after `--evaluations` evaluations. So its peak RSS is a run's, the optimiser's
arrays included, and it is read by the parent from the child's own resource usage (os.wait4), which a child killed
for lack of memory still has. Seconds per evaluation are the median time between one evaluation's end and the
next's (L-BFGS-B's own step included, the first evaluation after the targets left out: it sets up the kernels).

- untiled: no --max-memory. A size whose estimated need (tiling.py's estimate of one evaluation and the run's
  arrays, plus what the child holds after loading the net) exceeds the memory available is skipped ("skipped:
  estimated N GB"), as is a run the library tiles anyway.
- tiled: --max-memory at the issue's goal for the size (5 GB at 2048 px, 12 GB at 3072 and 4096 px) or, where the
  whole image fits with room to spare (512, 1024 px), a cap just under the untiled estimate, which gives the fewest
  tiles; `--max-memory` sets one cap for all. The table gives the tiles, the cap and the final loss against the
  untiled run's (the same objective and iterations: they differ by float rounding alone).

GB are 1024^3 bytes, as --max-memory counts them.

Results go to bench/results/tiling.json (with the machine) and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import CONTENT, STYLE, machine
from bench.weights import REPO, SHARED_VGG16

LENGTHS = (512, 1024, 2048, 3072, 4096)
MODES = ("untiled", "tiled")
# The goals for peak RSS: the caps of the tiled runs at these sizes, in GB.
GOALS = {2048: 5.0, 3072: 12.0, 4096: 12.0}
# Below the goals' sizes the tiled run's cap leaves the evaluation this share of what it needs whole: the fewest
# tiles, the cheapest tiling.
FORCE_SHARE = 0.9
MODEL = "vgg16"
GB = 1024**3  # as tiling.py and --max-memory count


@dataclass
class Row:
    length: int
    mode: str
    status: str  # "ok", "skipped", "failed"
    reason: str = ""
    height: int = 0
    width: int = 0
    cap_gb: float | None = None
    estimate_gb: float = 0.0  # tiling.py's estimate of the untiled run: the process, the run's arrays, an evaluation
    tiles: int = 0
    tile: list[int] = field(default_factory=list)  # the largest tile's input size (height, width)
    seconds: list[float] = field(default_factory=list)  # per evaluation, the first after the targets left out
    first_seconds: float = 0.0
    targets_seconds: float = 0.0
    setup_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # the report's loss when the run stopped
    peak_rss_gb: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan


# ----------------------------------------------------------------------------------------------- estimates


def estimates(length: int, content: Path = CONTENT, style: Path = STYLE, lbfgs_memory: int = 8) -> dict[str, Any]:
    """For --dry-run, without loading the weights: the content and style sizes at `length`, tiling.py's memory
    estimate of the untiled run and the tiled run's cap and tiles, all without the process's own memory (the weights
    and libraries, which the child adds)."""
    from PIL import Image

    from style_transfer import images, memory
    from style_transfer.caffe_model.net import expected_param_shapes, infer_shapes, truncate
    from style_transfer.caffe_model.reader import read_prototxt
    from style_transfer.caffe_model.registry import get_model

    info = get_model(MODEL)
    style_blobs, content_blobs = list(info.style_layers), list(info.content_layers)
    blobs = list(dict.fromkeys([*style_blobs, *content_blobs]))
    net = truncate(read_prototxt(info.prototxt), blobs)
    shapes = infer_shapes(net, (1, 3, 224, 224), "avg")
    # The weights' bytes from their shapes: the parent never loads them.
    sized: dict[str, Any] = {layer.name: [_Shape(s) for s in expected_param_shapes(layer, shapes[layer.bottoms[0]])]
                             for layer in net.layers if layer.type == "Convolution"}
    net.weights = sized
    with Image.open(content) as c, Image.open(style) as s:
        ch, cw = images.long_side_size(c.height, c.width, length)
        sh, sw = images.long_side_size(s.height, s.width, round(length * 1.2))
    fixed = memory.run_bytes(net, ch, cw, lbfgs_memory, memory.blob_bytes(net, "avg", ch, cw, content_blobs))
    untiled = max(fixed + memory.evaluation_bytes(net, "avg", ch, cw), memory.evaluation_bytes(net, "avg", sh, sw))
    cap = GOALS.get(length)
    if cap is None:
        cap = (fixed + FORCE_SHARE * memory.evaluation_bytes(net, "avg", ch, cw)) / memory.GB
    budget = int(cap * memory.GB)
    try:
        plan = memory.choose_tiles(net, "avg", ch, cw, blobs, budget, fixed, f"--max-memory {cap:g}")
        style_plan = memory.choose_tiles(net, "avg", sh, sw, style_blobs, budget, 0)
        tiled: dict[str, Any] = {"tiles": 0 if plan is None else plan.count,
                                 "style_tiles": 0 if style_plan is None else style_plan.count}
    except Exception as exc:  # a cap too small: the tiled run will say so itself
        tiled = {"error": str(exc)}
    return {"height": ch, "width": cw, "style": [sh, sw], "untiled_gb": untiled / memory.GB, "cap_gb": cap,
            **tiled}


# --work: image sizes (width, height) and the tile counts to cost at each.
WORK_SIZES = {(1024, 768): (2, 4, 6, 12), (2048, 1536): (4, 6, 12, 24, 48), (4096, 3072): (4, 12, 24, 48)}


def work_table() -> str:
    """One tiled evaluation's FLOPs over an untiled one's (plan.CostModel, the halos and both passes counted), for
    the smallest square cores that give each count of tiles: the arithmetic side of the measured table."""
    from style_transfer import tiling
    from style_transfer.caffe_model.net import truncate
    from style_transfer.caffe_model.reader import read_prototxt
    from style_transfer.caffe_model.registry import get_model
    from style_transfer.plan import CostModel

    info = get_model(MODEL)
    style, content = list(info.style_layers), list(info.content_layers)
    blobs = list(dict.fromkeys([*style, *content]))
    net = truncate(read_prototxt(info.prototxt), blobs)
    model = CostModel(net, "avg", style, content)
    counts = sorted({n for ns in WORK_SIZES.values() for n in ns})
    lines = ["| image | " + " | ".join(f"{n} tiles" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for (w, h), wanted in WORK_SIZES.items():
        whole, cells = model.evaluation(h, w), []
        for n in counts:
            plans = (tiling.plan_tiles(net, "avg", h, w, blobs, (k, k)) for k in range(16, max(h, w) + 16, 16))
            plan = next((p for p in plans if p.count == n), None) if n in wanted else None
            cells.append("" if plan is None else f"{model.evaluation(h, w, plan.tile_sizes()) / whole:.2f}")
        lines.append(f"| {w} x {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Shape:
    """Stands in for a weight array: run_bytes needs only its size."""

    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)


def available_gb() -> float:
    from style_transfer.memory import GB, available_bytes

    return available_bytes("cpu") / GB


# ----------------------------------------------------------------------------------------------- the child


def child(config: dict[str, Any]) -> dict[str, Any]:
    """One run in this process (see the module's docstring); returns what the parent records."""
    from style_transfer.openmp import prefer_short_spin

    prefer_short_spin([MODEL], "torch")  # style.py's environment, before torch loads
    from style_transfer import images, memory
    from style_transfer.transfer import StyleTransfer

    started = time.perf_counter()
    st = StyleTransfer(MODEL, gpu=-1, weights=config["weights"], precision="fp32")
    content = images.load_image(config["content"])
    style = images.load_image(config["style"])
    length = int(config["length"])
    h, w = images.long_side_size(content.shape[0], content.shape[1], length)
    # The memory the run needs beside one evaluation, this process's own (the weights, the libraries) included.
    content_blobs = list(st.content_weights)
    fixed = memory.resident_bytes() + memory.run_bytes(st.net, h, w, 8,
                                                       memory.blob_bytes(st.net, "avg", h, w, content_blobs))
    whole = memory.evaluation_bytes(st.net, "avg", h, w)
    out: dict[str, Any] = {"height": h, "width": w, "estimate_gb": (fixed + whole) / memory.GB}
    cap = config["cap_gb"]
    if config["mode"] == "untiled":
        available = memory.available_bytes("cpu") + memory.resident_bytes()
        if fixed + whole > available:
            return {**out, "status": "skipped", "reason": f"estimated {(fixed + whole) / memory.GB:.1f} GB, "
                                                          f"{available / memory.GB:.1f} available"}
    elif cap is None:
        cap = round(GOALS[length] if length in GOALS else (fixed + FORCE_SHARE * whole) / memory.GB, 2)
    out["cap_gb"] = cap
    job = st.stylize(content, [style], length=length, num_iters=config["evaluations"] + 5, init="content", seed=0,
                     max_memory=cap)
    plan = job.costs()[0]
    out.update(tiles=plan.tiles, setup_seconds=time.perf_counter() - started)
    if config["mode"] == "untiled" and plan.tiles:
        return {**out, "status": "skipped", "reason": "tiled anyway: too little memory available"}
    if config["mode"] == "tiled" and not plan.tiles:
        return {**out, "status": "skipped", "reason": f"fits whole under --max-memory {cap:g}"}
    run_started = time.perf_counter()
    marks: list[float] = []
    targets: list[float] = []

    def on_progress(p: Any) -> None:
        if p.stage == "evaluation" and not targets:
            targets.append(time.perf_counter())
        if p.evaluations > len(marks):
            marks.append(time.perf_counter())

    def on_step(step: Any) -> None:
        if step.evaluations >= config["evaluations"] + 1:
            raise StopIteration

    result = job.run(on_step, on_progress)
    if not targets or len(marks) < 2:
        return {**out, "status": "failed", "reason": f"only {len(marks)} evaluation(s): {result.stop_reason}"}
    times = [b - a for a, b in zip([targets[0], *marks], marks, strict=False)]
    summary = result.report["tiling"] or {}
    return {**out, "status": "ok", "first_seconds": times[0], "seconds": times[1:],
            "targets_seconds": targets[0] - run_started, "tile": summary.get("tile", []),
            "losses": [result.report["loss"]] if result.report["loss"] is not None else []}


def _child_main(text: str) -> None:
    protocol = os.fdopen(os.dup(1), "w")  # library output goes to stderr, the result alone to stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        result = child(json.loads(text))
    except Exception as exc:
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                  "traceback": traceback.format_exc()}
    protocol.write(json.dumps(result) + "\n")
    protocol.flush()


def run_child(config: dict[str, Any], verbose: bool = False) -> tuple[dict[str, Any], float]:
    """The child's result and its peak RSS in GB (os.wait4: that child's own resource usage)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, "-m", "bench.tiling", "--child", json.dumps(config)],
                               stdout=subprocess.PIPE, stderr=None if verbose else subprocess.DEVNULL, text=True,
                               cwd=str(REPO), env=env)
    assert process.stdout is not None
    output = process.stdout.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * 1024 / GB
    lines = output.strip().splitlines()
    if process.returncode != 0 or not lines:
        why = f"killed by signal {-process.returncode} (out of memory?)" if process.returncode < 0 else \
            f"exit code {process.returncode}"
        return {"status": "failed", "reason": why}, peak
    return dict(json.loads(lines[-1])), peak


# ----------------------------------------------------------------------------------------------- by turns


def by_turns(length: int, rounds: int, weights: Path, content_path: Path = CONTENT, style_path: Path = STYLE
             ) -> dict[str, Any]:
    """Seconds per evaluation, untiled and tiled (the tiles the tiled row of the table gets at this size), taking
    turns in one process, so that the ratio is not the difference between two children's moments on a shared
    machine. The objective is a single-scale run's (bench/scales_equal_time.py); the losses must agree."""
    import numpy as np

    from bench.scales_equal_time import full_size_objective
    from style_transfer import images, memory, tiling
    from style_transfer.openmp import prefer_short_spin

    prefer_short_spin([MODEL], "torch")
    from style_transfer.transfer import StyleTransfer

    st = StyleTransfer(MODEL, gpu=-1, weights=str(weights), precision="fp32")
    content = images.resize_long_side(images.load_image(content_path), length)
    untiled = full_size_objective(st, content, images.load_image(style_path), length)
    h, w = content.shape[:2]
    cap = estimates(length, content_path, style_path)["cap_gb"]
    fixed = memory.run_bytes(st.net, h, w, 8, memory.blob_bytes(st.net, "avg", h, w, list(st.content_weights)))
    plan = memory.choose_tiles(st.net, "avg", h, w, st.blobs, int(cap * GB), fixed)
    if plan is None:
        raise SystemExit(f"-l {length}: the whole image fits under {cap:g} GB; nothing to tile")
    tiled = tiling.TiledEvaluator(st.engine, untiled.objective, plan)  # type: ignore[attr-defined]
    x = images.preprocess(content)
    times: dict[str, list[float]] = {"untiled": [], "tiled": []}
    losses = {}
    for turn in range(rounds + 1):  # the first round warms up both
        for name, evaluator in (("untiled", untiled), ("tiled", tiled)):
            started = time.perf_counter()
            losses[name] = evaluator(x).loss
            if turn:
                times[name].append(time.perf_counter() - started)
    medians = {k: float(np.median(v)) for k, v in times.items()}
    return {"length": length, "size": [h, w], "tiles": plan.count, "tile": list(plan.tile_size), "cap_gb": cap,
            "seconds": times, "median": medians, "ratio": medians["tiled"] / medians["untiled"],
            "loss_difference": abs(losses["tiled"] - losses["untiled"]) / abs(losses["untiled"])}


# ----------------------------------------------------------------------------------------------- the table


def markdown(rows: list[Row]) -> str:
    lines = ["| -l | size (WxH) | mode | --max-memory GB | tiles (largest, HxW) | s / evaluation | first s | targets s "
             "| peak RSS GB | estimate GB | final loss vs untiled |", "|" + "---|" * 11]
    untiled = {r.length: r for r in rows if r.mode == "untiled" and r.losses}
    for r in rows:
        size = f"{r.width}x{r.height}" if r.width else "-"
        cap = f"{r.cap_gb:g}" if r.cap_gb is not None else "-"
        if r.status != "ok":
            peak = f"{r.peak_rss_gb:.2f}" if r.peak_rss_gb else "-"
            lines.append(f"| {r.length} | {size} | {r.mode} | {cap} | {r.status}: {r.reason} | | | | {peak} "
                         f"| {r.estimate_gb:.1f} | |")
            continue
        tiles = f"{r.tiles} ({r.tile[0]}x{r.tile[1]})" if r.tiles and r.tile else "whole"
        versus = "-"
        ref = untiled.get(r.length)
        if r.mode == "tiled" and ref is not None and r.losses:
            versus = f"{abs(r.losses[0] - ref.losses[0]) / abs(ref.losses[0]):.1e}"
        lines.append(f"| {r.length} | {size} | {r.mode} | {cap} | {tiles} | {r.median:.2f} | {r.first_seconds:.2f} "
                     f"| {r.targets_seconds:.1f} | {r.peak_rss_gb:.2f} | {r.estimate_gb:.1f} | {versus} |")
    return "\n".join(lines)


def save(path: Path, rows: list[Row], info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=1))


def load(path: Path) -> tuple[list[Row], dict[str, Any]]:
    data = json.loads(path.read_text())
    return [Row(**r) for r in data["rows"]], dict(data.get("machine", {}))


def measure(length: int, mode: str, args: argparse.Namespace) -> Row:
    config = {"length": length, "mode": mode, "cap_gb": args.max_memory if mode == "tiled" else None,
              "evaluations": args.evaluations, "weights": str(args.weights), "content": str(args.content),
              "style": str(args.style)}
    result, peak = run_child(config, args.verbose)
    row = Row(length, mode, str(result.get("status", "failed")), str(result.get("reason", "")), peak_rss_gb=peak)
    for key in ("height", "width", "cap_gb", "estimate_gb", "tiles", "tile", "seconds", "first_seconds",
                "targets_seconds", "setup_seconds", "losses"):
        if key in result:
            setattr(row, key, result[key])
    if args.verbose and "traceback" in result:
        print(result["traceback"], file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--evaluations", type=int, default=3, help="evaluations timed per run after the first")
    ap.add_argument("--weights", type=Path, default=SHARED_VGG16, help="VGG16 caffemodel (default: ../shared's)")
    ap.add_argument("--content", type=Path, default=CONTENT)
    ap.add_argument("--style", type=Path, default=STYLE)
    ap.add_argument("--max-memory", type=float, help="GB: one cap for every tiled run instead of the goals")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "tiling.json")
    ap.add_argument("--dry-run", action="store_true", help="print each size's estimates and caps and stop")
    ap.add_argument("--render", type=Path, metavar="JSON", help="print the table of a saved run and stop")
    ap.add_argument("--work", action="store_true", help="print tiled over untiled FLOPs per evaluation and stop")
    ap.add_argument("--turns", type=int, metavar="LENGTH", help="time untiled and tiled evaluations at this -l by "
                    "turns in this process, print the ratio and stop")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of --turns after a warm-up round")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.child:
        _child_main(args.child)
        return
    if args.render:
        saved, saved_info = load(args.render)
        print("Machine: " + ", ".join(f"{k} {v}" for k, v in saved_info.items()))
        print(markdown(saved))
        return
    if args.work:
        print(work_table())
        return
    if args.turns:
        print(json.dumps(by_turns(args.turns, args.rounds, args.weights, args.content, args.style)))
        return
    if args.dry_run:
        print(f"available now: {available_gb():.1f} GB")
        for length in args.lengths:
            print(length, json.dumps(estimates(length, args.content, args.style)))
        return
    if not args.weights.exists():
        ap.error(f"--weights {args.weights} does not exist")
    info = machine()
    started = time.time()
    rows: list[Row] = []
    for length in args.lengths:
        for mode in args.modes:
            print(f"-l {length} {mode}", flush=True)
            rows.append(measure(length, mode, args))
            row = rows[-1]
            print(f"  {row.status} {row.reason} {row.median:.2f} s / evaluation, peak RSS {row.peak_rss_gb:.2f} GB",
                  flush=True)
            save(args.json, rows, info)
    info["load_average_end"] = machine()["load_average"]
    info["minutes"] = f"{(time.time() - started) / 60:.1f}"
    save(args.json, rows, info)
    print()
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(markdown(rows))


if __name__ == "__main__":
    main()
