"""L-BFGS-B in the caller's thread: bounds, each iteration reported, the final iterate, stops, Ctrl-C and errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from style_transfer import optimize
from style_transfer.engines.base import Evaluation
from style_transfer.optimize import LBFGSB, Step

ROOT = Path(__file__).resolve().parents[1]


def quadratic(center: np.ndarray):  # type: ignore[no-untyped-def]
    def evaluate(x: np.ndarray) -> Evaluation:
        d = (x - center).astype(np.float64)
        loss = float(np.sum(d * d))
        return Evaluation(loss, (2 * d).astype(np.float32), loss, 0.0, 0.0, {"q": loss})

    return evaluate


def quartic(center: np.ndarray):  # type: ignore[no-untyped-def]
    """Flat near its minimum: L-BFGS-B needs many iterations and evaluations, unlike on a quadratic."""

    def evaluate(x: np.ndarray) -> Evaluation:
        d = (x - center).astype(np.float64)
        loss = float(np.sum(d**4))
        return Evaluation(loss, (4 * d**3).astype(np.float32), loss, 0.0, 0.0, {})

    return evaluate


# Different per pixel, so the problem does not collapse to a line search.
CENTER = np.random.default_rng(5).uniform(-8, 8, (1, 4, 4)).astype(np.float32)


def box(shape: tuple[int, ...], low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    return np.full(shape, low, np.float32), np.full(shape, high, np.float32)


def test_never_leaves_bounds_and_reports_each_iteration() -> None:
    rng = np.random.default_rng(0)
    shape = (3, 5, 4)
    center = rng.uniform(-300, 300, shape).astype(np.float32)  # mostly outside the box
    lower, upper = box(shape, -50, 80)
    seen: list[np.ndarray] = []

    def evaluate(x: np.ndarray) -> Evaluation:
        seen.append(x.copy())
        return quadratic(center)(x)

    steps: list[Step] = []
    threads = threading.active_count()
    opt = LBFGSB(evaluate, rng.uniform(-400, 400, shape).astype(np.float32), lower, upper, max_iter=15)
    result = opt.run(steps.append)
    assert threading.active_count() == threads
    assert result is opt.result
    assert [s.iteration for s in steps] == list(range(1, len(steps) + 1))
    for x in [*seen, *(s.image for s in steps)]:
        assert np.all(x >= lower) and np.all(x <= upper)
    assert result.image is not None
    np.testing.assert_array_equal(result.image, steps[-1].image)
    np.testing.assert_allclose(steps[-1].image, np.clip(center, lower, upper), atol=1e-3)
    assert steps[-1].evaluation is not None
    assert result.last_evaluation is steps[-1].evaluation
    assert result.evaluations == len(seen)
    assert result.stop_reason == result.message and result.error is None


def test_runs_exactly_max_iter_on_a_hard_problem() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 40))
    hess = a @ a.T + 1e-3 * np.eye(40)

    def evaluate(x: np.ndarray) -> Evaluation:
        v = x.ravel().astype(np.float64)
        loss = float(v @ hess @ v) + float(np.sum(v**4))
        grad = (2 * hess @ v + 4 * v**3).astype(np.float32).reshape(x.shape)
        return Evaluation(loss, grad, loss, 0.0, 0.0, {})

    steps: list[Step] = []
    opt = LBFGSB(evaluate, np.ones((1, 5, 8), np.float32) * 3, *box((1, 5, 8), -10, 10), max_iter=7)
    result = opt.run(steps.append)
    assert len(steps) == 7 and result.iterations == 7 and not result.stopped_early


def test_stop_iteration_from_on_step_stops_at_that_step_without_a_thread() -> None:
    shape = CENTER.shape
    calls: list[np.ndarray] = []

    def evaluate(x: np.ndarray) -> Evaluation:
        calls.append(x.copy())
        return quartic(CENTER)(x)

    threads = threading.active_count()
    seen: list[Step] = []

    def on_step(step: Step) -> None:
        seen.append(step)
        if step.iteration == 3:
            raise StopIteration

    opt = LBFGSB(evaluate, np.zeros(shape, np.float32), *box(shape, -10, 10), max_iter=1000)
    result = opt.run(on_step)
    assert threading.active_count() == threads
    assert [s.iteration for s in seen] == [1, 2, 3]
    assert result.stop_reason == "stopped" and result.iterations == 3 and not result.stopped_early
    assert result.image is not None
    np.testing.assert_array_equal(result.image, seen[-1].image)
    assert result.evaluations == len(calls) == seen[-1].evaluations  # nothing evaluated after the stop


def test_ctrl_c_inside_an_evaluation_returns_the_last_iterate() -> None:
    shape = CENTER.shape
    calls = 0

    def evaluate(x: np.ndarray) -> Evaluation:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return quartic(CENTER)(x)

    threads = threading.active_count()
    seen: list[Step] = []
    opt = LBFGSB(evaluate, np.zeros(shape, np.float32), *box(shape, -10, 10), max_iter=1000)
    result = opt.run(seen.append)
    assert threading.active_count() == threads
    assert result.stop_reason == "interrupted" and not result.success
    assert seen and result.iterations == seen[-1].iteration
    assert result.image is not None
    np.testing.assert_array_equal(result.image, seen[-1].image)
    assert result.evaluations == 4


def test_ctrl_c_before_the_first_iteration_returns_the_start() -> None:
    shape = (1, 2, 2)

    def evaluate(x: np.ndarray) -> Evaluation:
        raise KeyboardInterrupt

    x0 = np.full(shape, 20, np.float32)
    result = LBFGSB(evaluate, x0, *box(shape, -10, 10), max_iter=10).run()
    assert result.stop_reason == "interrupted" and result.iterations == 0 and result.last_evaluation is None
    np.testing.assert_array_equal(result.image, np.full(shape, 10, np.float32))  # x0 within the bounds


def test_scipy_gets_the_bounds_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    shape = (3, 4, 5)
    lower = rng.uniform(-100, 0, shape).astype(np.float32)
    upper = lower + rng.uniform(1, 50, shape).astype(np.float32)
    received: dict[str, Any] = {}
    real = optimize.minimize

    def spy(*args: Any, **kwargs: Any) -> Any:
        received.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(optimize, "minimize", spy)
    monkeypatch.setattr(optimize, "SETULB", None)  # scipy.optimize.minimize's path
    LBFGSB(quadratic(np.zeros(shape, np.float32)), np.zeros(shape, np.float32), lower, upper, max_iter=3).run()
    bounds = received["bounds"]
    assert bounds.lb.dtype == np.float64 and bounds.ub.dtype == np.float64
    np.testing.assert_array_equal(bounds.lb, lower.ravel().astype(np.float64))
    np.testing.assert_array_equal(bounds.ub, upper.ravel().astype(np.float64))


def hard_problem(shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """A coupled quadratic plus a quartic, its minimum partly outside the box: bounds active, many iterations."""
    rng = np.random.default_rng(7)
    size = int(np.prod(shape))
    a = rng.standard_normal((size, size))
    hess = a @ a.T / size + 1e-2 * np.eye(size)
    center = rng.uniform(-15, 15, size)

    def evaluate(x: np.ndarray) -> Evaluation:
        v = x.ravel().astype(np.float64) - center
        loss = float(v @ hess @ v) + float(np.sum(v**4)) / 100
        grad = (2 * hess @ v + 4 * v**3 / 100).astype(np.float32).reshape(x.shape)
        return Evaluation(loss, grad, loss, 0.0, 0.0, {})

    return evaluate


def run_both(monkeypatch: pytest.MonkeyPatch, make: Any, max_iter: int, stop_at: int | None = None,
             memory: int = 8) -> list[tuple[list[np.ndarray], list[Step], optimize.Result]]:
    """The same run on setulb driven here and through scipy.optimize.minimize: evaluated points, steps, result."""
    if optimize.SETULB is None:
        pytest.skip("this scipy's setulb differs from optimize.SETULB_SIGNATURE: only minimize() is used")
    shape = (2, 4, 5)
    lower, upper = box(shape, -10, 10)
    lower[0, 0] = -np.inf  # every kind of bound scipy knows: none, lower only, upper only, both
    upper[0, 1] = np.inf
    lower[1, 2], upper[1, 2] = -np.inf, np.inf
    out = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(optimize, "SETULB", None)
        seen: list[np.ndarray] = []
        evaluate = make(shape)

        def spy(x: np.ndarray, evaluate: Any = evaluate, seen: list[np.ndarray] = seen) -> Evaluation:
            seen.append(x.copy())
            return evaluate(x)

        steps: list[Step] = []

        def on_step(step: Step, steps: list[Step] = steps) -> None:
            steps.append(step)
            if step.iteration == stop_at:
                raise StopIteration

        start = np.random.default_rng(2).uniform(-12, 12, shape).astype(np.float32)
        result = LBFGSB(spy, start, lower, upper, max_iter=max_iter, memory=memory).run(on_step)
        out.append((seen, steps, result))
    return out


@pytest.mark.parametrize("case", ["hard", "converges", "stopped"])
def test_setulb_driven_here_matches_scipy_minimize(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    make = {"hard": hard_problem, "converges": lambda shape: quadratic(np.full(shape, 3, np.float32)),
            "stopped": hard_problem}[case]
    (seen_a, steps_a, a), (seen_b, steps_b, b) = run_both(monkeypatch, make, max_iter=25 if case != "converges"
                                                          else 200, stop_at=6 if case == "stopped" else None,
                                                          memory=5)
    assert len(seen_a) == len(seen_b) and len(seen_a) > 3
    for x, y in zip(seen_a, seen_b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert [s.iteration for s in steps_a] == [s.iteration for s in steps_b]
    for s, t in zip(steps_a, steps_b, strict=True):
        np.testing.assert_array_equal(s.image, t.image)
        assert s.evaluations == t.evaluations and (s.evaluation is None) == (t.evaluation is None)
    assert (a.iterations, a.evaluations, a.message, a.stop_reason, a.success, a.stopped_early) == \
        (b.iterations, b.evaluations, b.message, b.stop_reason, b.success, b.stopped_early)
    assert a.image is not None and b.image is not None
    np.testing.assert_array_equal(a.image, b.image)
    if case == "converges":
        assert a.stopped_early and "CONVERGENCE" in a.message
    if case == "hard":
        assert a.iterations == 25 and a.message == "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"


def test_setulb_gets_the_bounds_as_arrays_never_as_python_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """scipy.optimize.minimize turns array bounds into a list of n Python pairs and back, which at print sizes costs
    minutes and gigabytes; the run driven here hands setulb the arrays."""
    if optimize.SETULB is None:
        pytest.skip("this scipy's setulb differs from optimize.SETULB_SIGNATURE: only minimize() is used")
    from scipy.optimize import _constraints

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("bounds converted element by element")

    monkeypatch.setattr(_constraints, "new_bounds_to_old", refuse)
    monkeypatch.setattr(_constraints, "old_bound_to_new", refuse)
    setulb, status, tasks = optimize.SETULB
    received: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def spy(m: int, x: np.ndarray, low: np.ndarray, high: np.ndarray, nbd: np.ndarray, *rest: Any) -> Any:
        received.append((low, high, nbd))
        return setulb(m, x, low, high, nbd, *rest)

    monkeypatch.setattr(optimize, "SETULB", (spy, status, tasks))
    rng = np.random.default_rng(3)
    shape = (3, 4, 5)
    lower = rng.uniform(-100, 0, shape).astype(np.float32)
    upper = lower + rng.uniform(1, 50, shape).astype(np.float32)
    center = (lower + 0.3 * (upper - lower) + rng.uniform(-20, 20, shape)).astype(np.float32)
    result = LBFGSB(quadratic(center), upper.copy(), lower, upper, max_iter=3).run()
    assert result.iterations == 3 and received
    low, high, nbd = received[0]
    assert low.dtype == np.float64 and high.dtype == np.float64 and nbd.dtype == np.int32
    np.testing.assert_array_equal(low, lower.ravel().astype(np.float64))
    np.testing.assert_array_equal(high, upper.ravel().astype(np.float64))
    assert (nbd == 2).all()


def test_the_signature_check_refuses_another_setulb(monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy.optimize import _lbfgsb

    class Other:
        """setulb(m,x,l,u,nbd,f,g,factr,pgtol,wa,iwa,task,iprint,csave,lsave,isave,dsave,maxls)"""

    monkeypatch.setattr(_lbfgsb, "setulb", Other())
    assert optimize._setulb() is None


def test_nan_loss_keeps_the_last_good_iterate() -> None:
    shape = CENTER.shape
    calls = 0

    def evaluate(x: np.ndarray) -> Evaluation:
        nonlocal calls
        calls += 1
        if calls == 6:
            return Evaluation(float("nan"), np.zeros(shape, np.float32), 0.0, 0.0, 0.0, {})
        return quartic(CENTER)(x)

    seen: list[Step] = []
    result = LBFGSB(evaluate, np.zeros(shape, np.float32), *box(shape, -10, 10), max_iter=50).run(seen.append)
    assert result.stop_reason == "nonfinite" and result.error is not None and "nan" in result.error
    assert seen and result.iterations == seen[-1].iteration
    np.testing.assert_array_equal(result.image, seen[-1].image)
    assert result.last_evaluation is not None and np.isfinite(result.last_evaluation.loss)


def test_early_convergence_is_reported() -> None:
    shape = (1, 3, 3)
    center = np.zeros(shape, np.float32)
    result = LBFGSB(quadratic(center), center.copy(), *box(shape, -1, 1), max_iter=50).run()
    assert result.stopped_early and result.message and result.stop_reason == result.message


CHILD = """
import signal, sys, time
import numpy as np
signal.signal(signal.SIGINT, signal.default_int_handler)  # the runner may have started us with SIGINT ignored
from style_transfer.engines.base import Evaluation
from style_transfer.optimize import LBFGSB

shape = (1, 8, 8)
calls = 0
def evaluate(x):
    global calls
    calls += 1
    if calls == 6:
        print("ready", flush=True)
        time.sleep(60)  # Ctrl-C arrives here, in the middle of an evaluation
    d = (x - 3).astype(np.float64)
    return Evaluation(float(np.sum(d**4)), (4 * d**3).astype(np.float32), 0.0, 0.0, 0.0, {})

steps = []
result = LBFGSB(evaluate, np.zeros(shape, np.float32), np.full(shape, -5, np.float32), np.full(shape, 5, np.float32),
                max_iter=1000).run(steps.append)
same = bool(steps) and np.array_equal(result.image, steps[-1].image)
print(result.stop_reason, result.iterations, same, flush=True)
sys.exit(0 if result.stop_reason == "interrupted" and same else 3)
"""


def test_sigint_during_a_long_evaluation_ends_the_process_cleanly(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=tmp_path)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, (child.returncode, out, err)
    reason, iterations, same = out.split()
    assert reason == "interrupted" and int(iterations) >= 1 and same == "True"
