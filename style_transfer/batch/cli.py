"""`style.py batch`'s command line: style.py's job options as defaults for every job, plus the batch's own."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from style_transfer.batch import runner
from style_transfer.batch.backends import TaskFunction
from style_transfer.batch.manifest import REQUIRED_COLUMNS, absolute, read_manifest
from style_transfer.batch.worker import run_task
from style_transfer.errors import StyleTransferError
from style_transfer.options import OPTIONS, HelpFormatter, Option, Parser, add_arguments, arg_type, defaults, whole

# Every option of a job: the manifest's columns, and -v and --download-missing, which apply to the whole batch.
JOB_OPTIONS = tuple(o.name for o in OPTIONS if o.scope != "cli")
# style.py's options that the batch does not take: the manifest's columns and the per-job reports are for the
# first ones; the others write extra files per run or do something else than stylizing. They are parsed only to be
# refused with a word on what to do instead.
REFUSED = (*(o for o in OPTIONS if o.scope == "cli"), Option("download", ("--download",), "", nargs="+"),
           Option("mirror", ("--mirror",), ""))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="style.py batch", formatter_class=HelpFormatter,
               usage="style.py batch MANIFEST.csv [--workers N | --dask-scheduler ADDRESS] [options]",
               description="Run every job of a CSV manifest (columns style, content, output, and any job option "
                           "below by its long name); skip the jobs finished before.",
               epilog="The style.py options give every job its defaults; the manifest's columns override them.\n"
                      "Exit codes: 0 all jobs finished, 1 some failed, 2 usage or manifest error, 130 interrupted.")
    p.add_argument("manifest", metavar="MANIFEST.csv", help="the jobs (see above)")
    add_arguments(p, JOB_OPTIONS, defaults_from=defaults())
    for option in REFUSED:
        p.add_argument(*option.flags, dest=option.name, nargs=option.nargs, default=None, help=argparse.SUPPRESS)
    group = p.add_argument_group("batch options")
    group.add_argument("--workers", type=arg_type(whole(), "--workers"), default=None,
                       help="local worker processes (default 1)")
    group.add_argument("--threads", type=arg_type(whole(), "--threads"), default=None,
                       help="torch threads per worker (default: cores / workers; on Dask: the worker host's "
                            "cores / its worker processes)")
    group.add_argument("--dask-scheduler", metavar="ADDRESS", default=None,
                       help="run on a Dask distributed cluster, e.g. tcp://host:8786, instead of local processes")
    group.add_argument("--force", action="store_true", help="run every job, also those finished before")
    group.add_argument("--summary", default=None,
                       help="where the JSON summary goes (default: MANIFEST's name with .summary.json)")
    group.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    return p


def job_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Every job option from the command line, with paths made absolute (workers may run elsewhere)."""
    return {name: absolute(name, getattr(args, name), Path.cwd()) for name in JOB_OPTIONS}


def batch_main(argv: Sequence[str] | None = None, *, task_function: TaskFunction = run_task) -> int:
    """`style.py batch MANIFEST.csv [options]`; `argv` is what follows the word `batch`."""
    args = build_parser().parse_args(argv)
    try:
        for option in REFUSED:
            if getattr(args, option.name) is not None:
                column = f"; it is the manifest column {option.name!r}" if option.name in REQUIRED_COLUMNS else ""
                raise StyleTransferError(f"{option.label} is not an option of style.py batch{column}")
        if args.dask_scheduler and args.workers:
            raise StyleTransferError("--workers is for local runs; on Dask the cluster's workers run the jobs")
        jobs = read_manifest(Path(args.manifest).absolute(), job_defaults(args))
        return runner.run(args, jobs, task_function)
    except StyleTransferError as exc:
        runner.say(f"error: {exc}")
        return runner.EXIT_USAGE
    except KeyboardInterrupt:
        runner.say("interrupted before any job started")
        return runner.EXIT_INTERRUPTED
