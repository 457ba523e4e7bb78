"""util.py: one-line messages, writability probes and atomic JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from style_transfer.errors import StyleTransferError
from style_transfer.util import check_writable, one_line, reason, write_json


def test_one_line_and_reason() -> None:
    assert one_line("a\n  b\tc ") == "a b c"
    assert one_line("") == "unknown error"
    assert reason(PermissionError(13, "Permission denied", "/x")) == "Permission denied"
    assert reason(ValueError("bad\nvalue")) == "bad value"


def test_check_writable(tmp_path: Path) -> None:
    target = check_writable(tmp_path / "new" / "r.json", "--report")
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []
    with pytest.raises(StyleTransferError, match=r"--report .* is a folder"):
        check_writable(tmp_path, "--report")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StyleTransferError, match="cannot write --report"):
        check_writable(tmp_path / "file" / "r.json", "--report")


def test_write_json_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"a": 1, "p": Path("x")})
    assert json.loads(path.read_text()) == {"a": 1, "p": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(StyleTransferError, match="cannot write the report"):
        write_json(tmp_path / "missing" / "r.json", {})
    assert not any(".tmp" in p.name for p in tmp_path.rglob("*"))
    assert os.access(path, os.R_OK)
