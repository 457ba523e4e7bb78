"""scipy's L-BFGS-B run in the caller's thread, reporting each iteration to a callback that may stop the run.

`scipy.optimize.minimize` converts array bounds into a Python list of (low, high) pairs and back, element by element,
which at print sizes costs minutes and several hundred bytes per pixel and channel before the first evaluation. So
when scipy's L-BFGS-B routine (`setulb`) has the arguments this module was written against, the run drives it
directly, with the bounds as arrays, in the same loop `minimize` runs (the same iterates, evaluations and messages;
tests/test_optimize.py compares the two); otherwise it calls `minimize`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, OptimizeResult, minimize

from style_transfer.engines.base import Evaluation
from style_transfer.errors import StyleTransferError

# scipy's setulb (scipy >= 1.15, the C translation of L-BFGS-B) as its docstring names its arguments.
SETULB_SIGNATURE = "setulb(m,x,l,u,nbd,f,g,factr,pgtol,wa,iwa,task,lsave,isave,dsave,maxls,ln_task)"


def _setulb() -> tuple[Callable[..., Any], dict[int, str], dict[int, str]] | None:
    """scipy's setulb and its status and task messages, or None when this scipy's differ from SETULB_SIGNATURE."""
    try:
        from scipy.optimize import _lbfgsb
        from scipy.optimize._lbfgsb_py import status_messages, task_messages
    except ImportError:
        return None
    doc = (getattr(_lbfgsb.setulb, "__doc__", None) or "").strip().splitlines()
    if not doc or doc[0].replace(" ", "") != SETULB_SIGNATURE:
        return None
    return _lbfgsb.setulb, dict(status_messages), dict(task_messages)


SETULB = _setulb()


def workspace_doubles(n: int, memory: int) -> int:
    """Float64 values of setulb's work array for `n` variables and history `memory` (scipy's `wa`)."""
    return (2 * memory + 5) * n + 11 * memory * memory + 8 * memory


class NonFiniteLossError(StyleTransferError):
    """The objective became NaN or infinite."""


@dataclass
class Step:
    iteration: int  # 1-based count of L-BFGS-B iterations done
    image: np.ndarray  # the iterate, float32 3 x H x W (the caller's own copy)
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


def lbfgsb_options(max_iter: int, memory: int = 8) -> dict[str, Any]:
    """scipy's L-BFGS-B options as the tool runs it (benchmarks reuse them to time exactly this optimiser)."""
    # ftol/gtol of 0 and a generous maxfun make maxiter the only ordinary stop, as the original intended.
    return {"maxiter": max_iter, "maxcor": memory, "ftol": 0.0, "gtol": 0.0, "maxfun": max(15000, 4 * max_iter),
            "maxls": 40}


