"""The L-BFGS-B generator: bounds, iteration hand-over, the final iterate, early stops and errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from style_transfer.engines.base import Evaluation
from style_transfer.optimize import LBFGSB, NonFiniteLossError


def quadratic(center: np.ndarray):  # type: ignore[no-untyped-def]
    def evaluate(x: np.ndarray) -> Evaluation:
        d = (x - center).astype(np.float64)
        loss = float(np.sum(d * d))
        return Evaluation(loss, (2 * d).astype(np.float32), loss, 0.0, 0.0, {"q": loss})

    return evaluate


def test_never_leaves_bounds_and_yields_each_iteration() -> None:
    rng = np.random.default_rng(0)
    shape = (3, 5, 4)
    center = rng.uniform(-300, 300, shape).astype(np.float32)  # mostly outside the box
    lower = np.full(shape, -50, np.float32)
    upper = np.full(shape, 80, np.float32)
    seen: list[np.ndarray] = []

    def evaluate(x: np.ndarray) -> Evaluation:
        seen.append(x.copy())
        return quadratic(center)(x)

    opt = LBFGSB(evaluate, rng.uniform(-400, 400, shape).astype(np.float32), lower, upper, max_iter=15)
    steps = list(opt.steps())
    assert [s.iteration for s in steps] == list(range(1, len(steps) + 1))
    for x in [*seen, *(s.image for s in steps)]:
        assert np.all(x >= lower) and np.all(x <= upper)
    assert opt.result.image is not None
    np.testing.assert_array_equal(opt.result.image, steps[-1].image)
    np.testing.assert_allclose(steps[-1].image, np.clip(center, lower, upper), atol=1e-3)
    assert steps[-1].evaluation is not None
    assert opt.result.evaluations == len(seen)


def test_runs_exactly_max_iter_on_a_hard_problem() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 40))
    hess = a @ a.T + 1e-3 * np.eye(40)

    def evaluate(x: np.ndarray) -> Evaluation:
        v = x.ravel().astype(np.float64)
        loss = float(v @ hess @ v) + float(np.sum(v**4))
        grad = (2 * hess @ v + 4 * v**3).astype(np.float32).reshape(x.shape)
        return Evaluation(loss, grad, loss, 0.0, 0.0, {})

    opt = LBFGSB(evaluate, np.ones((1, 5, 8), np.float32) * 3, np.full((1, 5, 8), -10, np.float32),
                 np.full((1, 5, 8), 10, np.float32), max_iter=7)
    steps = list(opt.steps())
    assert len(steps) == 7 and opt.result.iterations == 7 and not opt.result.stopped_early


def test_closing_the_generator_stops_the_worker() -> None:
    shape = (1, 4, 4)
    opt = LBFGSB(quadratic(np.full(shape, 5, np.float32)), np.zeros(shape, np.float32),
                 np.full(shape, -10, np.float32), np.full(shape, 10, np.float32), max_iter=1000)
    gen = opt.steps()
    next(gen)
    gen.close()
    for _ in range(100):
        if not any(t.name == "lbfgsb" and t.is_alive() for t in threading.enumerate()):
            break
        threading.Event().wait(0.01)
    assert not any(t.name == "lbfgsb" and t.is_alive() for t in threading.enumerate())


def test_nan_loss_raises_in_the_consumer() -> None:
    shape = (1, 3, 3)

    def evaluate(x: np.ndarray) -> Evaluation:
        return Evaluation(float("nan"), np.zeros(shape, np.float32), 0.0, 0.0, 0.0, {})

    opt = LBFGSB(evaluate, np.zeros(shape, np.float32), np.full(shape, -1, np.float32),
                 np.full(shape, 1, np.float32), max_iter=5)
    with pytest.raises(NonFiniteLossError, match="nan"):
        list(opt.steps())


def test_early_convergence_is_reported() -> None:
    shape = (1, 3, 3)
    center = np.zeros(shape, np.float32)
    opt = LBFGSB(quadratic(center), center.copy(), np.full(shape, -1, np.float32), np.full(shape, 1, np.float32),
                 max_iter=50)
    list(opt.steps())
    assert opt.result.stopped_early and opt.result.message
