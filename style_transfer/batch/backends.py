"""Where jobs run: worker processes on this machine, or a Dask distributed cluster. Both take Tasks and give back
Outcomes; a local worker that dies is reported as `Died`, so that the runner can tell a crash from a failure."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from style_transfer.batch.worker import Outcome, Task
from style_transfer.errors import StyleTransferError
from style_transfer.util import one_line

TaskFunction = Callable[[Task], Outcome]


class Died:
    """A local worker process ended while this job was on it."""


class Backend(Protocol):
    def capacity(self) -> int: ...

    def submit(self, task: Task) -> Any: ...

    def wait(self, futures: list[Any], timeout: float) -> list[Any]: ...

    def outcome(self, future: Any) -> Outcome | Died:
        """A finished job's outcome. Only a local pool dies with its worker: Dask retries a task whose worker died,
        and gives up with KilledWorker, reported as a failure, after a few such deaths."""
        try:
            return future.result()
        except BrokenProcessPool:
            return Died()
        except Exception as exc:
            return Outcome("failed", one_line(f"{type(exc).__name__}: {exc}"))

    def settle(self, futures: list[Any]) -> list[Any]:
        """After a death: those of the other running `futures` that it ended too, once the backend is ready for new
        jobs (a local pool ends them all, and is replaced)."""
        return []

    def abandon(self, futures: list[Any]) -> None: ...

    def close(self) -> None: ...


def _start_local_worker(threads: int, pids: Any) -> None:
    # Ctrl-C reaches the whole process group; the parent decides what stops, and it tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pids.put(os.getpid())  # so that the parent can end this process if its job is abandoned
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def child_thread_limits(threads: int) -> Iterator[None]:
    """Spawned workers read these at start-up: BLAS and OpenMP pools sized so that N workers share the cores."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: str(threads) for n in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LocalBackend(Backend):
    """Worker processes on this machine. Spawned, not forked: torch's threads do not survive a fork."""

    def __init__(self, workers: int, threads: int, function: TaskFunction) -> None:
        self.workers = workers
        self.threads = threads
        self.function = function
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        self.pids = context.SimpleQueue()  # each worker of this pool puts its process id here as it starts
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=_start_local_worker,
                                   initargs=(self.threads, self.pids))

    def capacity(self) -> int:
        # No queue beyond the workers: what is in flight is what is running, which makes a crash attributable
        # and lets Ctrl-C stop everything not yet started.
        return self.workers

    def submit(self, task: Task) -> Future[Outcome]:
        try:
            return self.pool.submit(self.function, task)
        except BrokenProcessPool as exc:
            # A worker died after the last look at the running jobs: this job never started. It is handed back
            # as one the broken pool ended, so it runs again like the others that were running.
            future: Future[Outcome] = Future()
            future.set_exception(exc)
            return future

    def wait(self, futures: list[Any], timeout: float) -> list[Any]:
        done, _ = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def settle(self, futures: list[Any]) -> list[Any]:
        done, _ = wait(futures, timeout=30)
        self.recover()
        return list(done)

    def recover(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()

    def abandon(self, futures: list[Any]) -> None:
        # Running jobs cannot be cancelled through the executor; their processes are ended instead: the children
        # still alive whose ids this pool's workers reported.
        ours = set()
        while not self.pids.empty():
            ours.add(self.pids.get())
        for process in multiprocessing.active_children():
            if process.pid in ours:
                process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskBackend(Backend):
    """A Dask distributed cluster, reached through its scheduler."""

    def __init__(self, address: str, threads: int | None, function: TaskFunction) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise StyleTransferError("--dask-scheduler needs Dask: pip install 'dask[distributed]'") from None
        try:
            # The wait for an unreachable scheduler is Dask's connect timeout (distributed.comm.timeouts.connect).
            self.client = Client(address, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise StyleTransferError(f"cannot reach the Dask scheduler at {address}: {one_line(exc)}") from None
        self.threads = threads
        self.function = function
        self._refresh()

    def _refresh(self) -> None:
        workers = self.client.scheduler_info().get("workers", {})
        per_host = Counter(info.get("host", "") for info in workers.values())
        self.host_workers = {addr: per_host[info.get("host", "")] for addr, info in workers.items()}
        # Two tasks per worker thread keep the workers busy while results travel back.
        self._capacity = max(1, 2 * sum(int(info.get("nthreads", 1)) for info in workers.values()))
        self._checked = time.monotonic()

    def capacity(self) -> int:
        if time.monotonic() - self._checked > 2.0:
            self._refresh()
        return self._capacity

    def submit(self, task: Task) -> Any:
        if self.threads is None:
            task = dataclasses.replace(task, host_workers=self.host_workers)
        return self.client.submit(self.function, task, key=f"stylize-job{task.job}-{uuid.uuid4().hex[:8]}",
                                  pure=False)

    def wait(self, futures: list[Any], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            done = [f for f in futures if f.done()]
            if done or time.monotonic() >= deadline:
                return done
            time.sleep(0.05)

    def abandon(self, futures: list[Any]) -> None:
        self.client.cancel(futures)

    def close(self) -> None:
        self.client.close()
