"""`style.py batch MANIFEST.csv`: many stylizations from a manifest, on local worker processes or on Dask.

The manifest is a CSV file (a `.tsv` one is tab-separated) with a header row. Columns `style`, `content` and `output`
are required; any job option of style.py may be a column too, under its long name with `_` or `-` (`model`, `ratio`,
`num_iters`, `length`, `init`, `seed`, `pooling`, `style_scale`, `tv_weight`, `lbfgs_memory`, `engine`, `gpu`,
`weights`, `prototxt`, `style_layers`, `content_layers`, `models_dir`, `style_weights`, `max_pixels`, `scales`,
`min_length`, `color_match`, `original_colors` (1/0, yes/no, true/false), `precision`). An empty cell takes the
value given on the command line, or style.py's default. Several style images go in one cell separated by `;`
(their blend weights likewise in `style_weights`). Relative paths in the manifest are relative to its folder. Blank
rows and rows whose first cell starts with `#` are ignored.

Every job writes its image and, beside it, a JSON report `<output>.json`. A job counts as finished when its output
exists and its report says `ok` for the same job description (images, output and options); finished jobs are
skipped, so a batch that crashed or was interrupted resumes where it stopped, and a failed job runs again next time.
The image is written before the report, both atomically, so a crash in between leaves a job that runs again.
A summary (JSON, default `<manifest>.summary.json`) lists every job; a table of it is printed at the end.

Exit codes: 0 every job finished (now or before), 1 at least one job failed, 2 the command line or the manifest
itself is wrong (nothing ran), 130 interrupted with Ctrl-C.

Each worker process keeps the nets it has loaded (a few, most recently used first), so a model is read once per
worker, not once per job. Input images travel to the workers as file bytes and results come back as pixels, so
Dask workers on other hosts need only the model weights (at the paths the jobs name, or in their models folder),
not the images nor the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import numpy as np

from style_transfer import cli, images
from style_transfer.errors import ImageError, StyleTransferError
from style_transfer.openmp import prefer_short_spin

if TYPE_CHECKING:
    from style_transfer.transfer import StyleTransfer

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

REQUIRED_COLUMNS = ("style", "content", "output")
# The job options a manifest column may set, by their names in style.py's parser.
OPTION_COLUMNS = ("model", "ratio", "num_iters", "length", "init", "seed", "pooling", "style_scale", "tv_weight",
                  "lbfgs_memory", "engine", "gpu", "weights", "prototxt", "style_layers", "content_layers",
                  "models_dir", "style_weights", "max_pixels", "scales", "min_length", "color_match",
                  "original_colors", "precision")
_FLAG_OPTIONS = ("original_colors",)
_TRUE = ("1", "yes", "true", "y", "on")
_FALSE = ("0", "no", "false", "n", "off")
_PATH_OPTIONS = ("weights", "prototxt", "models_dir")
# style.py options that the batch does not take: the first four are what the manifest's columns and the per-job
# reports are for; the others write extra files per run or do something else than stylizing.
_NOT_IN_BATCH = {"style": "-s/--style-img", "content": "-c/--content-img", "output": "-o/--output",
                 "report": "--report", "save_every": "--save-every", "animation": "--animation",
                 "download": "--download", "mirror": "--mirror"}
# Where or how a job runs, not what it computes: changing these does not make finished jobs run again.
_NOT_FINGERPRINTED = frozenset({"gpu", "models_dir", "max_pixels", "verbose", "download_missing"})
# What identifies a loaded net in a worker's cache.
_MODEL_KEY = ("model", "prototxt", "weights", "models_dir", "style_layers", "content_layers", "pooling", "engine",
              "gpu", "precision")
_MODEL_CACHE_SIZE = 3


class ManifestError(StyleTransferError):
    """The manifest as a whole cannot be used (not one of its jobs)."""


# --------------------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One manifest row, resolved: absolute paths, every option filled in."""

    number: int  # 1-based position among the manifest's jobs
    line: int  # line of the manifest file the row is on
    output: Path | None
    styles: list[Path] = field(default_factory=list)
    content: Path | None = None
    init_file: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # found while reading the row: the job fails without running

    @property
    def report_path(self) -> Path | None:
        return None if self.output is None else self.output.with_name(self.output.name + ".json")

    @property
    def fingerprint(self) -> str:
        spec = {"style": [str(p) for p in self.styles], "content": str(self.content), "output": str(self.output),
                **{k: v for k, v in self.options.items() if k not in _NOT_FINGERPRINTED}}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def model_key(self) -> tuple[str, ...]:
        return tuple(str(self.options.get(k)) for k in _MODEL_KEY)