class LBFGSB:
    """Minimise `evaluate` from `x0` within per-pixel bounds with `run(on_step)`.

    The vectors are float64 for scipy, the image handed to `evaluate` float32. scipy runs in the calling thread, so
    a stop (StopIteration from `on_step`, Ctrl-C, a non-finite loss) never leaves an evaluation running behind it.
    """

    def __init__(self, evaluate: Callable[[np.ndarray], Evaluation], x0: np.ndarray, lower: np.ndarray,
                 upper: np.ndarray, max_iter: int, memory: int = 8) -> None:
        self.evaluate = evaluate
        self.shape = x0.shape
        self.x0 = np.clip(x0, lower, upper).astype(np.float64).ravel()
        self.lower = lower.astype(np.float64).ravel()
        self.upper = upper.astype(np.float64).ravel()
        self.max_iter = max_iter
        self.memory = memory
        self.result = Result()
        self._recent: list[tuple[np.ndarray, Evaluation]] = []
        self.evaluations = 0

    def _fun(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        image = self._image(x)
        if self._recent and np.array_equal(self._recent[-1][0], image):  # asked again for the point just evaluated
            ev = self._recent[-1][1]
        else:
            ev = self.evaluate(image)
            self.evaluations += 1
            if not np.isfinite(ev.loss) or not np.all(np.isfinite(ev.grad)):
                raise NonFiniteLossError(f"the loss became {ev.loss} at evaluation {self.evaluations}; "
                                         "try a smaller --ratio or another --init")
            # The evaluation sees the float32 image alone, so that image identifies it; an iterate is reported
            # right after the evaluation that accepted it, so two are plenty.
            self._recent = [*self._recent[-1:], (image, ev)]
        return ev.loss, ev.grad.astype(np.float64).reshape(-1)

    def _evaluation_at(self, image: np.ndarray) -> Evaluation | None:
        return next((ev for seen, ev in reversed(self._recent) if np.array_equal(seen, image)), None)

    def _image(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).reshape(self.shape).astype(np.float32)

    def run(self, on_step: Callable[[Step], None] | None = None) -> Result:
        """Run to the end or until stopped; `on_step` sees each iteration and may raise StopIteration to stop."""
        if self.max_iter <= 0:
            raise StyleTransferError("the number of iterations must be at least 1")
        last_image, iteration, stopped = self._image(self.x0), 0, False

        def callback(intermediate_result: Any) -> None:
            nonlocal last_image, iteration, stopped
            iteration += 1
            last_image = self._image(intermediate_result.x)
            if on_step is not None:
                try:
                    on_step(Step(iteration, last_image.copy(), self._evaluation_at(last_image), self.evaluations))
                except StopIteration:
                    stopped = True
                    raise  # scipy ends the run on it

        def ended(reason: str, message: str, error: str | None = None) -> Result:
            return Result(message=message, iterations=iteration, evaluations=self.evaluations,
                          stopped_early=reason == "nonfinite", image=last_image, stop_reason=reason,
                          error=error, last_evaluation=self._evaluation_at(last_image))

        try:
            options = lbfgsb_options(self.max_iter, self.memory)
            if SETULB is not None and not np.array_equal(self.lower, self.upper):
                res = self._drive(callback, options)
            else:
                res = minimize(self._fun, self.x0, jac=True, method="L-BFGS-B",
                               bounds=Bounds(self.lower, self.upper), callback=callback, options=options)
        except KeyboardInterrupt:
            self.result = ended("interrupted", "interrupted")
        except NonFiniteLossError as exc:
            self.result = ended("nonfinite", str(exc), str(exc))
        else:
            if stopped:
                self.result = ended("stopped", "stopped by the caller")
            else:
                image = self._image(res.x)
                message = res.message if isinstance(res.message, str) else res.message.decode()
                self.result = Result(success=bool(res.success), message=message, iterations=int(res.nit),
                                     evaluations=self.evaluations,
                                     stopped_early=int(res.nit) < self.max_iter and int(res.status) != 1,
                                     image=image, stop_reason=message, last_evaluation=self._evaluation_at(image))
        return self.result

    def _drive(self, callback: Callable[[Any], None], options: dict[str, Any]) -> OptimizeResult:
        """scipy's `_minimize_lbfgsb` loop around setulb, with the bounds given as arrays (see the module's
        docstring). The iterate is `self.x0`, updated in place."""
        assert SETULB is not None
        setulb, status_messages, task_messages = SETULB
        x, lower, upper = self.x0, self.lower, self.upper
        n, m = x.size, int(options["maxcor"])
        has_lower, has_upper = np.isfinite(lower), np.isfinite(upper)
        # scipy's codes: 0 unbounded, 1 lower only, 2 both, 3 upper only; an infinite bound is passed as 0.
        nbd = np.where(has_lower, np.where(has_upper, 2, 1), np.where(has_upper, 3, 0)).astype(np.int32)
        low = lower if has_lower.all() else np.where(has_lower, lower, 0.0)
        high = upper if has_upper.all() else np.where(has_upper, upper, 0.0)
        del has_lower, has_upper
        factr = options["ftol"] / np.finfo(float).eps
        f: Any = np.array(0.0, dtype=np.float64)
        g = np.zeros(n, dtype=np.float64)
        wa = np.zeros(workspace_doubles(n, m), np.float64)
        iwa = np.zeros(3 * n, dtype=np.int32)
        task, ln_task = np.zeros(2, np.int32), np.zeros(2, np.int32)
        lsave, isave, dsave = np.zeros(4, np.int32), np.zeros(44, np.int32), np.zeros(29, np.float64)
        iterations = 0
        while True:
            setulb(m, x, low, high, nbd, f, g, factr, options["gtol"], wa, iwa, task, lsave, isave, dsave,
                   options["maxls"], ln_task)
            if task[0] == 3:  # FG: the objective and gradient at x
                del g  # not needed any more: the new gradient replaces it
                f, g = self._fun(x)
            elif task[0] == 1:  # NEW_X: an iteration is done
                iterations += 1
                try:
                    callback(OptimizeResult(x=x, fun=f))
                except StopIteration:
                    task[0], task[1] = 5, 505
                if iterations >= options["maxiter"]:
                    task[0], task[1] = 5, 504
                elif self.evaluations > options["maxfun"]:
                    task[0], task[1] = 5, 502
            else:
                break
        if task[0] == 4:
            warnflag = 0
        elif self.evaluations > options["maxfun"] or iterations >= options["maxiter"]:
            warnflag = 1
        else:
            warnflag = 2
        message = status_messages[int(task[0])] + ": " + task_messages[int(task[1])]
        return OptimizeResult(fun=f, jac=g, nfev=self.evaluations, nit=iterations, status=warnflag,
                              message=message, x=x, success=warnflag == 0)
