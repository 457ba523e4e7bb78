"""The batch run: skip finished jobs, hand the rest to a backend, save what comes back, and summarise."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from style_transfer import images
from style_transfer.batch.backends import Backend, DaskBackend, Died, LocalBackend, TaskFunction, child_thread_limits
from style_transfer.batch.manifest import Job
from style_transfer.batch.worker import InputFile, Outcome, Task, cpu_count, model_key, read_input
from style_transfer.errors import StyleTransferError
from style_transfer.openmp import prefer_short_spin
from style_transfer.options import init_kind
from style_transfer.util import check_writable, one_line, write_json

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
STATUSES = ("ok", "skipped", "failed", "interrupted", "not run")


def say(message: str) -> None:
    print(f"style.py batch: {message}", file=sys.stderr, flush=True)


def shown(path: Path) -> str:
    """Paths under the working folder are shown relative to it: tables stay readable."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def counted_interrupts() -> Iterator[list[int]]:
    """Ctrl-C presses collected in a list instead of raised, so that no file write is cut in half by
    KeyboardInterrupt."""
    presses: list[int] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda signum, frame: presses.append(signum))
    try:
        yield presses
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@dataclass
class Record:
    job: Job
    status: str = "pending"  # ok, skipped, failed, interrupted, not run
    error: str | None = None
    run: dict[str, Any] = field(default_factory=dict)  # the worker's part of the job's report

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job.number, "line": self.job.line, "status": self.status,
                "output": str(self.job.output) if self.job.output else None,
                "report": str(self.job.report_path) if self.job.report_path else None, "error": self.error,
                "seconds": self.run.get("job_seconds"), "worker": self.run.get("worker"),
                "model_loaded_fresh": self.run.get("model_loaded_fresh")}


