"""A manifest's rows as jobs: absolute paths, every option filled in and checked before anything runs."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from style_transfer.errors import StyleTransferError
from style_transfer.options import BY_NAME, FINGERPRINTED, MANIFEST_COLUMNS, init_kind, parse_value
from style_transfer.util import reason

REQUIRED_COLUMNS = ("style", "content", "output")


class ManifestError(StyleTransferError):
    """The manifest as a whole cannot be used (not one of its jobs)."""


@dataclass
class Job:
    """One manifest row, resolved: absolute paths, every option filled in."""

    number: int  # 1-based position among the manifest's jobs
    line: int  # line of the manifest file the row is on
    output: Path | None
    styles: list[Path] = field(default_factory=list)
    content: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # found while reading the row: the job fails without running

    @property
    def report_path(self) -> Path | None:
        return None if self.output is None else self.output.with_name(self.output.name + ".json")

    @property
    def fingerprint(self) -> str:
        """What the job computes: a change makes a finished job run again; where it runs (options.py's
        `fingerprint=False`) does not."""
        spec = {"style": [str(p) for p in self.styles], "content": str(self.content), "output": str(self.output),
                **{k: v for k, v in self.options.items() if k in FINGERPRINTED}}
        if spec.get("precision") == "auto":
            # Jobs finished while fp32 was the default stay finished: auto's result is the same job's, and it
            # is fp32 wherever bf16 does not pay.
            spec["precision"] = "fp32"
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def is_finished(self) -> bool:
        """Its output exists and its report says ok for this very job."""
        if self.problem is not None or self.output is None or self.report_path is None or not self.output.is_file():
            return False
        try:
            report = json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(report, dict) and report.get("status") == "ok" and \
            report.get("fingerprint") == self.fingerprint


def resolve(base: Path, text: str) -> Path:
    return (base / Path(text).expanduser()).absolute()


def absolute(name: str, value: Any, base: Path) -> Any:
    """A path option made absolute against `base` (workers may run elsewhere); other values as they are."""
    if value and BY_NAME[name].is_path and (name != "init" or init_kind(value) == "file"):
        return str(resolve(base, str(value)))
    return value


def read_manifest(path: Path, defaults: dict[str, Any]) -> list[Job]:
    """The manifest's jobs; `defaults` holds every job option (command-line values, absolute paths)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {reason(exc)}") from None
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
    names = [h.strip().lower().replace("-", "_") for h in header]
    known = (*REQUIRED_COLUMNS, *MANIFEST_COLUMNS)
    unknown = [h for h, n in zip(header, names, strict=True) if n not in known]
    if unknown:
        raise ManifestError(f"{path}, line {header_line}: unknown column(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(known)}")
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
    jobs = [_job(number, line, names, row, base, defaults) for number, (line, row) in enumerate(rows[1:], start=1)]
    first_line: dict[Path, int] = {}
    for job in jobs:
        if job.output is not None and first_line.setdefault(job.output, job.line) != job.line:
            raise ManifestError(f"{path}: lines {first_line[job.output]} and {job.line} both write {job.output}; "
                                "every job needs its own output")
    return jobs


def _job(number: int, line: int, names: list[str], row: list[str], base: Path, defaults: dict[str, Any]) -> Job:
    cells = {n: (row[i].strip() if i < len(row) else "") for i, n in enumerate(names)}
    job = Job(number=number, line=line, output=resolve(base, cells["output"]) if cells["output"] else None,
              options=dict(defaults))
    try:
        if len(row) > len(names):
            raise StyleTransferError(f"the row has {len(row)} cells but the header names {len(names)} columns")
        if job.output is None:
            raise StyleTransferError("no output given")
        job.styles = [resolve(base, s.strip()) for s in cells["style"].split(";") if s.strip()]
        if not job.styles:
            raise StyleTransferError("no style image given")
        if not cells["content"]:
            raise StyleTransferError("no content image given")
        job.content = resolve(base, cells["content"])
        for name in MANIFEST_COLUMNS:
            if cells.get(name):
                job.options[name] = parse_value(name, absolute(name, cells[name], base))
        blend = job.options["style_weights"]
        if blend is not None and len(blend) != len(job.styles):
            raise StyleTransferError(f"{len(job.styles)} style image(s) but {len(blend)} style weight(s)")
    except StyleTransferError as exc:
        job.problem = f"manifest line {line}: {exc}"
    return job
