"""Packaging: file modes in git, package data, and metadata that agrees with itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _git_files() -> list[tuple[str, str]]:
    """(mode, path) of every file git tracks in this checkout."""
    try:
        res = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=ROOT, capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout: {e}")
    out = []
    for entry in res.stdout.decode().split("\0"):
        if entry:
            meta, _, path = entry.partition("\t")
            out.append((meta.split()[0], path))
    return out


def test_scripts_with_a_shebang_are_executable_in_git() -> None:
    scripts = {path: mode for mode, path in _git_files()
               if mode.startswith("100") and (ROOT / path).read_bytes()[:2] == b"#!"}
    assert "scripts/install_caffe.sh" in scripts
    not_executable = sorted(path for path, mode in scripts.items() if mode != "100755")
    assert not not_executable, f"shebang but no run bit in git (git update-index --chmod=+x): {not_executable}"
