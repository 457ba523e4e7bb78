"""Worker side: one job from plain data (image bytes, options) to pixels and a report; nothing here raises."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from style_transfer import images
from style_transfer.errors import StyleTransferError
from style_transfer.options import values_for
from style_transfer.util import one_line

if TYPE_CHECKING:
    from style_transfer.transfer import StyleTransfer

MODEL_CACHE_SIZE = 3


@dataclass(frozen=True)
class InputFile:
    name: str  # the path the manifest gave, for messages
    data: bytes


@dataclass(frozen=True)
class Task:
    """What a worker needs for one job; plain data, so that it pickles for processes and Dask alike."""

    job: int
    content: InputFile
    styles: tuple[InputFile, ...]
    init: str | InputFile
    options: dict[str, Any]
    threads: int | None = None  # torch threads for the job; None: see host_workers
    host_workers: dict[str, int] | None = None  # Dask: worker address -> worker processes on its host


@dataclass
class Outcome:
    status: str  # "ok", "failed" or "interrupted"
    error: str | None = None
    image: np.ndarray | None = None  # RGB H x W x 3 in [0, 1]
    report: dict[str, Any] = field(default_factory=dict)


# A job holds the lock from start to end: torch already spreads one job over the cores, the Caffe engine's blobs
# take one evaluation at a time, and Dask may run tasks in several threads of one process.
_JOB_LOCK = threading.Lock()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def model_key(options: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a loaded net: its model options."""
    return tuple(values_for("model", options).items())


def read_input(path: Path) -> InputFile:
    """An input image's bytes, read by the parent: workers on other hosts need not see its files."""
    return InputFile(str(path), images.read_file(path))


def run_task(task: Task) -> Outcome:
    """Run one job; every failure is returned as an outcome, never raised."""
    report: dict[str, Any] = {"worker": f"{socket.gethostname()}:{os.getpid()}", "started": _now()}
    started = time.perf_counter()
    try:
        with _JOB_LOCK:
            _set_threads(task)
            outcome = _stylize(task, report)
    except StyleTransferError as exc:
        outcome = Outcome("failed", one_line(exc))
    except MemoryError:
        outcome = Outcome("failed", "out of memory; try a smaller -l/--length")
    except Exception as exc:
        # Whatever else goes wrong belongs to this job; the worker lives on for the others.
        outcome = Outcome("failed", one_line(f"{type(exc).__name__}: {exc}"))
    outcome.report = {**report, **outcome.report, "finished": _now(), "job_seconds": time.perf_counter() - started}
    return outcome


def _stylize(task: Task, report: dict[str, Any]) -> Outcome:
    import torch

    opts = task.options
    notices: list[str] = []
    content = _decode(task.content, opts["max_pixels"], notices)
    styles = [_decode(s, opts["max_pixels"], notices) for s in task.styles]
    run_options = values_for("run", opts)
    if isinstance(task.init, InputFile):
        run_options["init"] = _decode(task.init, opts["max_pixels"], notices)

    started = time.perf_counter()
    loads = _model.cache_info().misses
    model = _model(model_key(opts))
    fresh = _model.cache_info().misses > loads
    report["model_loaded_fresh"] = fresh
    report["model_load_seconds"] = time.perf_counter() - started if fresh else 0.0
    run = model.stylize(content, styles, **run_options)
    result = run.run()
    report.update({**result.report, "threads": torch.get_num_threads(), "notices": [*notices, *run.notices]})
    if result.failed:
        return Outcome("failed", one_line(result.error or "the loss became non-finite"))
    if result.interrupted:
        return Outcome("interrupted", "interrupted while running")
    return Outcome("ok", image=result.rgb)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=MODEL_CACHE_SIZE)
def _model(key: tuple[tuple[str, Any], ...]) -> StyleTransfer:
    """The net for a model_key(), kept for the next jobs of this worker process (the most recently used few)."""
    from style_transfer.transfer import StyleTransfer

    return StyleTransfer(**dict(key))


def _decode(item: InputFile, max_pixels: int, notices: list[str]) -> np.ndarray:
    return images.load_image(item.name, max_pixels=max_pixels, notices=notices, data=item.data)


def _set_threads(task: Task) -> None:
    threads = task.threads
    if threads is None and task.host_workers:
        try:
            from distributed import get_worker

            sharing = task.host_workers.get(get_worker().address)
        except (ImportError, ValueError):
            sharing = None
        if sharing:
            threads = max(1, cpu_count() // sharing)
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
