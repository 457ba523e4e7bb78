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

The modules: `manifest` (rows to jobs), `worker` (one job in a worker process), `backends` (local processes,
Dask), `runner` (the scheduling loop, reports, summary) and `cli` (the command line).
"""

from style_transfer.batch.cli import batch_main
from style_transfer.batch.manifest import read_manifest
from style_transfer.batch.worker import Outcome, Task, run_task

__all__ = ["Outcome", "Task", "batch_main", "read_manifest", "run_task"]
