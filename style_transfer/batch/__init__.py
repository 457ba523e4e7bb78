"""`style.py batch MANIFEST.csv`: many stylizations from a manifest, on local worker processes or on Dask.

README.md's "Batch runs" is the user's guide: the manifest's columns (`style`, `content`, `output`, and any job option
of style.py under its long name), the reports, resuming, the summary and the exit codes. Besides: a `.tsv` manifest
is tab-separated, `style_weights` are separated by `;` like the styles they weigh, and blank rows and rows whose first
cell starts with `#` are ignored.

A job counts as finished when its output exists and its report `<output>.json` says `ok` for the same job
description; the image is written before the report, both atomically, so a crash in between leaves a job that runs
again. Each worker process keeps the nets it has loaded, so a model is read once per worker, not once per job. Input
images travel to the workers as file bytes and results come back as pixels, so Dask workers on other hosts need only
the model weights, not the images nor the output folder.

The modules: `manifest` (rows to jobs), `worker` (one job in a worker process), `backends` (local processes,
Dask), `runner` (the scheduling loop, reports, summary) and `cli` (the command line).
"""

from style_transfer.batch.cli import batch_main
from style_transfer.batch.manifest import read_manifest
from style_transfer.batch.worker import Outcome, Task, run_task

__all__ = ["Outcome", "Task", "batch_main", "read_manifest", "run_task"]
