"""Time to quality: the objective against wall time for single-scale L-BFGS-B runs, and ways to get there sooner.

    .venv/bin/python -m bench.time_to_quality run --length 256 --iters 512                 # every variant
    .venv/bin/python -m bench.time_to_quality run --length 512 --iters 100 --variants m8 m20
    .venv/bin/python -m bench.time_to_quality report bench/results/ttq-256.json             # table and plot

The setting is `style.py`'s single-scale path: VGG16 (the real weights in ../shared), Tübingen in the style of Starry
Night, the preset layers, ratio 1e4, content initialisation, per-pixel bounds. The reference is the original's
optimiser as the tool runs it: scipy's L-BFGS-B, history 8, no tolerance stops, on the engine as first committed
(`plain`). The target is the objective it reaches after `--iters` iterations; each variant's time to reach the same
objective is read off its curve.

The variants change one thing at a time (the loop is spelled out here, with the options of optimize.py):

- `plain-m8`: the reference; `m8`: the same with today's torch engine (per-evaluation speed only);
- `m12`, `m20`, `m50`: a longer L-BFGS-B history; `bf16-m*`: the torch engine in bf16 autocast;
- `colour-m*`: optimising a decorrelated colour parametrisation x = C y (C the square root of natural images'
  colour covariance), `dct-m*`: a spectrally preconditioned one x = IDCT(s * y) with s ~ 1/frequency. These
  cannot use L-BFGS-B's exact box handling (the box is not a box in y), so the objective is evaluated at the
  projection clip(x) onto the bounds and its gradient is zero across clipped pixels: the result honours the bounds.

Every run is its own process (with the OpenMP setting style.py would choose for it) and they take turns: a turn is
one evaluation plus the optimiser's own work after it, so nothing of two runs overlaps and a machine shared with other
jobs slows them alike. Each run's clock is the wall time of its turns; set-up, one warm-up evaluation, snapshots of
the image (`sheet` puts them side by side) and the float32 re-checks of bf16 runs are off the clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
    # "fast" (today's engine in the loop below), "plain" (the engine as first committed), "reference"
    # (bench/reference_gatys.py) or "tool" (the tool's own StyleTransfer path)
    engine: str = "fast"
    param: str = "pixels"  # "pixels", "colour" or "dct"
    precision: str = "fp32"  # the torch engine's precision; "bf16" objectives are re-measured in fp32 off the clock
    switch_at: int = 0  # "tool" only: after this many iterations in `precision`, go on in fp32 from that image


VARIANTS = {v.name: v for v in [
    Variant("reference", 8, engine="reference"),
    Variant("default", 8, engine="tool", precision="auto"),
    Variant("fp32", 8, engine="tool"),
    Variant("default-bf16", 8, engine="tool", precision="bf16"),
    Variant("bf16-fp32-128", 8, engine="tool", precision="bf16", switch_at=128),
    Variant("bf16-fp32-256", 8, engine="tool", precision="bf16", switch_at=256),
    Variant("plain-m8", 8, engine="plain"),
    Variant("m8", 8),
    Variant("m12", 12),
    Variant("m20", 20),
    Variant("m50", 50),
    Variant("bf16-m12", 12, precision="bf16"),
    Variant("bf16-m20", 20, precision="bf16"),
    Variant("colour-m8", 8, param="colour"),
    Variant("colour-m20", 20, param="colour"),
    Variant("dct-m8", 8, param="dct"),
    Variant("dct-m20", 20, param="dct"),
]}

# Snapshots of the iterate are saved when a run's clock passes these seconds (and at its end), for side-by-side
# images at equal wall time.
SNAPSHOT_SECONDS = (30, 60, 120, 240, 480)
# A bf16 run's own objective values carry bf16 rounding; every this many iterations (and at the end) the iterate is
# evaluated again in float32, off the clock, and those values are the run's curve.
RECHECK_EVERY = 4


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


def _make_engine(kind: str, model: str, precision: str = "fp32") -> Any:
    from bench.common import build_net
    from bench.worker import _module_at_revision
    from style_transfer.engines.torch import TorchEngine

    net, _ = build_net(model, "avg")
    if kind == "plain":
        from bench.torch_variants import BASELINE_REV

        return _module_at_revision(BASELINE_REV, "style_transfer/engines/torch.py").TorchEngine(net, "avg", "cpu")
    return TorchEngine(net, "avg", "cpu", precision=precision)


class Gate:
    """Turn-taking with the driver. A run holds the machine from the driver's "go" until it asks for the next turn,
    so one turn is one evaluation plus the optimiser's own work after it, and nothing of two runs ever overlaps:
    every run meets the same machine and its clock can be plain wall time."""

    def __init__(self, inbox: IO[str] | None, outbox: IO[str] | None) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.holding = False

    def acquire(self) -> None:
        if self.holding:
            return
        if self.inbox is not None:
            self.inbox.readline()
        self.holding = True

    def release(self) -> None:
        if not self.holding:
            return
        if self.outbox is not None:
            self.outbox.write("done\n")
            self.outbox.flush()
        self.holding = False


class Clock:
    """Wall seconds spent in a run's turns, less the pauses (snapshots, float32 re-checks) taken inside them."""

    def __init__(self) -> None:
        self.total = 0.0
        self.since: float | None = None

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> None:
        if self.since is not None:
            self.total += time.perf_counter() - self.since
            self.since = None

    def now(self) -> float:
        return self.total + (time.perf_counter() - self.since if self.since is not None else 0.0)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        running = self.since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()


