"""Seconds per L-BFGS evaluation for each engine x model x size, against the FLOP floor measured in the same run.

    .venv/bin/python -m bench.evaluations                       # all models, 256 and 512 px, torch and caffe
    .venv/bin/python -m bench.evaluations --models vgg19 --lengths 512 --repeats 9
    .venv/bin/python -m bench.evaluations --engines torch torch:bf16 caffe          # bf16 as well (AMX CPUs)

An evaluation is what L-BFGS-B asks for at every step: forward to the deepest used blob, the preset style and
content losses (Tübingen in the style of Starry Night, as `style.py` builds them), and the gradient with respect to
the image. Each engine runs in its own worker process (see bench/worker.py) with the environment `style.py` would
give it (the short OpenMP spin for VGG on the torch engine: style_transfer/openmp.py); after warm-up the driver
alternates the engines evaluation by evaluation.

Two denominators (bench/floor.py):
- the sgemm floor: before each round the machine's float32 matrix-multiply throughput is measured (NumPy's and
  torch's sgemm on 3072 x 3072 matrices, the faster counts) in a probe process of its own, in which
  OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are unset so that OpenBLAS runs the best kernel it has for the CPU (the
  kernel is recorded). The floor of a row is its FLOP count (bench/flops.py: convolutions forward and input-gradient
  backward) divided by the median throughput of its group, so `s/floor` compares like with like even on a machine
  shared with other jobs. CPU-time ratios (process CPU seconds against the sgemm's CPU seconds) are reported beside
  the wall-time ones: they are less disturbed by other jobs.
- the float32 peak: cores x FMA units x vector lanes x 2 x clock, measured once per run; `s/peak` is the row's time
  over its convolution FLOPs at that rate.

An engine that cannot be created here (pycaffe not built, no CUDA) gets a row saying "unavailable" and why.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import machine
from bench.floor import Peak, Probe, SgemmProbe, fp32_peak
from bench.flops import count_model
from bench.weights import REPO
from bench.worker import Worker

MODELS = ("vgg19", "vgg16", "googlenet", "caffenet")


@dataclass
class Row:
    model: str
    length: int
    engine: str
    label: str
    status: str
    reason: str = ""
    height: int = 0
    width: int = 0
    weights: str = ""
    threads: int = 0
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    minflts: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    conv_gflop: float = 0.0
    total_gflop: float = 0.0
    floor_s: float = 0.0
    cpu_floor_s: float = 0.0
    best_floor_s: float = 0.0
    peak_s: float = 0.0  # conv FLOPs at the machine's float32 peak
    peak_rss_mb: float = 0.0
    rss_before_mb: float = 0.0
    gpu_peak_mb: float | None = None

    @property
    def wall(self) -> float:
        return statistics.median(self.walls) if self.walls else float("nan")

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus) if self.cpus else float("nan")

    @property
    def ratio(self) -> float:
        return self.wall / self.floor_s if self.floor_s else float("nan")

    @property
    def best(self) -> float:
        return min(self.walls) if self.walls else float("nan")

    @property
    def best_ratio(self) -> float:
        """Fastest evaluation over the floor at the fastest sgemm: both as little disturbed by other jobs as the
        run saw, since other jobs only ever add time."""
        return self.best / self.best_floor_s if self.best_floor_s else float("nan")

    @property
    def peak_ratio(self) -> float:
        return self.wall / self.peak_s if self.peak_s else float("nan")

    @property
    def cpu_ratio(self) -> float:
        return self.cpu / self.cpu_floor_s if self.cpu_floor_s else float("nan")


@dataclass
class Group:
    model: str
    length: int
    rows: list[Row]
    probes: list[Probe]


def run_group(model: str, length: int, variants: Sequence[tuple[str, dict[str, Any]]], repeats: int, warmup: int,
              gpu: int = -1, verbose: bool = False, probe: SgemmProbe | None = None, peak: Peak | None = None
              ) -> Group:
    """Time each variant (label, worker config) on one model and size, alternating them evaluation by evaluation.
    Workers get `style.py`'s environment for their net and engine (the short OpenMP spin for VGG on torch) unless
    their config says `"style_env": False`."""
    own_probe = probe is None
    probe = probe or SgemmProbe(gpu=gpu)
    workers: list[tuple[Row, Worker]] = []
    for label, extra in variants:
        config = {"model": model, "length": length, "gpu": gpu, "warmup": warmup, "verbose": verbose,
                  "style_env": True, **extra}
        worker = Worker(config)
        info = worker.start()
        row = Row(model, length, str(config["engine"]), label, str(info.get("status")),
                  reason=str(info.get("reason", "")))
        if worker.ready:
            row.height, row.width = int(info["height"]), int(info["width"])
            row.weights, row.threads = str(info["weights"]), int(info["threads"])
        if verbose:
            print(f"  {label}: {row.status} {row.reason}", flush=True)
        workers.append((row, worker))
    probes: list[Probe] = []
    live = [(row, w) for row, w in workers if w.ready]
    for r in range(repeats):
        probes.append(probe.measure())
        # ABBA order: a drift in the machine's load over a round hits both ends alike.
        for row, w in live if r % 2 == 0 else list(reversed(live)):
            result = w.evaluate()
            if "wall" not in result:
                row.status, row.reason = "failed", str(result.get("reason", "worker failed"))
                continue
            row.walls.append(float(result["wall"]))
            row.cpus.append(float(result["cpu"]))
            row.minflts.append(int(result["minflt"]))
            row.losses.append(float(result["loss"]))
        if verbose:
            print(f"  round {r + 1}/{repeats}: sgemm {probes[-1].throughput / 1e9:.0f} GFLOP/s; "
                  + ", ".join(f"{row.label} {row.walls[-1]:.3f}s" for row, _ in live if row.walls), flush=True)
    probes.append(probe.measure())
    throughput = statistics.median(p.throughput for p in probes)
    cpu_throughput = statistics.median(p.cpu_throughput for p in probes)
    best_throughput = max(p.throughput for p in probes)
    for row, w in workers:
        stats = w.close()
        row.peak_rss_mb = float(stats.get("peak_rss_mb", 0.0))
        row.rss_before_mb = float(stats.get("rss_before_mb", 0.0))
        row.gpu_peak_mb = stats.get("gpu_peak_mb")
        if row.height:
            work = count_model(model, row.height, row.width)
            row.conv_gflop, row.total_gflop = work.conv_flops / 1e9, work.total_flops / 1e9
            row.floor_s = work.conv_flops / throughput
            row.cpu_floor_s = work.conv_flops / cpu_throughput
            row.best_floor_s = work.conv_flops / best_throughput
            if peak is not None:
                row.peak_s = work.conv_flops / peak.flops
    if own_probe:
        probe.close()
    return Group(model, length, [row for row, _ in workers], probes)


def markdown(groups: Sequence[Group], reference: str = "caffe") -> str:
    """The table for BENCHMARKS.md; `x ref` is each row's median time over the reference row's in its group (the
    row labelled `reference`), `best x ref` the same for the fastest evaluations."""
    head = ("| model | size (HxW) | engine | s / eval | best s | CPU s / eval | conv GFLOP | floor s | s / floor "
            "| best / best floor | CPU s / CPU floor | peak s | s / peak | peak RSS MB | faults / eval "
            f"| x {reference} | best x {reference} |")
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    for g in groups:
        ref = next((r for r in g.rows if r.label == reference and r.walls), None)
        for row in g.rows:
            if not row.walls:
                lines.append(f"| {row.model} | {row.length} px | {row.label} | {row.status}: {row.reason} |"
                             + " |" * (columns - 4))
                continue
            versus = f"{row.wall / ref.wall:.2f}" if ref is not None else "-"
            best_versus = f"{row.best / ref.best:.2f}" if ref is not None else "-"
            gpu = f" (GPU {row.gpu_peak_mb:.0f})" if row.gpu_peak_mb is not None else ""
            lines.append(
                f"| {row.model} | {row.height}x{row.width} | {row.label} | {row.wall:.3f} | {row.best:.3f} | "
                f"{row.cpu:.3f} | {row.conv_gflop:.1f} | {row.floor_s:.3f} | {row.ratio:.3f} | {row.best_ratio:.3f} | "
                f"{row.cpu_ratio:.3f} | {_num(row.peak_s)} | {_num(row.peak_ratio)} | {row.peak_rss_mb:.0f}{gpu} | "
                f"{statistics.median(row.minflts):.0f} | {versus} | "
                f"{best_versus} |")
    return "\n".join(lines)


def compact(groups: Sequence[Group], reference: str = "caffe") -> str:
    """The short table for BENCHMARKS.md: median seconds, the floor ratio (median and best), peak RSS, and the
    ratio to the reference row of the group."""
    lines = [f"| model | size | engine | s / eval | s / floor | best / best floor | s / peak | peak RSS MB "
             f"| x {reference} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        ref = next((r for r in g.rows if r.label == reference and r.walls), None)
        for row in g.rows:
            if not row.walls:
                lines.append(f"| {row.model} | {row.length} px | {row.label} | {row.status}: {row.reason} | | | | | |")
                continue
            versus = f"{row.wall / ref.wall:.2f}" if ref is not None else "-"
            lines.append(f"| {row.model} | {row.height}x{row.width} | {row.label} | {row.wall:.3f} | {row.ratio:.2f} "
                         f"| {row.best_ratio:.2f} | {_num(row.peak_ratio, 2)} | {row.peak_rss_mb:.0f} | {versus} |")
    return "\n".join(lines)


def _num(value: float, digits: int = 3) -> str:
    return "-" if value != value or not value else f"{value:.{digits}f}"


def load(path: Path) -> tuple[list[Group], dict[str, Any]]:
    """Groups saved by `save`, for rendering again."""
    data = json.loads(path.read_text())
    groups = []
    for g in data["groups"]:
        rows = [Row(**r) for r in g["rows"]]
        probes = [Probe(**p) for p in g["probes"]]
        groups.append(Group(g["model"], g["length"], rows, probes))
    return groups, dict(data.get("machine", {}))


def probe_summary(groups: Sequence[Group], extra: dict[str, Any] | None = None) -> str:
    """The two denominators: the sgemm floor (with the kernel that ran) and the float32 peak (with its factors)."""
    tps = [p.throughput / 1e9 for g in groups for p in g.probes]
    lines = []
    if tps:
        sources = sorted({p.source for g in groups for p in g.probes})
        lines.append(f"sgemm floor over the run: median {statistics.median(tps):.0f} GFLOP/s, range "
                     f"{min(tps):.0f}-{max(tps):.0f} ({len(tps)} probes; fastest source: {', '.join(sources)})")
    extra = extra or {}
    probe = extra.get("probe")
    if probe:
        kernels = "; ".join(", ".join(f"{k} {v}" for k, v in kern.items()) for kern in probe.get("kernels", []))
        lines.append(f"probe process (OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset there; the parent had "
                     f"{probe.get('parent_pinning')}): {kernels}")
    peak = extra.get("peak")
    if peak:
        nominal = peak["cores"] * peak["fma_units"] * peak["lanes"] * 2 * (peak["cpuinfo_mhz"] or 0) / 1e3
        lines.append(f"fp32 peak {peak['gflops']:.0f} GFLOP/s = {peak['cores']} cores x {peak['fma_units']} FMA units "
                     f"({peak['fma_units_from']}) x {peak['lanes']} lanes x 2 x {peak['clock_ghz']:.2f} GHz "
                     f"({peak['clock_from']}); at /proc/cpuinfo's {peak['cpuinfo_mhz']} MHz {nominal:.0f} GFLOP/s; "
                     f"scalar clock measured {_num(peak['measured_clock_ghz'] or 0, 2)} GHz; measured FMA throughput "
                     f"{_num(peak['measured_fma_gflops'] or 0, 0)} GFLOP/s")
    return "\n".join(lines)


def save(path: Path, groups: Sequence[Group], extra: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**extra, "groups": [{"model": g.model, "length": g.length, "probes": [asdict(p) for p in g.probes],
                                    "rows": [asdict(r) for r in g.rows]} for g in groups]}
    path.write_text(json.dumps(payload, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--engines", nargs="+", default=["torch", "caffe"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gpu", type=int, default=-1, help="CUDA device for every engine; -1 (default) is the CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every worker (0: the engines' choice)")
    ap.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE",
                    help="environment for every worker, set before torch loads (e.g. GOMP_SPINCOUNT=10000)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "evaluations.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--render", type=Path, metavar="JSON", help="print the tables of a saved run and stop")
    ap.add_argument("--reference", default="caffe", help="row label the last column compares with")
    ap.add_argument("--no-style-env", action="store_true",
                    help="workers without style.py's environment (no short OpenMP spin for VGG on torch)")
    ap.add_argument("--fma-units", type=int, help="FMA units per core for the peak, instead of measuring them")
    args = ap.parse_args()
    if args.render:
        saved, saved_info = load(args.render)
        print("Machine: " + ", ".join(f"{k} {v}" for k, v in saved_info.items()))
        print(probe_summary(saved, json.loads(args.render.read_text())))
        print()
        print(compact(saved, args.reference))
        print()
        print(markdown(saved, args.reference))
        return
    info = machine()
    if args.env:
        info["worker_env"] = " ".join(args.env)
    started = time.time()
    peak = fp32_peak(args.fma_units)
    probe = SgemmProbe(gpu=args.gpu)
    extra: dict[str, Any] = {"machine": info, "peak": {**asdict(peak), "gflops": peak.flops / 1e9},
                             "probe": probe.info}
    groups = []
    for model in args.models:
        for length in args.lengths:
            print(f"{model} at {length} px", flush=True)
            env = dict(item.split("=", 1) for item in args.env)
            # "torch:bf16" is the torch engine in bf16, as `--precision auto` runs it on CPUs with AMX.
            variants = [(e, {"engine": e.partition(":")[0], "env": env, "style_env": not args.no_style_env,
                             **({"precision": e.partition(":")[2]} if ":" in e else {}),
                             **({"threads": args.threads} if args.threads else {})}) for e in args.engines]
            groups.append(run_group(model, length, variants, args.repeats, args.warmup, args.gpu, args.verbose,
                                    probe, peak))
            save(args.json, groups, extra)
    probe.close()
    info["load_average_end"] = machine()["load_average"]
    info["minutes"] = f"{(time.time() - started) / 60:.1f}"
    save(args.json, groups, extra)
    print()
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(probe_summary(groups, extra))
    print()
    print(compact(groups))
    print()
    print(markdown(groups))


if __name__ == "__main__":
    main()
