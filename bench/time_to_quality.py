"""Time to quality: the objective against wall time for single-scale L-BFGS-B runs, and ways to get there sooner.

    .venv/bin/python -m bench.time_to_quality run --length 256 --iters 512                 # every variant
    .venv/bin/python -m bench.time_to_quality run --length 512 --iters 100 --variants m8 m20
    .venv/bin/python -m bench.time_to_quality report bench/results/ttq-256.json             # table and plot

The setting is `style.py`'s single-scale path: VGG16 (the real weights in ../shared), Tübingen in the style of Starry
Night, the preset layers, ratio 1e4, content initialisation, per-pixel bounds. The reference is the original's
optimiser as the tool runs it: scipy's L-BFGS-B, history 8, no tolerance stops, on the engine as first committed
(`plain`). The target is the objective it reaches after `--iters` iterations; each variant's time to reach the same
objective is read off its curve.

The variants change one thing at a time (optimize.py and transfer.py are not touched; the loop is spelled out here):

- `plain-m8`: the reference; `m8`: the same with today's torch engine (per-evaluation speed only);
- `m20`, `m50`: a longer L-BFGS-B history;
- `colour-m*`: optimising a decorrelated colour parametrisation x = C y (C the square root of natural images'
  colour covariance), `dct-m*`: a spectrally preconditioned one x = IDCT(s * y) with s ~ 1/frequency. These
  cannot use L-BFGS-B's exact box handling (the box is not a box in y), so the objective is evaluated at the
  projection clip(x) onto the bounds and its gradient is zero across clipped pixels: the result honours the bounds.

All runs start together, each in its own process, and take turns evaluation by evaluation, so a machine shared with
other jobs slows them alike. Each run has its own clock: the wall time of its evaluations (with the parametrisation's
transforms) plus the CPU time of scipy's own work between evaluations; the set-up and one warm-up evaluation are not
counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.weights import REPO

RESULTS = REPO / "bench" / "results"
FIGURES = REPO / "bench" / "figures"

# Square root of the colour covariance of natural images (RGB, per unit of 0-255 range), as commonly estimated from
# ImageNet; rows are the RGB components of the three decorrelated directions' contributions.
_COLOUR_SQRT_RGB = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


@dataclass(frozen=True)
class Variant:
    name: str
    memory: int
    engine: str = "fast"  # "fast" (today's engine) or "plain" (the engine as first committed)
    param: str = "pixels"  # "pixels", "colour" or "dct"


VARIANTS = {v.name: v for v in [
    Variant("plain-m8", 8, engine="plain"),
    Variant("m8", 8),
    Variant("m20", 20),
    Variant("m50", 50),
    Variant("colour-m8", 8, param="colour"),
    Variant("colour-m20", 20, param="colour"),
    Variant("dct-m8", 8, param="dct"),
    Variant("dct-m20", 20, param="dct"),
]}


class Parametrisation:
    """x = T(y) for a linear T, with its adjoint; x and y are 3 x H x W."""

    def forward(self, y: np.ndarray) -> np.ndarray:
        return y

    def adjoint(self, g: np.ndarray) -> np.ndarray:
        return g

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x


class Colour(Parametrisation):
    def __init__(self) -> None:
        # The tool's images are BGR; the matrix maps decorrelated directions to BGR and is scaled to unit largest
        # column norm, so that only the relative scaling of the directions changes the problem.
        m = _COLOUR_SQRT_RGB[::-1]
        self.m = m / np.max(np.linalg.norm(m, axis=0))
        self.m_inv = np.linalg.inv(self.m)

    def forward(self, y: np.ndarray) -> np.ndarray:
        return np.einsum("ij,jhw->ihw", self.m, y)

    def adjoint(self, g: np.ndarray) -> np.ndarray:
        return np.einsum("ji,jhw->ihw", self.m, g)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return np.einsum("ij,jhw->ihw", self.m_inv, x)


class Spectral(Parametrisation):
    """Orthonormal 2-D DCT with coefficients scaled by 1 / max(frequency, 1)^alpha (relative to the lowest one)."""

    def __init__(self, height: int, width: int, alpha: float = 1.0) -> None:
        fy = np.arange(height)[:, None] / height
        fx = np.arange(width)[None, :] / width
        freq = np.sqrt(fy**2 + fx**2) * max(height, width)
        self.s = 1.0 / np.maximum(freq, 1.0) ** alpha

    def forward(self, y: np.ndarray) -> np.ndarray:
        from scipy.fft import idctn

        return np.asarray(idctn(y * self.s, axes=(1, 2), norm="ortho"))

    def adjoint(self, g: np.ndarray) -> np.ndarray:
        from scipy.fft import dctn

        return np.asarray(dctn(g, axes=(1, 2), norm="ortho")) * self.s

    def inverse(self, x: np.ndarray) -> np.ndarray:
        from scipy.fft import dctn

        return np.asarray(dctn(x, axes=(1, 2), norm="ortho")) / self.s


def _make_engine(kind: str, model: str) -> Any:
    from bench.common import build_net
    from bench.worker import _module_at_revision
    from style_transfer.engines.torch import TorchEngine

    net, _ = build_net(model, "avg")
    if kind == "plain":
        from bench.torch_variants import BASELINE_REV

        return _module_at_revision(BASELINE_REV, "style_transfer/engines/torch.py").TorchEngine(net, "avg", "cpu")
    return TorchEngine(net, "avg", "cpu")


class Gate:
    """Turn-taking with the driver: an evaluation starts only when the driver says so (one at a time across all
    runs), so every run meets the same machine, evaluation by evaluation."""

    def __init__(self, inbox: IO[str] | None, outbox: IO[str] | None) -> None:
        self.inbox, self.outbox = inbox, outbox

    def wait(self) -> None:
        if self.inbox is not None:
            self.inbox.readline()

    def release(self, message: str = "done") -> None:
        if self.outbox is not None:
            self.outbox.write(message + "\n")
            self.outbox.flush()


def run_variant(variant: Variant, length: int, iters: int, model: str = "vgg16", gate: Gate | None = None
                ) -> dict[str, Any]:
    """One optimisation on its own clock: the wall time of its evaluations (including the parametrisation's
    transforms) plus the CPU time of the optimiser's own work between them."""
    from scipy.optimize import minimize

    from bench.common import build_case

    gate = gate or Gate(None, None)
    engine = _make_engine(variant.engine, model)
    case = build_case(model, "torch", length, engine=engine)
    case.engine.evaluate(case.x0)  # warm-up outside the clock, as a run's set-up is not what is compared
    shape = case.x0.shape
    lower, upper = case.lower.astype(np.float64), case.upper.astype(np.float64)
    param: Parametrisation
    if variant.param == "colour":
        param = Colour()
    elif variant.param == "dct":
        param = Spectral(shape[1], shape[2])
    else:
        param = Parametrisation()
    evals: list[tuple[float, float]] = []  # (clock, objective)
    iterations: list[tuple[float, float, int]] = []  # (clock, objective at the iterate, evaluations so far)
    clock = {"total": 0.0, "left": time.thread_time()}

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        clock["total"] += time.thread_time() - clock["left"]
        gate.wait()
        t0 = time.perf_counter()
        y = v.reshape(shape)
        x = param.forward(y)
        xc = np.clip(x, lower, upper)
        ev = case.engine.evaluate(xc.astype(np.float32))
        g = ev.grad.astype(np.float64)
        if variant.param != "pixels":
            # The projection's derivative: pixels held at a bound do not move with y.
            g = param.adjoint(np.where(xc == x, g, 0.0))
        clock["total"] += time.perf_counter() - t0
        gate.release()
        evals.append((clock["total"], ev.loss))
        clock["left"] = time.thread_time()
        return ev.loss, g.ravel()

    def callback(intermediate_result: Any) -> None:
        now = clock["total"] + time.thread_time() - clock["left"]
        iterations.append((now, float(intermediate_result.fun), len(evals)))

    y0 = param.inverse(np.clip(case.x0.astype(np.float64), lower, upper))
    bounds = None
    if variant.param == "pixels":
        bounds = np.stack([lower.ravel(), upper.ravel()], axis=1)
    # The options of the tool's optimiser: iterations are the only ordinary stop.
    res = minimize(fun, y0.ravel(), jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
                   options={"maxiter": iters, "maxcor": variant.memory, "ftol": 0.0, "gtol": 0.0,
                            "maxfun": max(15000, 4 * iters), "maxls": 40})
    final = np.clip(param.forward(np.asarray(res.x).reshape(shape)), lower, upper)
    at_bounds = float(np.mean((final <= lower + 1e-3) | (final >= upper - 1e-3)))
    return {"variant": variant.name, "memory": variant.memory, "engine": variant.engine, "param": variant.param,
            "length": length, "height": shape[1], "width": shape[2], "iters": iters, "evals": evals,
            "iterations": iterations, "message": str(res.message), "fraction_at_bounds": at_bounds}