def run_variant(variant: Variant, length: int, iters: int, model: str = "vgg16", gate: Gate | None = None,
                snapshots: Path | None = None, pair: tuple[Path, Path] | None = None,
                seconds: float | None = None) -> dict[str, Any]:
    """One optimisation with the tool's optimiser options, timed on its own clock (its turns' wall time).
    `pair` is (content, style), by default Tübingen and Starry Night; `seconds` ends the run when its clock
    passes that many seconds."""
    from scipy.optimize import minimize

    from bench.common import build_case
    from style_transfer import images
    from style_transfer.optimize import lbfgsb_options

    gate = gate or Gate(None, None)
    gate.acquire()  # set-up and warm-up in a turn of their own, off the clock
    engine = _make_engine(variant.engine, model, variant.precision)
    images_kw: dict[str, Any] = {} if pair is None else {"content_path": pair[0], "style_path": pair[1]}
    case = build_case(model, "torch", length, engine=engine, **images_kw)
    case.evaluate(case.x0)
    checker = None
    if variant.precision != "fp32":
        checker = build_case(model, "torch", length, engine=_make_engine("fast", model), **images_kw).evaluate
    shape = case.x0.shape
    lower, upper = case.lower.astype(np.float64), case.upper.astype(np.float64)
    param: Parametrisation
    if variant.param == "colour":
        param = Colour()
    elif variant.param == "dct":
        param = Spectral(shape[1], shape[2])
    else:
        param = Parametrisation()
    clock = Clock()
    evals: list[tuple[float, float]] = []  # (clock, objective)
    iterations: list[tuple[float, float, int]] = []  # (clock, objective at the iterate, evaluations so far)
    pending = list(SNAPSHOT_SECONDS)
    saved: list[tuple[float, int, str]] = []

    def image_of(v: np.ndarray) -> np.ndarray:
        return np.clip(param.forward(np.asarray(v).reshape(shape)), lower, upper).astype(np.float32)

    def snapshot(v: np.ndarray, at: float, label: str) -> None:
        if snapshots is None:
            return
        with clock.paused():
            snapshots.mkdir(parents=True, exist_ok=True)
            out = snapshots / f"{variant.name}-{label}.png"
            images.save_image(out, images.deprocess(image_of(v)))
            saved.append((at, len(iterations), out.name))

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        # Asking for the next evaluation ends this run's turn; the clock runs only inside turns.
        clock.stop()
        gate.release()
        gate.acquire()
        clock.start()
        y = v.reshape(shape)
        x = param.forward(y)
        xc = np.clip(x, lower, upper)
        ev = case.evaluate(xc.astype(np.float32))
        g = ev.grad.astype(np.float64)
        if variant.param != "pixels":
            # The projection's derivative: pixels held at a bound do not move with y.
            g = param.adjoint(np.where(xc == x, g, 0.0))
        evals.append((clock.now(), ev.loss))
        return ev.loss, g.ravel()

    def callback(intermediate_result: Any) -> None:
        now = clock.now()
        v = np.asarray(intermediate_result.x)
        objective = float(intermediate_result.fun)
        if checker is not None:
            if (len(iterations) + 1) % RECHECK_EVERY and len(iterations) + 1 < iters:
                iterations.append((now, float("nan"), len(evals)))
                return
            with clock.paused():
                objective = float(checker(image_of(v)).loss)
        iterations.append((now, objective, len(evals)))
        while pending and now >= pending[0]:
            snapshot(v, now, f"{pending.pop(0):04d}s")
        if seconds is not None and now >= seconds:
            raise StopIteration  # scipy ends the run and returns this iterate

    y0 = param.inverse(np.clip(case.x0.astype(np.float64), lower, upper))
    bounds = None
    if variant.param == "pixels":
        bounds = np.stack([lower.ravel(), upper.ravel()], axis=1)
    gate.release()
    res = minimize(fun, y0.ravel(), jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
                   options=lbfgsb_options(iters, variant.memory))
    end = clock.now()
    clock.stop()
    snapshot(res.x, end, "end")
    gate.release()
    final = image_of(res.x)
    at_bounds = float(np.mean((final <= lower + 1e-3) | (final >= upper - 1e-3)))
    return {"variant": variant.name, "memory": variant.memory, "engine": variant.engine, "param": variant.param,
            "precision": variant.precision, "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "length": length, "height": shape[1], "width": shape[2],
            "iters": iters, "evals": evals, "iterations": iterations, "snapshots": saved,
            "message": str(res.message), "fraction_at_bounds": at_bounds}


