"""scipy's L-BFGS-B run in the caller's thread, reporting each iteration to a callback that may stop the run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, minimize

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
    stopped_early: bool = False  # ended before max_iter for a reason other than the caller stopping it
    image: np.ndarray | None = None  # the final iterate, float32 3 x H x W
    stop_reason: str = ""  # "stopped", "interrupted", "nonfinite", or scipy's message
    error: str | None = None  # the NonFiniteLossError's message
    last_evaluation: Evaluation | None = None  # the objective at `image`, when it was evaluated there


def lbfgsb_options(max_iter: int, memory: int = 8, ftol: float = 0.0, gtol: float = 0.0) -> dict[str, Any]:
    """scipy's L-BFGS-B options as the tool runs it (benchmarks reuse them to time exactly this optimiser)."""
    # ftol/gtol of 0 and a generous maxfun make maxiter the only ordinary stop, as the original intended.
    return {"maxiter": max_iter, "maxcor": memory, "ftol": ftol, "gtol": gtol, "maxfun": max(15000, 4 * max_iter),
            "maxls": 40}


class LBFGSB:
    """Minimise `evaluate` from `x0` within per-pixel bounds with `run(on_step)`.

    The vectors are float64 for scipy, the image handed to `evaluate` float32. scipy runs in the calling thread, so
    a stop (StopIteration from `on_step`, Ctrl-C, a non-finite loss) never leaves an evaluation running behind it.
    """

    def __init__(self, evaluate: Callable[[np.ndarray], Evaluation], x0: np.ndarray, lower: np.ndarray,
                 upper: np.ndarray, max_iter: int, memory: int = 8, ftol: float = 0.0, gtol: float = 0.0) -> None:
        self.evaluate = evaluate
        self.shape = x0.shape
        self.x0 = np.clip(x0, lower, upper).astype(np.float64).ravel()
        self.lower = lower.astype(np.float64).ravel()
        self.upper = upper.astype(np.float64).ravel()
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

    def _image(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(self.shape).astype(np.float32)

    def run(self, on_step: Callable[[Step], None] | None = None) -> Result:
        """Run to the end or until stopped; `on_step` sees each iteration and may raise StopIteration to stop."""
        if self.max_iter <= 0:
            raise StyleTransferError("the number of iterations must be at least 1")
        last_x, iteration, stopped = self.x0, 0, False

        def callback(intermediate_result: Any) -> None:
            nonlocal last_x, iteration, stopped
            iteration += 1
            last_x = np.array(intermediate_result.x, dtype=np.float64)
            if on_step is not None:
                try:
                    on_step(Step(iteration, self._image(last_x), self._evaluation_at(last_x), self.evaluations))
                except StopIteration:
                    stopped = True
                    raise  # scipy ends the run on it

        def ended(reason: str, message: str, error: str | None = None) -> Result:
            return Result(message=message, iterations=iteration, evaluations=self.evaluations,
                          stopped_early=reason == "nonfinite", image=self._image(last_x), stop_reason=reason,
                          error=error, last_evaluation=self._evaluation_at(last_x))

        try:
            res = minimize(self._fun, self.x0, jac=True, method="L-BFGS-B", bounds=Bounds(self.lower, self.upper),
                           callback=callback, options=lbfgsb_options(self.max_iter, self.memory, self.ftol, self.gtol))
        except KeyboardInterrupt:
            self.result = ended("interrupted", "interrupted")
        except NonFiniteLossError as exc:
            self.result = ended("nonfinite", str(exc), str(exc))
        else:
            if stopped:
                self.result = ended("stopped", "stopped by the caller")
            else:
                x = np.asarray(res.x, dtype=np.float64)
                message = res.message if isinstance(res.message, str) else res.message.decode()
                self.result = Result(success=bool(res.success), message=message, iterations=int(res.nit),
                                     evaluations=self.evaluations,
                                     stopped_early=int(res.nit) < self.max_iter and int(res.status) != 1,
                                     image=self._image(x), stop_reason=message, last_evaluation=self._evaluation_at(x))
        return self.result