def _column_name(text: str) -> str:
    return text.strip().lower().replace("-", "_")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _resolve(base: Path, text: str) -> Path:
    return (base / Path(text).expanduser()).absolute()


class _OptionParser:
    """style.py's own parser, used to check and convert option values exactly as a single run would."""

    def __init__(self) -> None:
        self.parser = cli.build_parser()

    def parse(self, tokens: list[str]) -> argparse.Namespace:
        captured = io.StringIO()
        try:
            # -s and -c are required by style.py; they come from the manifest's own columns here.
            with contextlib.redirect_stderr(captured):
                return self.parser.parse_args([*tokens, "-s", "-", "-c", "-"])
        except SystemExit:
            lines = captured.getvalue().strip().splitlines()
            message = lines[-1] if lines else "invalid option"
            raise StyleTransferError(message.removeprefix(f"{self.parser.prog}: error: ")) from None


def read_manifest(path: Path, defaults: dict[str, Any]) -> list[Job]:
    """The manifest's jobs; `defaults` holds every job option (command-line values, absolute paths)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise ManifestError(f"{path}, line {reader.line_num}: {exc}") from None
    rows = [(line, row) for line, row in rows if any(c.strip() for c in row) and not row[0].lstrip().startswith("#")]
    if not rows:
        raise ManifestError(f"manifest {path} is empty: it needs a header row (style,content,output,...) and jobs")

    header_line, header = rows[0]
    names = [_column_name(h) for h in header]
    known = set(REQUIRED_COLUMNS) | set(OPTION_COLUMNS)
    unknown = [h for h, n in zip(header, names, strict=True) if n not in known]
    if unknown:
        raise ManifestError(f"{path}, line {header_line}: unknown column(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join((*REQUIRED_COLUMNS, *OPTION_COLUMNS))}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ManifestError(f"{path}, line {header_line}: column(s) given twice: {', '.join(repeated)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ManifestError(f"{path}, line {header_line}: missing column(s) {', '.join(missing)} "
                            f"(the header must name style, content and output)")
    if len(rows) == 1:
        raise ManifestError(f"manifest {path} has a header but no jobs")

    base = path.parent.absolute()
    parser = _OptionParser()
    jobs = [_job_from_row(number, line, names, row, base, defaults, parser)
            for number, (line, row) in enumerate(rows[1:], start=1)]

    seen: dict[Path, int] = {}
    for job in jobs:
        if job.output is None:
            continue
        if job.output in seen:
            raise ManifestError(f"{path}: lines {seen[job.output]} and {job.line} both write {job.output}; "
                                "every job needs its own output")
        seen[job.output] = job.line
    return jobs


def _job_from_row(number: int, line: int, names: list[str], row: list[str], base: Path,
                  defaults: dict[str, Any], parser: _OptionParser) -> Job:
    cells = {n: (row[i].strip() if i < len(row) else "") for i, n in enumerate(names)}
    job = Job(number=number, line=line, output=_resolve(base, cells["output"]) if cells["output"] else None,
              options=dict(defaults))
    try:
        if len(row) > len(names):
            raise StyleTransferError(f"the row has {len(row)} cells but the header names {len(names)} columns")
        if job.output is None:
            raise StyleTransferError("no output given")
        job.styles = [_resolve(base, s.strip()) for s in cells["style"].split(";") if s.strip()]
        if not job.styles:
            raise StyleTransferError("no style image given")
        if not cells["content"]:
            raise StyleTransferError("no content image given")
        job.content = _resolve(base, cells["content"])

        tokens: list[str] = []
        given = [n for n in OPTION_COLUMNS if cells.get(n) and n not in _FLAG_OPTIONS]
        for name in _FLAG_OPTIONS:
            value = cells.get(name, "").lower()
            if value:
                if value not in _TRUE + _FALSE:
                    raise StyleTransferError(f"{name} must be one of {'/'.join(_TRUE + _FALSE)}, got {value!r}")
                job.options[name] = value in _TRUE
        for name in given:
            value = cells[name]
            if name in _PATH_OPTIONS or (name == "init" and value not in ("content", "mixed")
                                         and not _is_number(value)):
                value = str(_resolve(base, value))
            if name == "style_weights":
                tokens += ["--style-weights", *value.replace(";", " ").split()]
            else:
                # The = form keeps values such as "-1" from reading as options.
                tokens.append(f"--{name.replace('_', '-')}={value}")
        if given:
            parsed = parser.parse(tokens)
            job.options.update({name: getattr(parsed, name) for name in given})
        _check_options(job)
    except StyleTransferError as exc:
        job.problem = f"manifest line {line}: {exc}"
    return job


def _check_options(job: Job) -> None:
    """What style.py checks after parsing, done while reading so that a bad row fails before anything runs."""
    try:
        ratio = float(job.options["ratio"])
    except ValueError:
        raise StyleTransferError(f"ratio needs a number, got {job.options['ratio']!r}") from None
    if not np.isfinite(ratio) or ratio < 0:
        raise StyleTransferError(f"ratio must be a finite number >= 0, got {job.options['ratio']!r}")
    blend = job.options.get("style_weights")
    if blend is not None and len(blend) != len(job.styles):
        raise StyleTransferError(f"{len(job.styles)} style image(s) but {len(blend)} style weight(s)")
    init = str(job.options["init"])
    if init not in ("content", "mixed") and not _is_number(init):
        job.init_file = Path(init)


def _is_finished(job: Job) -> bool:
    if job.problem is not None or job.output is None or job.report_path is None or not job.output.is_file():
        return False
    try:
        report = json.loads(job.report_path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("status") == "ok" and report.get("fingerprint") == job.fingerprint


# ------------------------------------------------------------------------------------------ worker side: tasks


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


# Per worker process: a job holds the lock from start to end because an engine keeps one objective at a time (and
# torch already spreads one job over the cores); Dask may run tasks in several threads of one process.
_MODELS: OrderedDict[tuple[Any, ...], StyleTransfer] = OrderedDict()
_JOB_LOCK = threading.Lock()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _loaded_model(options: dict[str, Any]) -> tuple[StyleTransfer, bool]:
    """The net for these options, loaded now (True) or kept from an earlier job of this process (False)."""
    key = tuple(options[k] for k in _MODEL_KEY)
    model = _MODELS.get(key)
    if model is not None:
        _MODELS.move_to_end(key)
        return model, False
    from style_transfer.transfer import StyleTransfer

    model = StyleTransfer(options["model"], prototxt=options["prototxt"], weights=options["weights"],
                          models_dir=options["models_dir"], style_layers=options["style_layers"],
                          content_layers=options["content_layers"], pooling=options["pooling"],
                          engine=options["engine"], gpu=options["gpu"], verbose=options["verbose"],
                          download_missing=options["download_missing"], precision=options["precision"])
    _MODELS[key] = model
    while len(_MODELS) > _MODEL_CACHE_SIZE:
        _MODELS.popitem(last=False)
    return model, True


def _decode(item: InputFile, max_pixels: int, notices: list[str]) -> np.ndarray:
    # load_image reads files; the bytes get a private file under their own base name, and messages get the
    # manifest's path back.
    with tempfile.TemporaryDirectory(prefix="style-batch-") as folder:
        path = Path(folder) / (Path(item.name).name or "image")
        path.write_bytes(item.data)
        found: list[str] = []
        try:
            return images.load_image(path, max_pixels=max_pixels, notices=found)
        except ImageError as exc:
            raise ImageError(str(exc).replace(str(path), item.name)) from None
        finally:
            notices.extend(n.replace(str(path), item.name) for n in found)


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


def run_task(task: Task) -> Outcome:
    """Run one job in a worker process; every failure is returned as an outcome, never raised."""
    report: dict[str, Any] = {"worker": f"{socket.gethostname()}:{os.getpid()}", "started": _now()}
    started = time.perf_counter()
    try:
        with _JOB_LOCK:
            _set_threads(task)
            outcome = _stylize(task, report)
    except StyleTransferError as exc:
        outcome = Outcome("failed", _one_line(str(exc)))
    except MemoryError:
        outcome = Outcome("failed", "out of memory; try a smaller -l/--length")
    except Exception as exc:
        # Whatever else goes wrong belongs to this job; the worker lives on for the others.
        outcome = Outcome("failed", _one_line(f"{type(exc).__name__}: {exc}"))
    outcome.report = {**report, **outcome.report, "finished": _now(),
                      "job_seconds": time.perf_counter() - started}
    return outcome


def _stylize(task: Task, report: dict[str, Any]) -> Outcome:
    opts = task.options
    notices: list[str] = []
    content = _decode(task.content, opts["max_pixels"], notices)
    styles = [_decode(s, opts["max_pixels"], notices) for s in task.styles]
    init: str | np.ndarray = task.init if isinstance(task.init, str) else \
        _decode(task.init, opts["max_pixels"], notices)

    started = time.perf_counter()
    model, fresh = _loaded_model(opts)
    report["model_loaded_fresh"] = fresh
    report["model_load_seconds"] = time.perf_counter() - started if fresh else 0.0
    run = model.stylize(content, styles, style_blend=opts["style_weights"], ratio=float(opts["ratio"]),
                        iterations=opts["num_iters"], length=opts["length"], style_scale=opts["style_scale"],
                        init=init, seed=opts["seed"], lbfgs_memory=opts["lbfgs_memory"],
                        tv_weight=opts["tv_weight"], scales=opts["scales"], min_length=opts["min_length"],
                        color_match=opts["color_match"])
    notices += run.notices
    setup_seconds = time.perf_counter() - started

    optimise_started = time.perf_counter()
    last = None
    for step in run.steps():
        last = step
    seconds = time.perf_counter() - optimise_started
    result = run.result
    final = result.image if result.image is not None else (last.image if last is not None else None)
    if final is None:
        raise StyleTransferError("the optimisation stopped before its first iteration; nothing to save")
    if result.stopped_early:
        notices.append(f"L-BFGS-B stopped after {result.iterations} of {run.iterations} iterations: "
                       f"{result.message}")
    if last is not None and last.evaluation is not None and np.array_equal(last.image, final):
        final_eval = last.evaluation
    else:
        final_eval = model.engine.evaluate(final)
    rgb = run.to_rgb(final)
    if opts["original_colors"]:
        from style_transfer.colors import original_colors

        rgb = original_colors(rgb, images.resize_to(content, rgb.shape[0], rgb.shape[1]))
    report.update({
        "engine": opts["engine"],
        "model": model.model,
        "iterations": last.iteration if last is not None else 0,
        **run.report(final, final_eval, seconds, setup_seconds),
        "stop_reason": result.message,
        "threads": _torch_threads(),
        "notices": notices,
    })
    return Outcome("ok", image=rgb, report=report)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _init_local_worker(threads: int) -> None:
    # Ctrl-C reaches the whole process group; the parent decides what stops, and it tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ parent side: backends


class _Died:
    """A local worker process ended while this job was on it."""


class _Backend(Protocol):
    def capacity(self) -> int: ...

    def submit(self, task: Task) -> Any: ...

    def wait(self, futures: list[Any], timeout: float) -> list[Any]: ...

    def outcome(self, future: Any) -> Outcome | _Died: ...

    def settle(self, futures: list[Any]) -> list[Any]: ...

    def recover(self) -> None: ...

    def abandon(self, futures: list[Any]) -> None: ...

    def close(self) -> None: ...


TaskFunction = Callable[[Task], Outcome]


class _LocalBackend:
    """Worker processes on this machine. Spawned, not forked: torch's threads do not survive a fork."""

    def __init__(self, workers: int, threads: int, function: TaskFunction) -> None:
        self.workers = workers
        self.threads = threads
        self.function = function
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_local_worker, initargs=(self.threads,))

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
        return list(done)

    def outcome(self, future: Any) -> Outcome | _Died:
        try:
            result: Outcome = future.result()
        except BrokenProcessPool:
            return _Died()
        except Exception as exc:
            return Outcome("failed", _one_line(f"{type(exc).__name__}: {exc}"))
        return result

    def recover(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()

    def abandon(self, futures: list[Any]) -> None:
        # Running jobs cannot be cancelled through the executor; their processes are ended instead.
        for process in list((self.pool._processes or {}).values()):
            process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _DaskBackend:
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
            raise StyleTransferError(f"cannot reach the Dask scheduler at {address}: {_one_line(str(exc))}") \
                from None
        self.threads = threads
        self.function = function
        self._checked = 0.0
        self._capacity = 1
        self.host_workers: dict[str, int] = {}
        self._refresh()

    def _refresh(self) -> None:
        workers = self.client.scheduler_info().get("workers", {})
        per_host: dict[str, int] = {}
        for info in workers.values():
            per_host[info.get("host", "")] = per_host.get(info.get("host", ""), 0) + 1
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

    def outcome(self, future: Any) -> Outcome | _Died:
        try:
            result: Outcome = future.result()
        except Exception as exc:
            # Dask retries a task whose worker died, and gives up with KilledWorker after a few such deaths.
            return Outcome("failed", _one_line(f"{type(exc).__name__}: {exc}"))
        return result

    def settle(self, futures: list[Any]) -> list[Any]:
        return []

    def recover(self) -> None:
        pass

    def abandon(self, futures: list[Any]) -> None:
        self.client.cancel(futures)

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------------------------------ the batch run


class _Interrupts:
    """Counts Ctrl-C presses instead of raising, so that no file write is cut in half by KeyboardInterrupt."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def _child_thread_limits(threads: int) -> Iterator[None]:
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


@dataclass
class _Record:
    job: Job
    status: str = "pending"  # ok, skipped, failed, interrupted, not run
    error: str | None = None
    seconds: float | None = None
    worker: str | None = None
    model_loaded_fresh: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job.number, "line": self.job.line, "status": self.status,
                "output": str(self.job.output) if self.job.output else None,
                "report": str(self.job.report_path) if self.job.report_path else None, "error": self.error,
                "seconds": self.seconds, "worker": self.worker, "model_loaded_fresh": self.model_loaded_fresh}


class _Batch:
    def __init__(self, manifest: Path, jobs: list[Job], say: Callable[[str], None]) -> None:
        self.manifest = manifest
        self.records = {job.number: _Record(job) for job in jobs}
        self.say = say
        self.finished = 0
        self.to_run = 0
        self.notices: set[str] = set()

    def prepare(self, job: Job, threads: int | None) -> Task:
        if job.problem is not None:
            raise StyleTransferError(job.problem)
        assert job.output is not None and job.content is not None
        images.check_output_path(job.output)
        init: str | InputFile = str(job.options["init"]) if job.init_file is None else _read_input(job.init_file)
        return Task(job=job.number, content=_read_input(job.content),
                    styles=tuple(_read_input(p) for p in job.styles), init=init, options=dict(job.options),
                    threads=threads)

    def finish(self, job: Job, outcome: Outcome) -> None:
        record = self.records[job.number]
        if outcome.status == "ok" and outcome.image is not None and job.output is not None:
            try:
                images.save_image(job.output, outcome.image)
            except StyleTransferError as exc:
                outcome = Outcome("failed", _one_line(str(exc)), report=outcome.report)
        report = {"status": outcome.status, "error": outcome.error, "fingerprint": job.fingerprint,
                  "manifest": str(self.manifest), "job": job.number, "line": job.line,
                  "style": [str(p) for p in job.styles], "content": str(job.content) if job.content else None,
                  "output": str(job.output) if job.output else None, **outcome.report,
                  "options": dict(job.options)}
        if job.report_path is not None and job.output is not None and job.output.parent.is_dir():
            try:
                _write_json(job.report_path, report)
            except OSError as exc:
                if outcome.status == "ok":
                    outcome = Outcome("failed", f"cannot write the report {job.report_path}: "
                                                f"{exc.strerror or exc}", report=outcome.report)
        record.status = outcome.status
        record.error = outcome.error
        record.seconds = outcome.report.get("job_seconds")
        record.worker = outcome.report.get("worker")
        record.model_loaded_fresh = outcome.report.get("model_loaded_fresh")
        for notice in outcome.report.get("notices", []):
            if notice not in self.notices:
                self.notices.add(notice)
                self.say(notice)
        self.finished += 1
        where = _shown(job.output) if job.output is not None else f"manifest line {job.line}"
        if outcome.status == "ok":
            self.say(f"[{self.finished}/{self.to_run}] ok      {record.seconds or 0:7.1f} s  {where}")
        else:
            self.say(f"[{self.finished}/{self.to_run}] {outcome.status.upper():7s}            {where}: "
                     f"{outcome.error}")

    def drive(self, backend: _Backend, pending: deque[Job], threads: int | None, interrupts: _Interrupts) -> bool:
        """Run the pending jobs on the backend; True if stopped by Ctrl-C."""
        inflight: dict[Any, Job] = {}
        suspects: deque[Job] = deque()  # were running when a worker process died; now run one at a time
        isolating: set[int] = set()
        seen_interrupts = 0
        while True:
            if interrupts.count > seen_interrupts:
                seen_interrupts = interrupts.count
                if seen_interrupts == 1:
                    self.say(f"interrupted: starting no more jobs; waiting for the {len(inflight)} running "
                             "(Ctrl-C again to abandon them)")
                else:
                    self.say(f"abandoning {len(inflight)} running job(s)")
                    backend.abandon(list(inflight))
                    for job in inflight.values():
                        self.finish(job, Outcome("interrupted", "interrupted while running"))
                    inflight.clear()
                    return True
            while seen_interrupts == 0 and (suspects or pending):
                alone = bool(suspects)
                if (alone and inflight) or (not alone and (isolating or len(inflight) >= backend.capacity())):
                    break
                job = suspects.popleft() if alone else pending.popleft()
                try:
                    task = self.prepare(job, threads)
                except StyleTransferError as exc:
                    self.finish(job, Outcome("failed", _one_line(str(exc))))
                    continue
                inflight[backend.submit(task)] = job
                if alone:
                    isolating.add(job.number)
            if not inflight:
                return seen_interrupts > 0
            running = len(inflight)
            outcomes = {f: backend.outcome(f) for f in backend.wait(list(inflight), timeout=0.25)}
            died = any(isinstance(o, _Died) for o in outcomes.values())
            if died:
                # A broken pool ends every job it held; collect them all before a new pool starts.
                rest = [f for f in inflight if f not in outcomes]
                outcomes.update({f: backend.outcome(f) for f in backend.settle(rest)})
            for future, outcome in outcomes.items():
                job = inflight.pop(future)
                isolating.discard(job.number)
                if not isinstance(outcome, _Died):
                    self.finish(job, outcome)
                elif running == 1:
                    self.finish(job, Outcome("failed", "the worker process died while running this job "
                                                       "(a crash, or the system ran out of memory)"))
                else:
                    suspects.append(job)  # one of them killed the worker: each runs again, alone
            if died:
                backend.recover()

    def summary(self, started: float, interrupted: bool, mode: str) -> tuple[dict[str, Any], int]:
        for record in self.records.values():
            if record.status == "pending":
                record.status = "not run"
        counts: dict[str, int] = {}
        for record in self.records.values():
            counts[record.status] = counts.get(record.status, 0) + 1
        if interrupted:
            code = EXIT_INTERRUPTED
        elif counts.get("failed"):
            code = EXIT_FAILED
        else:
            code = EXIT_OK
        data = {"manifest": str(self.manifest), "mode": mode,
                "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                "seconds": time.time() - started, "interrupted": interrupted, "exit_code": code,
                "jobs_total": len(self.records), "counts": counts, "jobs": [r.as_dict() for r in self.records.values()]}
        return data, code


def _read_input(path: Path) -> InputFile:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise ImageError(f"{path} is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return InputFile(str(path), data)


_STATUSES = ("ok", "skipped", "failed", "interrupted", "not run")


def _shown(path: Path) -> str:
    """Paths under the working folder are shown relative to it: tables stay readable."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table: one row per job, failures with their error."""
    rows = [("job", "line", "status", "seconds", "output", "error")]
    for job in summary["jobs"]:
        seconds = f"{job['seconds']:.1f}" if isinstance(job.get("seconds"), (int, float)) else "-"
        status = "skipped (done before)" if job["status"] == "skipped" else job["status"]
        output = _shown(Path(job["output"])) if job["output"] else "-"
        rows.append((str(job["job"]), str(job["line"]), status, seconds, output, job["error"] or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join([r[0].rjust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]),
                        r[3].rjust(widths[3]), r[4].ljust(widths[4]), r[5]]).rstrip() for r in rows]
    counts = ", ".join(f"{summary['counts'][s]} {s}" for s in _STATUSES if s in summary["counts"])
    lines.append(f"{summary['jobs_total']} job(s): {counts}; {summary['seconds']:.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        # "(default: None)" says nothing; those options say their default in words.
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} needs a whole number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """style.py's options (defaults for every job) plus the batch's own."""
    job_options = cli.build_parser()
    p = _Parser(prog="style.py batch", parents=[job_options], add_help=False,
                formatter_class=_Formatter,
                usage="style.py batch MANIFEST.csv [--workers N | --dask-scheduler ADDRESS] [options]",
                description="Run every job of a CSV manifest (columns style, content, output, and any job option "
                            "below by its long name); skip the jobs finished before.",
                epilog="The style.py options give every job its defaults; the manifest's columns override them.\n"
                       "Exit codes: 0 all jobs finished, 1 some failed, 2 usage or manifest error, "
                       "130 interrupted.")
    # argparse has no public way to leave out some of a parent's options; these are refused after parsing.
    for action in p._actions:
        if action.dest in _NOT_IN_BATCH:
            action.required = False
            action.help = argparse.SUPPRESS
    p.add_argument("manifest", metavar="MANIFEST.csv", help="the jobs (see above)")
    group = p.add_argument_group("batch options")
    group.add_argument("--workers", type=_positive("--workers"), default=None,
                       help="local worker processes (default 1)")
    group.add_argument("--threads", type=_positive("--threads"), default=None,
                       help="torch threads per worker (default: cores / workers; on Dask: the worker host's "
                            "cores / its worker processes)")
    group.add_argument("--dask-scheduler", metavar="ADDRESS", default=None,
                       help="run on a Dask distributed cluster, e.g. tcp://host:8786, instead of local processes")
    group.add_argument("--force", action="store_true", help="run every job, also those finished before")
    group.add_argument("--summary", default=None,
                       help="where the JSON summary goes (default: MANIFEST's name with .summary.json)")
    group.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    return p