def _problem(length: int, pair: tuple[Path, Path] | None) -> tuple[np.ndarray, np.ndarray]:
    """Content and style as RGB in [0, 1] at the sizes the tool uses (style at 1.2 x `length`), read once by the
    harness, so that the reference and the tool optimise the very same problem."""
    from bench.common import CONTENT, STYLE, load_rgb
    from style_transfer import images

    content_path, style_path = pair or (CONTENT, STYLE)
    for path in (content_path, style_path):
        if not Path(path).exists():  # load_rgb would make up an image: not for a time-to-quality study
            raise SystemExit(f"{path} does not exist (set STYLE_TRANSFER_SHARED to the shared folder)")
    content = images.resize_long_side(load_rgb(content_path, 1), length)
    style = images.resize_long_side(load_rgb(style_path, 2), round(length * 1.2))
    return content, style


def run_against_reference(variant: Variant, length: int, iters: int, gate: Gate | None = None,
                          snapshots: Path | None = None, pair: tuple[Path, Path] | None = None,
                          seconds: float | None = None) -> dict[str, Any]:
    """One side of the tool-against-reference comparison, on the same clock and turns as `run_variant`.

    `reference`: bench/reference_gatys.py (plain autograd through its own VGG16, scipy's L-BFGS-B with its
    defaults and history 8). `default`: the tool's own path, `StyleTransfer("vgg16").stylize(...).run(on_step)`,
    with every default option (`--precision auto`: bf16 where the CPU has AMX); each evaluation is timed through the
    evaluator the run binds. Both get one warm-up evaluation off the clock, at their starting image. `fp32` is the
    tool in fp32; `default-bf16` and `bf16-fp32-*` the tool with `precision="bf16"` (for `switch_at` iterations,
    then in fp32 from that image, as a second run would). A bf16 curve is the float32 objective, scored off the
    clock every RECHECK_EVERY iterations. (Result files from before `auto` was the default name the fp32 tool
    `default`.)"""
    from bench.reference_gatys import Reference
    from bench.weights import weights_for
    from style_transfer import images

    gate = gate or Gate(None, None)
    gate.acquire()  # set-up in a turn of its own, off the clock
    content, style = _problem(length, pair)
    x0 = images.preprocess(content)
    clock = Clock()
    evals: list[tuple[float, float]] = []
    iterations: list[tuple[float, float, int]] = []
    pending = list(SNAPSHOT_SECONDS)
    saved: list[tuple[float, int, str]] = []
    warm = {"done": False}

    def snapshot(x: np.ndarray, at: float, label: str) -> None:
        if snapshots is None:
            return
        with clock.paused():
            snapshots.mkdir(parents=True, exist_ok=True)
            out = snapshots / f"{variant.name}-{label}.png"
            images.save_image(out, images.deprocess(np.asarray(x, np.float32).reshape(x0.shape)))
            saved.append((at, len(iterations), out.name))

    def turn(evaluate: Callable[[Any], Any], arg: Any) -> Any:
        # Asking for the next evaluation ends this run's turn; the clock runs only inside turns.
        clock.stop()
        gate.release()
        gate.acquire()
        if not warm["done"]:
            evaluate(arg)
            warm["done"] = True
        clock.start()
        return evaluate(arg)

    def record(x: np.ndarray, objective: float) -> None:
        now = clock.now()
        iterations.append((now, objective, len(evals)))
        while pending and now >= pending[0]:
            snapshot(x, now, f"{pending.pop(0):04d}s")
        if seconds is not None and now >= seconds:
            raise StopIteration

    weights, kind = weights_for("vgg16")
    if kind != "real":
        raise SystemExit(f"the real VGG16 weights are not at {weights_for('vgg16')[0]} (set STYLE_TRANSFER_SHARED)")
    if variant.engine == "reference":
        ref = Reference(weights, x0, images.preprocess(style), pooling="avg", ratio=1e4)

        def fun(xflat: np.ndarray) -> tuple[float, np.ndarray]:
            loss, grad = turn(ref.fun, xflat)
            evals.append((clock.now(), loss))
            return loss, grad

        def callback(intermediate_result: Any) -> None:
            record(np.asarray(intermediate_result.x), float(intermediate_result.fun))

        res = ref.minimize(x0, iters, variant.memory, fun=fun, callback=callback)
        final, message = np.asarray(res.x, np.float32).reshape(x0.shape), str(res.message)
    else:
        from style_transfer.engines.base import Evaluation
        from style_transfer.transfer import StyleTransfer

        def scorer(st: StyleTransfer) -> Any:
            """The float32 objective of this problem on an fp32 StyleTransfer (targets computed in float32)."""
            captured: list[Any] = []
            plain_bind = st.engine.bind

            def keep(objective: Any) -> Any:
                captured.append(plain_bind(objective))
                return captured[-1]

            def stop(_step: Any) -> None:
                raise StopIteration

            setattr(st.engine, "bind", keep)  # noqa: B010
            st.stylize(content, [style], length=length, num_iters=1).run(stop)
            setattr(st.engine, "bind", plain_bind)  # noqa: B010
            return captured[-1]

        # Every StyleTransfer is made here, in the set-up turn: loading a net is not part of a run's time.
        st = StyleTransfer("vgg16", weights=str(weights), precision=variant.precision)
        fp32 = st if variant.precision == "fp32" else StyleTransfer("vgg16", weights=str(weights), precision="fp32")
        checker: Any = None if variant.precision == "fp32" else scorer(fp32)

        class Timed:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def evaluate(self, image: np.ndarray) -> Evaluation:
                ev: Evaluation = turn(self.inner.evaluate, image)
                evals.append((clock.now(), ev.loss))
                return ev

            __call__ = evaluate

        bound: list[Any] = []
        precision = ["fp32"]  # of the evaluator bound last: `--precision auto` switches from bf16 to fp32 in a run

        def timed(transfer: StyleTransfer) -> None:
            for engine in (transfer.engine, transfer.fast_engine):
                if engine is None:
                    continue

                def timed_bind(objective: Any, plain_bind: Any = engine.bind, engine: Any = engine) -> Timed:
                    bound[:] = [plain_bind(objective)]
                    precision[0] = engine.precision
                    return Timed(bound[0])

                setattr(engine, "bind", timed_bind)  # noqa: B010

        phases = [(st, variant.switch_at or iters)]
        if variant.switch_at and variant.switch_at < iters:
            phases.append((fp32, iters - variant.switch_at))
        init: Any = "content"
        done = 0
        for transfer, n in phases:
            timed(transfer)

            def on_step(step: Any, offset: int = done, last: int = done + n) -> None:
                number = offset + step.iteration
                if precision[0] != "fp32":  # a half-precision objective: the curve is the float32 one, scored off
                    # the clock
                    if number % RECHECK_EVERY and number < last:
                        iterations.append((clock.now(), float("nan"), len(evals)))
                        return
                    with clock.paused():
                        objective = float(checker.evaluate(step.image).loss)
                elif step.evaluation is None:  # an iterate scipy did not evaluate itself: scored off the clock
                    with clock.paused():
                        objective = float(bound[0].evaluate(step.image).loss)
                else:
                    objective = float(step.evaluation.loss)
                record(step.image, objective)

            run = transfer.stylize(content, [style], length=length, num_iters=n, lbfgs_memory=variant.memory,
                                   init=init)
            result = run.run(on_step)
            done += result.iterations
            init = result.rgb
        final, message = result.x, result.stop_reason
    end = clock.now()
    clock.stop()
    snapshot(final, end, "end")
    if snapshots is not None:
        np.save(snapshots / f"{variant.name}-final.npy", final)
    gate.release()
    lower, upper = images.pixel_bounds(*x0.shape[1:])
    at_bounds = float(np.mean((final <= lower + 1e-3) | (final >= upper - 1e-3)))
    return {"variant": variant.name, "memory": variant.memory, "engine": variant.engine, "param": "pixels",
            "precision": variant.precision, "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "weights": str(weights), "pair": [str(p) for p in (pair or _default_pair())],
            "length": length, "height": x0.shape[1], "width": x0.shape[2],
            "iters": iters, "evals": evals, "iterations": iterations, "snapshots": saved,
            "message": message, "fraction_at_bounds": at_bounds}


