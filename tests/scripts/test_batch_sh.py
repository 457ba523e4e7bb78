"""scripts/batch.sh's manifest: one job per (content, style) pair, every output name its own.

The interpreter is a stub that records how it was called, so no style transfer runs.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BATCH_SH = ROOT / "scripts" / "batch.sh"


def _run(tmp_path: Path, styles: list[str], contents: list[str], *options: str) -> list[dict[str, str]]:
    for folder, names in (("styles", styles), ("contents", contents)):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"not read by the stub")
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/argv"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub)}
    res = subprocess.run(["bash", str(BATCH_SH), "styles", "contents", "out", *options], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    manifest = tmp_path / "out" / "manifest.csv"
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == [str(ROOT / "style.py"), "batch", "out/manifest.csv", *options]
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    outputs = [row["output"] for row in rows]
    assert len({o.lower() for o in outputs}) == len(outputs), f"output names repeat: {outputs}"
    assert len(rows) == len(styles) * len(contents)
    return rows


def _pairs(rows: list[dict[str, str]]) -> dict[tuple[str, str], str]:
    return {(Path(r["content"]).name, Path(r["style"]).name): r["output"] for r in rows}


def test_names_are_the_file_names_without_extension(tmp_path: Path) -> None:
    rows = _run(tmp_path, ["s1.jpg", "s2.PNG"], ["c1.jpeg", "c2.png"], "-n", "5")
    assert _pairs(rows) == {("c1.jpeg", "s1.jpg"): "c1-s1.jpg", ("c1.jpeg", "s2.PNG"): "c1-s2.jpg",
                            ("c2.png", "s1.jpg"): "c2-s1.jpg", ("c2.png", "s2.PNG"): "c2-s2.jpg"}
    assert all(Path(r["content"]).is_absolute() and Path(r["style"]).is_absolute() for r in rows)


def test_images_sharing_a_name_keep_their_extensions(tmp_path: Path) -> None:
    rows = _run(tmp_path, ["s.jpg", "S.png", "t.jpg"], ["a.jpg", "a.png", "b.jpg"])
    assert _pairs(rows) == {
        ("a.jpg", "S.png"): "a-jpg-S-png.jpg", ("a.jpg", "s.jpg"): "a-jpg-s-jpg.jpg", ("a.jpg", "t.jpg"): "a-jpg-t.jpg",
        ("a.png", "S.png"): "a-png-S-png.jpg", ("a.png", "s.jpg"): "a-png-s-jpg.jpg", ("a.png", "t.jpg"): "a-png-t.jpg",
        ("b.jpg", "S.png"): "b-S-png.jpg", ("b.jpg", "s.jpg"): "b-s-jpg.jpg", ("b.jpg", "t.jpg"): "b-t.jpg",
    }


@pytest.mark.parametrize(("styles", "contents"), [
    (["c.jpg", "b-c.jpg"], ["a.jpg", "a-b.jpg"]),  # "a-b" + "c" and "a" + "b-c"
    (["s.jpg"], ["x.jpg", "x.png", "x-jpg.png"]),  # "x-jpg" from the extension rule and from a file name
    (["s.jpg"], ["A.jpg", "a.JPG"]),  # one name to a case-insensitive file system
])
def test_output_names_that_would_still_meet_get_a_number(tmp_path: Path, styles: list[str],
                                                         contents: list[str]) -> None:
    rows = _run(tmp_path, styles, contents)
    if "a-b.jpg" in contents:  # the pairs are taken in sorted order: the later one gets the number
        assert _pairs(rows)[("a-b.jpg", "c.jpg")] == "a-b-c.jpg"
        assert _pairs(rows)[("a.jpg", "b-c.jpg")] == "a-b-c-2.jpg"
    if "A.jpg" in contents:
        assert _pairs(rows) == {("A.jpg", "s.jpg"): "A-jpg-s.jpg", ("a.JPG", "s.jpg"): "a-JPG-s-2.jpg"}
