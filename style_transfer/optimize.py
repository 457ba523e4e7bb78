"""scipy's L-BFGS-B as a generator of iterations, so callers decide about progress, saving and stopping."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from style_transfer.engines.base import Evaluation
from style_transfer.errors import StyleTransferError


class NonFiniteLossError(StyleTransferError):
    """The objective became NaN or infinite."""


@dataclass
class Step:
    iteration: int  # 1-based count of L-BFGS-B iterations done
    image: np.ndarray  # the iterate, float32 3 x H x W
    evaluation: Evaluation | None  # the objective at this iterate, when it was evaluated there
    evaluations: int  # objective evaluations so far
    scale: int = 0  # index of the scale in a coarse-to-fine run (0 = the only or the smallest)


@dataclass
class Result:
    success: bool = False
    message: str = ""
    iterations: int = 0
    evaluations: int = 0
    stopped_early: bool = False  # ended before max_iter for a reason other than the caller closing the generator
    image: np.ndarray | None = None  # scipy's final x, float32 3 x H x W


def lbfgsb_options(max_iter: int, memory: int = 8, ftol: float = 0.0, gtol: float = 0.0) -> dict[str, Any]:
    """scipy's L-BFGS-B options as the tool runs it (benchmarks reuse them to time exactly this optimiser)."""
    # ftol/gtol of 0 and a generous maxfun make maxiter the only ordinary stop, as the original intended.
    return {"maxiter": max_iter, "maxcor": memory, "ftol": ftol, "gtol": gtol, "maxfun": max(15000, 4 * max_iter),
            "maxls": 40}


class _Stop(Exception):
    pass


class LBFGSB:
    """Minimise `evaluate` from `x0` within per-pixel bounds; iterate over `steps()`, then read `result`.

    The vectors are float64 for scipy, the image handed to `evaluate` float32. scipy runs in a worker thread that
    hands each iteration over and waits, so nothing runs ahead of the consumer and closing the generator stops it.
    """

    def __init__(self, evaluate: Callable[[np.ndarray], Evaluation], x0: np.ndarray, lower: np.ndarray,
                 upper: np.ndarray, max_iter: int, memory: int = 8, ftol: float = 0.0, gtol: float = 0.0) -> None:
        self.evaluate = evaluate
        self.shape = x0.shape
        self.x0 = np.clip(x0, lower, upper).astype(np.float64).ravel()
        self.bounds = np.stack([lower.astype(np.float64).ravel(), upper.astype(np.float64).ravel()], axis=1)
        self.max_iter = max_iter
        self.memory = memory
        self.ftol = ftol
        self.gtol = gtol
        self.result = Result()
        self._recent: list[tuple[np.ndarray, Evaluation]] = []
        self.evaluations = 0

    def _fun(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        image = x.reshape(self.shape).astype(np.float32)
        ev = self.evaluate(image)
        self.evaluations += 1
        if not np.isfinite(ev.loss) or not np.all(np.isfinite(ev.grad)):
            raise NonFiniteLossError(f"the loss became {ev.loss} at evaluation {self.evaluations}; "
                                     "try a smaller --ratio or another --init")
        self._recent = [*self._recent[-3:], (x.copy(), ev)]
        return ev.loss, ev.grad.astype(np.float64).ravel()

    def _evaluation_at(self, x: np.ndarray) -> Evaluation | None:
        for seen, ev in reversed(self._recent):
            if np.array_equal(seen, x):
                return ev
        return None

    def steps(self) -> Iterator[Step]:
        handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
        resume = threading.Semaphore(0)
        stop = threading.Event()
        iteration = 0

        def callback(intermediate_result: Any) -> None:
            nonlocal iteration
            iteration += 1
            x = np.asarray(intermediate_result.x)
            handoff.put(("step", Step(iteration, x.reshape(self.shape).astype(np.float32),
                                      self._evaluation_at(x), self.evaluations)))
            resume.acquire()
            if stop.is_set():
                raise _Stop

        def work() -> None:
            try:
                res = minimize(self._fun, self.x0, jac=True, method="L-BFGS-B", bounds=self.bounds,
                               callback=callback,
                               options=lbfgsb_options(self.max_iter, self.memory, self.ftol, self.gtol))
                handoff.put(("done", res))
            except _Stop:
                handoff.put(("stopped", None))
            except BaseException as exc:  # handed to the consumer's thread, which re-raises it
                handoff.put(("error", exc))

        if self.max_iter <= 0:
            raise StyleTransferError("the number of iterations must be at least 1")
        worker = threading.Thread(target=work, name="lbfgsb", daemon=True)
        worker.start()
        try:
            while True:
                kind, payload = handoff.get()
                if kind == "step":
                    yield payload
                    resume.release()
                    continue
                if kind == "error":
                    raise payload
                if kind == "done":
                    status = int(payload.status)
                    message = payload.message if isinstance(payload.message, str) else payload.message.decode()
                    self.result = Result(success=bool(payload.success), message=message, iterations=int(payload.nit),
                                         evaluations=self.evaluations,
                                         stopped_early=int(payload.nit) < self.max_iter and status != 1,
                                         image=np.asarray(payload.x).reshape(self.shape).astype(np.float32))
                return
        finally:
            if worker.is_alive():
                stop.set()
                resume.release()