def _default_pair() -> tuple[Path, Path]:
    from bench.common import CONTENT, STYLE

    return CONTENT, STYLE


def cross_score(path: Path, length: int, pair: tuple[Path, Path] | None = None) -> dict[str, dict[str, float]]:
    """Each run's final image scored off the clock by both implementations in float32: the reference's autograd
    objective and the tool's evaluator. They agree to float32 rounding when the two solve the same problem."""
    from bench.reference_gatys import Reference
    from bench.weights import weights_for
    from style_transfer import images
    from style_transfer.transfer import StyleTransfer

    content, style = _problem(length, pair)
    weights, _kind = weights_for("vgg16")
    ref = Reference(weights, images.preprocess(content), images.preprocess(style), pooling="avg", ratio=1e4)
    st = StyleTransfer("vgg16", weights=str(weights), precision="fp32")
    captured: list[Any] = []
    bind = st.engine.bind

    def keep(objective: Any) -> Any:
        captured.append(bind(objective))
        return captured[-1]

    def stop(_step: Any) -> None:
        raise StopIteration

    setattr(st.engine, "bind", keep)  # noqa: B010
    st.stylize(content, [style], length=length, num_iters=1).run(stop)
    tool = captured[-1]
    folder = path.with_name(path.stem + "-snapshots")
    out: dict[str, dict[str, float]] = {}
    for final in sorted(folder.glob("*-final.npy")):
        x = np.load(final)
        out[final.name.removesuffix("-final.npy")] = {"reference": ref.score(x), "tool": float(tool.evaluate(x).loss)}
    return out