class Batch:
    def __init__(self, manifest: Path, jobs: list[Job]) -> None:
        self.manifest = manifest
        self.records = {job.number: Record(job) for job in jobs}
        self.finished = 0
        self.to_run = 0
        self.notices: set[str] = set()

    def prepare(self, job: Job, threads: int | None) -> Task:
        if job.problem is not None:
            raise StyleTransferError(job.problem)
        assert job.output is not None and job.content is not None
        images.check_output_path(job.output)
        init = job.options["init"]
        init_input: str | InputFile = read_input(Path(init)) if init_kind(init) == "file" else str(init)
        return Task(job=job.number, content=read_input(job.content), styles=tuple(read_input(p) for p in job.styles),
                    init=init_input, options=dict(job.options), threads=threads)

    def finish(self, job: Job, outcome: Outcome) -> None:
        """The image first, then the report, both atomically: a crash in between leaves a job that runs again."""
        if outcome.status == "ok" and outcome.image is not None and job.output is not None:
            try:
                images.save_image(job.output, outcome.image)
            except StyleTransferError as exc:
                outcome = Outcome("failed", one_line(exc), report=outcome.report)
        report = {"status": outcome.status, "error": outcome.error, "fingerprint": job.fingerprint,
                  "manifest": str(self.manifest), "job": job.number, "line": job.line,
                  "style": [str(p) for p in job.styles], "content": str(job.content) if job.content else None,
                  "output": str(job.output) if job.output else None, **outcome.report,
                  "options": dict(job.options)}
        if job.report_path is not None and job.output is not None and job.output.parent.is_dir():
            try:
                write_json(job.report_path, report, "the report")
            except StyleTransferError as exc:
                if outcome.status == "ok":
                    outcome = Outcome("failed", one_line(exc), report=outcome.report)
        self.records[job.number] = Record(job, outcome.status, outcome.error, outcome.report)
        for notice in outcome.report.get("notices", []):
            if notice not in self.notices:
                self.notices.add(notice)
                say(notice)
        self.finished += 1
        where = shown(job.output) if job.output is not None else f"manifest line {job.line}"
        if outcome.status == "ok":
            say(f"[{self.finished}/{self.to_run}] ok      {outcome.report.get('job_seconds') or 0:7.1f} s  {where}")
        else:
            say(f"[{self.finished}/{self.to_run}] {outcome.status.upper():7s}            {where}: {outcome.error}")

    def drive(self, backend: Backend, pending: deque[Job], threads: int | None, interrupts: list[int]) -> bool:
        """Run the pending jobs on the backend; True if stopped by Ctrl-C."""
        inflight: dict[Any, Job] = {}
        suspects: deque[Job] = deque()  # were running when a worker process died; now run one at a time
        isolating = False  # a suspect is running: it runs alone
        seen_interrupts = 0
        while True:
            if len(interrupts) > seen_interrupts:
                seen_interrupts = len(interrupts)
                if seen_interrupts == 1:
                    say(f"interrupted: starting no more jobs; waiting for the {len(inflight)} running "
                        "(Ctrl-C again to abandon them)")
                else:
                    say(f"abandoning {len(inflight)} running job(s)")
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
                    self.finish(job, Outcome("failed", one_line(exc)))
                    continue
                inflight[backend.submit(task)] = job
                isolating = alone
            if not inflight:
                return seen_interrupts > 0
            running = len(inflight)
            outcomes = {f: backend.outcome(f) for f in backend.wait(list(inflight), timeout=0.25)}
            if any(isinstance(o, Died) for o in outcomes.values()):
                # A broken pool ends every job it held; collect them all before a new pool starts.
                rest = [f for f in inflight if f not in outcomes]
                outcomes.update({f: backend.outcome(f) for f in backend.settle(rest)})
            for future, outcome in outcomes.items():
                job = inflight.pop(future)
                isolating = False
                if not isinstance(outcome, Died):
                    self.finish(job, outcome)
                elif running == 1:
                    self.finish(job, Outcome("failed", "the worker process died while running this job "
                                                       "(a crash, or the system ran out of memory)"))
                else:
                    suspects.append(job)  # one of them killed the worker: each runs again, alone

    def summary(self, started: float, interrupted: bool, mode: str) -> tuple[dict[str, Any], int]:
        for record in self.records.values():
            if record.status == "pending":
                record.status = "not run"
        counts = dict(Counter(record.status for record in self.records.values()))
        code = EXIT_INTERRUPTED if interrupted else EXIT_FAILED if counts.get("failed") else EXIT_OK
        data = {"manifest": str(self.manifest), "mode": mode,
                "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                "seconds": time.time() - started, "interrupted": interrupted, "exit_code": code,
                "jobs_total": len(self.records), "counts": counts, "jobs": [r.as_dict() for r in self.records.values()]}
        return data, code


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table: one row per job, failures with their error."""
    rows = [("job", "line", "status", "seconds", "output", "error")]
    for job in summary["jobs"]:
        seconds = f"{job['seconds']:.1f}" if isinstance(job.get("seconds"), (int, float)) else "-"
        status = "skipped (done before)" if job["status"] == "skipped" else job["status"]
        output = shown(Path(job["output"])) if job["output"] else "-"
        rows.append((str(job["job"]), str(job["line"]), status, seconds, output, job["error"] or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join([r[0].rjust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]),
                        r[3].rjust(widths[3]), r[4].ljust(widths[4]), r[5]]).rstrip() for r in rows]
    counts = ", ".join(f"{summary['counts'][s]} {s}" for s in STATUSES if s in summary["counts"])
    lines.append(f"{summary['jobs_total']} job(s): {counts}; {summary['seconds']:.1f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace, jobs: list[Job], task_function: TaskFunction) -> int:
    """Run the manifest's jobs as the command line says; the exit code."""
    manifest = Path(args.manifest).absolute()
    summary_path = Path(args.summary).absolute() if args.summary else \
        manifest.with_name(manifest.stem + ".summary.json")
    if summary_path.is_dir():
        raise StyleTransferError(f"--summary {summary_path} is a folder")

    batch = Batch(manifest, jobs)
    for job in jobs:
        if not args.force and job.is_finished():
            batch.records[job.number].status = "skipped"
    to_run = [job for job in jobs if batch.records[job.number].status == "pending"]
    # Jobs of one net after one another: a worker's cache then holds the net for the next job too.
    order = {key: i for i, key in enumerate(dict.fromkeys(model_key(job.options) for job in to_run))}
    pending = deque(sorted(to_run, key=lambda job: order[model_key(job.options)]))
    batch.to_run = len(pending)

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
    mode = f"dask {args.dask_scheduler}" if args.dask_scheduler else \
        f"{workers} local worker(s), {threads} thread(s) each"
    say(f"{len(jobs)} job(s): {len(jobs) - len(pending)} finished before, {len(pending)} to run on {mode}")
    started = time.time()
    interrupted = False
    if pending:
        with contextlib.ExitStack() as stack:
            if args.dask_scheduler:
                say(f"connecting to the Dask scheduler at {args.dask_scheduler}")
                backend: Backend = DaskBackend(args.dask_scheduler, args.threads, task_function)
            else:
                stack.enter_context(child_thread_limits(threads))
                backend = LocalBackend(workers, threads, task_function)
            stack.callback(backend.close)
            interrupted = batch.drive(backend, pending, args.threads if args.dask_scheduler else threads,
                                      stack.enter_context(counted_interrupts()))
    summary, code = batch.summary(started, interrupted, mode)
    print(format_table(summary))
    try:
        write_json(check_writable(summary_path, "the summary"), summary, "the summary")
        say(f"summary: {summary_path}")
    except StyleTransferError as exc:
        say(f"error: {exc}")
        code = code or EXIT_FAILED
    return code