def _job_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Every job option from the command line, with paths made absolute (workers may run elsewhere)."""
    names = [*OPTION_COLUMNS, "verbose", "download_missing"]
    defaults = {name: getattr(args, name) for name in names}
    cwd = Path.cwd()
    for name in _PATH_OPTIONS:
        if defaults[name]:
            defaults[name] = str(_resolve(cwd, defaults[name]))
    init = str(defaults["init"])
    if init not in ("content", "mixed") and not _is_number(init):
        defaults["init"] = str(_resolve(cwd, init))
    return defaults


def _say(message: str) -> None:
    print(f"style.py batch: {message}", file=sys.stderr, flush=True)


def batch_main(argv: Sequence[str] | None = None, *, task_function: TaskFunction = run_task) -> int:
    """`style.py batch MANIFEST.csv [options]`; `argv` is what follows the word `batch`."""
    args = build_parser().parse_args(argv)
    for dest, flag in _NOT_IN_BATCH.items():
        if getattr(args, dest) is not None:
            column = f"; it is the manifest column {dest!r}" if dest in REQUIRED_COLUMNS else ""
            _say(f"error: {flag} is not an option of style.py batch{column}")
            return EXIT_USAGE
    if args.dask_scheduler and args.workers:
        _say("error: --workers is for local runs; on Dask the cluster's workers run the jobs")
        return EXIT_USAGE
    try:
        return _run(args, task_function)
    except StyleTransferError as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say("interrupted before any job started")
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, task_function: TaskFunction) -> int:
    manifest = Path(args.manifest).absolute()
    jobs = read_manifest(manifest, _job_defaults(args))
    summary_path = Path(args.summary).absolute() if args.summary else \
        manifest.with_name(manifest.stem + ".summary.json")
    if summary_path.is_dir():
        raise StyleTransferError(f"--summary {summary_path} is a folder")

    batch = _Batch(manifest, jobs, _say)
    pending: deque[Job] = deque()
    for job in jobs:
        if not args.force and _is_finished(job):
            batch.records[job.number].status = "skipped"
        else:
            pending.append(job)
    # Jobs of one net after one another: a worker's cache then holds the net for the next job too.
    order = {key: i for i, key in enumerate(dict.fromkeys(job.model_key() for job in pending))}
    pending = deque(sorted(pending, key=lambda job: order[job.model_key()]))
    batch.to_run = len(pending)
    skipped = len(jobs) - len(pending)

    if args.dry_run:
        for job in jobs:
            state = "finished before" if batch.records[job.number].status == "skipped" else \
                (f"would fail: {job.problem}" if job.problem else "would run")
            print(f"{job.number:4d}  line {job.line:<4d}  {job.output or '-'}  {state}")
        return EXIT_OK

    engines = {job.options["engine"] for job in pending}
    if len(engines) == 1 and not args.dask_scheduler:
        # Local workers are started later and inherit it; Dask workers are started by their own command.
        prefer_short_spin([job.options["model"] if job.options["prototxt"] is None else "" for job in pending],
                          engines.pop())
    workers = args.workers or 1
    threads = args.threads or max(1, cpu_count() // workers)
    mode = f"dask {args.dask_scheduler}" if args.dask_scheduler else f"{workers} local worker(s), " \
                                                                      f"{threads} thread(s) each"
    _say(f"{len(jobs)} job(s): {skipped} finished before, {len(pending)} to run on {mode}")
    started = time.time()
    interrupted = False
    if pending and args.dask_scheduler:
        _say(f"connecting to the Dask scheduler at {args.dask_scheduler}")
        backend: _Backend = _DaskBackend(args.dask_scheduler, args.threads, task_function)
        try:
            with _Interrupts() as interrupts:
                interrupted = batch.drive(backend, pending, args.threads, interrupts)
        finally:
            backend.close()
    elif pending:
        with _child_thread_limits(threads):
            backend = _LocalBackend(workers, threads, task_function)
            try:
                with _Interrupts() as interrupts:
                    interrupted = batch.drive(backend, pending, threads, interrupts)
            finally:
                backend.close()
    summary, code = batch.summary(started, interrupted, mode)
    print(format_table(summary))
    try:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(summary_path, summary)
        _say(f"summary: {summary_path}")
    except OSError as exc:
        _say(f"error: cannot write the summary {summary_path}: {exc.strerror or exc}")
        code = code or EXIT_FAILED
    return code


if __name__ == "__main__":
    # Through the package's own module, so that workers (and Dask) find run_task under its importable name.
    from style_transfer.batch import batch_main as _main

    sys.exit(_main())