def lbfgsb_overhead(n: int, memory: int, iters: int = 40, seed: int = 0) -> float:
    """CPU seconds per iteration that scipy's L-BFGS-B spends on its own work (the objective excluded) for `n`
    bounded variables: a badly scaled quadratic whose minimum lies outside the box for about 8% of them, so that
    the generalised Cauchy point meets bounds as it does in style transfer."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-3, 3, n))
    centre = rng.uniform(-1.0, 1.0, n) * 1.08
    spent = {"fun": 0.0}

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        t0 = time.thread_time()
        d = x - centre
        out = float(0.5 * np.dot(scale * d, d)), scale * d
        spent["fun"] += time.thread_time() - t0
        return out

    bounds = np.tile([-1.0, 1.0], (n, 1))
    t0 = time.thread_time()
    res = minimize(fun, np.zeros(n), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": iters, "maxcor": memory, "ftol": 0.0, "gtol": 0.0, "maxls": 40})
    return (time.thread_time() - t0 - spent["fun"]) / max(1, int(res.nit))


def time_to(run: dict[str, Any], target: float) -> float | None:
    """Wall seconds until an iterate's objective is at or below `target`."""
    reached = reach(run, target)
    return None if reached is None else reached[0]


def reach(run: dict[str, Any], target: float) -> tuple[float, int] | None:
    """(seconds, evaluations) until an iterate's objective is at or below `target`."""
    for wall, objective, n in run["iterations"]:
        if objective <= target:
            return float(wall), int(n)
    return None