def time_to(run: dict[str, Any], target: float) -> float | None:
    """Wall seconds until an iterate's objective is at or below `target`."""
    for wall, objective, _n in run["iterations"]:
        if objective <= target:
            return float(wall)
    return None


def report(path: Path, plot: bool = True) -> str:
    data = json.loads(path.read_text())
    runs: list[dict[str, Any]] = data["runs"]
    ref = next((r for r in runs if r["variant"] == "plain-m8"), None) or next(r for r in runs
                                                                             if r["variant"] == "m8")
    target = ref["iterations"][-1][1]
    ref_time = ref["iterations"][-1][0]
    lines = [f"Target: the objective of `{ref['variant']}` after {len(ref['iterations'])} iterations, "
             f"{target:.4g}, reached in {ref_time:.0f} s.", "",
             "| variant | s / evaluation (median) | evaluations / iteration | objective after the reference's time "
             "| time to target | speed-up | pixels at a bound |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        walls = np.diff([0.0] + [e[0] for e in r["evals"]])
        per_eval = float(np.median(walls)) if len(walls) else float("nan")
        per_iter = len(r["evals"]) / max(1, len(r["iterations"]))
        reached = time_to(r, target)
        at_ref_time = [obj for wall, obj, _ in r["iterations"] if wall <= ref_time]
        lines.append(f"| {r['variant']} | {per_eval:.3f} | {per_iter:.2f} | "
                     f"{(at_ref_time[-1] / target if at_ref_time else float('nan')):.3f} x target | "
                     f"{(f'{reached:.0f} s' if reached is not None else 'not reached')} | "
                     f"{(f'{ref_time / reached:.2f}x' if reached else '-')} | {r['fraction_at_bounds']:.2%} |")
    if plot:
        _plot(runs, target, path)
    return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], target: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        t = [w for w, _o, _n in r["iterations"]]
        o = [obj for _w, obj, _n in r["iterations"]]
        ax.plot(t, o, label=r["variant"], linestyle="--" if r["engine"] == "plain" else "-")
    ax.axhline(target, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (the run's own clock)")
    ax.set_ylabel("objective")
    first = runs[0]
    ax.set_title(f"VGG16, {first['height']}x{first['width']} px, single scale: objective against time")
    finals = [r["iterations"][-1][1] for r in runs if r["iterations"]]
    early = [r["iterations"][min(5, len(r["iterations"]) - 1)][1] for r in runs if r["iterations"]]
    ax.set_ylim(min(finals) * 0.9, max(early) * 1.1)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    FIGURES.mkdir(parents=True, exist_ok=True)
    out = FIGURES / (path.stem + ".png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--length", type=int, default=256)
    run.add_argument("--iters", type=int, default=512)
    run.add_argument("--variants", nargs="+", default=["plain-m8", "m8", "m20", "m50", "colour-m8", "dct-m8"],
                     choices=list(VARIANTS))
    run.add_argument("--short-iters", type=int, default=0,
                     help="iterations for the colour and dct variants (0: as many as --iters); enough to see "
                          "whether their curve runs ahead of m8's")
    run.add_argument("--json", type=Path)
    one = sub.add_parser("one", help="run a single variant in this process and print its JSON")
    one.add_argument("variant", choices=list(VARIANTS))
    one.add_argument("--length", type=int, default=256)
    one.add_argument("--iters", type=int, default=512)
    rep = sub.add_parser("report")
    rep.add_argument("json", type=Path)
    args = ap.parse_args()
    if args.command == "one":
        # The protocol runs on a private descriptor; library output goes to stderr.
        outbox = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        result = run_variant(VARIANTS[args.variant], args.length, args.iters, gate=Gate(sys.stdin, outbox))
        # The driver's next "go" is answered with the result instead of an evaluation.
        sys.stdin.readline()
        outbox.write(json.dumps(result) + "\n")
        outbox.flush()
        return
    if args.command == "report":
        print(report(args.json))
        return
    from bench.common import machine

    target = args.json or RESULTS / f"ttq-{args.length}.json"
    payload: dict[str, Any] = {"machine": machine(), "runs": []}
    if target.exists():
        payload = json.loads(target.read_text())
    done = {r["variant"] for r in payload["runs"]}
    todo = [name for name in args.variants if name not in done]
    print(f"{', '.join(todo)} at {args.length} px, {args.iters} iterations, taking turns", file=sys.stderr)
    def iters_for(name: str) -> int:
        short = VARIANTS[name].param != "pixels" and args.short_iters
        return int(args.short_iters) if short else int(args.iters)

    procs = {name: subprocess.Popen([sys.executable, "-m", "bench.time_to_quality", "one", name, "--length",
                                     str(args.length), "--iters", str(iters_for(name))], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, cwd=str(REPO)) for name in todo}
    count = 0
    while procs:
        for name, proc in list(procs.items()):
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if line.strip() == "done":
                continue
            del procs[name]
            proc.wait()
            if not line.strip():
                print(f"{name} failed with code {proc.returncode}", file=sys.stderr)
                continue
            payload["runs"].append(json.loads(line))
            payload.setdefault("load_average_end", {})[name] = _load()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(payload))
        count += 1
        if count % 50 == 0:
            print(f"  round {count}, load {_load()}", file=sys.stderr, flush=True)
    print(report(target))


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