BASELINES = ("reference", "plain-m8", "m8")


def baseline_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run the others are measured against: the independent reference when the file has one."""
    for name in BASELINES:
        for r in runs:
            if r["variant"] == name:
                return r
    raise ValueError("no baseline run (reference, plain-m8 or m8) in the file")


def report(path: Path, plot: bool = True, within: float = 1.02) -> str:
    """The table: each run's time to reach `within` times the baseline's final objective (its objective after
    all its iterations), and the speed-up over the baseline's own time to reach it."""
    data = json.loads(path.read_text())
    runs: list[dict[str, Any]] = data["runs"]
    ref = baseline_of(runs)
    final_ref = ref["iterations"][-1][1]
    target = within * final_ref
    ref_reached = reach(ref, target)
    assert ref_reached is not None  # the baseline reaches its own final objective at the latest
    ref_time = ref_reached[0]
    lines = [f"Target: {within:g} x the objective of `{ref['variant']}` after {len(ref['iterations'])} iterations "
             f"({final_ref:.5g}), i.e. {target:.5g}; `{ref['variant']}` reaches it in {ref_time:.0f} s.", "",
             "| variant | s / turn (evaluation + optimiser), median | evaluations to target | time to target | "
             "speed-up | objective at half the baseline's time to target | iterations | final objective | "
             "pixels at a bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        walls = np.diff([0.0] + [e[0] for e in r["evals"]])
        per_turn = float(np.median(walls)) if len(walls) else float("nan")
        curve = [(wall, obj) for wall, obj, _ in r["iterations"] if np.isfinite(obj)]
        at_half = [obj for wall, obj in curve if wall <= ref_time / 2]
        reached = reach(r, target)
        cells = f"{reached[1]} | {reached[0]:.0f} s | {ref_time / reached[0]:.2f}x" if reached else \
            "- | not reached | -"
        half = f"{at_half[-1] / final_ref:.3f} x" if at_half else "-"
        final = f"{curve[-1][1] / final_ref:.4f} x" if curve else "-"
        lines.append(f"| {r['variant']} | {per_turn:.3f} s | {cells} | {half} | {len(r['iterations'])} | {final} | "
                     f"{r['fraction_at_bounds']:.2%} |")
    lines.append("")
    lines.append(f"Objectives as multiples of `{ref['variant']}`'s final objective; the load average when each run "
                 "ended: " + ", ".join(f"{k} {v}" for k, v in data.get("load_average_end", {}).items()) + ".")
    scores = data.get("cross_scores")
    if scores:
        lines.append("Final images scored again off the clock in float32 by both implementations: " + "; ".join(
            f"{name}: reference {v['reference']:.6g}, tool {v['tool']:.6g}" for name, v in scores.items()) + ".")
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
        t = [w for w, obj, _n in r["iterations"] if np.isfinite(obj)]
        o = [obj for _w, obj, _n in r["iterations"] if np.isfinite(obj)]
        ax.plot(t, o, label=r["variant"], linestyle="--" if r["engine"] == "plain" else "-")
    ax.axhline(target, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (the run's own clock)")
    ax.set_ylabel("objective")
    first = runs[0]
    ax.set_title(f"VGG16, {first['height']}x{first['width']} px, single scale: objective against time")
    curves = [[obj for _w, obj, _n in r["iterations"] if np.isfinite(obj)] for r in runs]
    finals = [c[-1] for c in curves if c]
    early = [c[min(5, len(c) - 1)] for c in curves if c]
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
    run.add_argument("--variants", nargs="+", default=["reference", "default"],
                     choices=list(VARIANTS))
    run.add_argument("--short-iters", type=int, default=0,
                     help="iterations for the colour and dct variants (0: as many as --iters); enough to see "
                          "whether their curve runs ahead of m8's")
    run.add_argument("--json", type=Path)
    run.add_argument("--within", type=float, default=1.02,
                     help="target: this multiple of the baseline's objective after all its iterations")
    one = sub.add_parser("one", help="run a single variant in this process and print its JSON")
    one.add_argument("variant", choices=list(VARIANTS))
    one.add_argument("--length", type=int, default=256)
    one.add_argument("--iters", type=int, default=512)
    one.add_argument("--snapshots", type=Path, help="folder for the iterate's images at equal wall times")
    for p in (run, one):
        p.add_argument("--content", type=Path, help="content image (default: Tübingen from ../shared)")
        p.add_argument("--style", type=Path, help="style image (default: Starry Night from ../shared)")
        p.add_argument("--seconds", type=float, help="end each run when its clock passes this many seconds")
    rep = sub.add_parser("report")
    rep.add_argument("json", type=Path)
    rep.add_argument("--within", type=float, default=1.02,
                     help="target: this multiple of the baseline's objective after all its iterations")
    sheet = sub.add_parser("sheet", help="the snapshots of some variants side by side at equal wall times")
    sheet.add_argument("json", type=Path)
    sheet.add_argument("--variants", nargs="+", required=True)
    sheet.add_argument("--out", type=Path, required=True)
    over = sub.add_parser("overhead", help="scipy's own CPU time per L-BFGS-B iteration by history and image size")
    over.add_argument("--lengths", nargs="+", type=int, default=[256, 512])
    over.add_argument("--memories", nargs="+", type=int, default=[8, 20, 50])
    args = ap.parse_args()
    if args.command == "overhead":
        print("| image (3 x H x W) | " + " | ".join(f"history {m}" for m in args.memories) + " |")
        print("|---|" + "---|" * len(args.memories))
        for length in args.lengths:
            h, w = length * 3 // 4, length
            cells = [f"{lbfgsb_overhead(3 * h * w, m) * 1e3:.0f} ms" for m in args.memories]
            print(f"| 3 x {h} x {w} | " + " | ".join(cells) + " |")
        return
    if args.command == "one":
        # The protocol runs on a private descriptor; library output goes to stderr.
        outbox = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        variant = VARIANTS[args.variant]
        if variant.engine in ("fast", "tool"):
            from style_transfer.openmp import prefer_short_spin

            prefer_short_spin(["vgg16"], "torch")  # as style.py does for this net, before torch loads
        pair = (args.content, args.style) if args.content and args.style else None
        runner = run_against_reference if variant.engine in ("reference", "tool") else run_variant
        result = runner(variant, args.length, args.iters, gate=Gate(sys.stdin, outbox), snapshots=args.snapshots,
                        pair=pair, seconds=args.seconds)
        # The driver's next "go" is answered with the result instead of an evaluation.
        sys.stdin.readline()
        outbox.write(json.dumps(result) + "\n")
        outbox.flush()
        return
    if args.command == "report":
        print(report(args.json, within=args.within))
        return
    if args.command == "sheet":
        make_sheet(args.json, args.variants, args.out)
        return
    if (args.content is None) != (args.style is None):
        ap.error("--content and --style go together")
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

    extra = [] if args.content is None else ["--content", str(args.content.resolve()), "--style",
                                             str(args.style.resolve())]
    if args.seconds:
        extra += ["--seconds", str(args.seconds)]
    procs = {name: subprocess.Popen([sys.executable, "-m", "bench.time_to_quality", "one", name, "--length",
                                     str(args.length), "--iters", str(iters_for(name)), "--snapshots",
                                     str(target.with_name(target.stem + "-snapshots")), *extra],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
             for name in todo}
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
    payload["machine"]["load_average_end"] = _load()
    if any(r["engine"] in ("reference", "tool") for r in payload["runs"]):
        pair = (args.content, args.style) if args.content and args.style else None
        payload["cross_scores"] = cross_score(target, args.length, pair)
        target.write_text(json.dumps(payload))
    print(report(target, within=args.within))


def make_sheet(path: Path, variants: list[str], out: Path, tile_width: int = 384) -> None:
    """A grid of snapshots: one row per variant, one column per snapshot time (the same times for every row),
    each tile labelled with the run's clock and its objective there."""
    from PIL import Image, ImageDraw, ImageFont

    data = json.loads(path.read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    folder = path.with_name(path.stem + "-snapshots")
    rows = []
    for name in variants:
        r = runs[name]
        row = []
        for k, (at, n_iter, file) in enumerate(r["snapshots"]):
            if k and n_iter == r["snapshots"][k - 1][1]:
                continue  # the end came with the last timed snapshot
            seen = [obj for wall, obj, _n in r["iterations"][:max(n_iter, 1)] if np.isfinite(obj)]
            row.append((float(at), n_iter, seen[-1] if seen else float("nan"), folder / file))
        rows.append((name, row))
    columns = min(len(row) for _name, row in rows)
    tiles = [[Image.open(f).convert("RGB") for *_rest, f in row[:columns]] for _name, row in rows]
    scale = min(1.0, tile_width / tiles[0][0].width)
    tiles = [[t.resize((round(t.width * scale), round(t.height * scale)), Image.Resampling.LANCZOS) for t in row]
             for row in tiles]
    w, h = tiles[0][0].size
    font = ImageFont.load_default(size=13)
    label_h, pad = 36, 6
    sheet = Image.new("RGB", (columns * (w + pad) + pad, len(rows) * (h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, row) in enumerate(rows):
        for j, (at, n_iter, objective, _file) in enumerate(row[:columns]):
            x, y = pad + j * (w + pad), pad + i * (h + label_h + pad)
            sheet.paste(tiles[i][j], (x, y + label_h))
            draw.text((x + 2, y + 2), f"{name}: {at:.0f} s, iteration {n_iter}", fill="black", font=font)
            draw.text((x + 2, y + 18), f"objective {objective:.4g}", fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=85)
    print(f"wrote {out}", file=sys.stderr)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
