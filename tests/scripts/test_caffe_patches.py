"""scripts/caffe_patches.py on the pristine Caffe sdist that scripts/install_caffe.sh builds.

The sdist is the one install_caffe.sh caches (pinned version and sha256 read from the script); without it the
tests that need it skip, except on CI (CI=true), where a missing sdist fails them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "caffe_patches.py"
INSTALL = ROOT / "scripts" / "install_caffe.sh"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("caffe_patches", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


cp = _load()


def _pinned(name: str) -> str:
    m = re.search(rf"^readonly {name}=(\S+)$", INSTALL.read_text(), re.M)
    assert m, f"install_caffe.sh has no readonly {name}"
    return m.group(1)


def _sdist() -> Path:
    cache = Path(os.environ.get("STYLE_TRANSFER_CACHE") or Path.home() / ".cache" / "style-transfer")
    path = cache / "downloads" / f"{_pinned('CAFFE_DIST')}-{_pinned('CAFFE_VERSION')}.tar.gz"
    if not path.is_file():
        message = f"{path} not present (scripts/install_caffe.sh downloads it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == _pinned("CAFFE_SDIST_SHA256"), f"{path} has the wrong sha256"
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist unpacked without its top folder, as install_caffe.sh does (tar --strip-components=1)."""
    sdist = _sdist()
    out = tmp_path_factory.mktemp("caffe-pristine")
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) == 2 and parts[1]:
                member.name = parts[1]
                members.append(member)
        tar.extractall(out, members=members, filter="data")
    assert (out / "CMakeLists.txt").is_file()
    return out


def _statuses(stdout: str) -> list[str]:
    """The status of each patch in the command's output, in the patches' order."""
    lines = stdout.splitlines()
    assert len(lines) == len(cp.PATCHES), stdout
    out = []
    for line, patch in zip(lines, cp.PATCHES, strict=True):
        head = f"  patch {patch.name}"
        assert line.startswith(head), (line, patch.name)
        out.append(line[len(head):].strip().split(":")[0])
    return out


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_patch_hits_the_pristine_sdist_and_a_second_run_is_a_no_op(pristine: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    first = cp.apply_patches(src)
    assert [r.name for r in first] == [p.name for p in cp.PATCHES]
    assert [(r.name, r.status) for r in first] == [(p.name, cp.APPLIED) for p in cp.PATCHES], first
    patched = _tree(src)
    assert patched != _tree(pristine)

    second = cp.apply_patches(src)
    assert [(r.name, r.status) for r in second] == [(p.name, cp.ALREADY) for p in cp.PATCHES], second
    assert _tree(src) == patched


def test_command_line_patches_then_re_checks(pristine: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    for status in (cp.APPLIED, cp.ALREADY):
        res = subprocess.run([sys.executable, str(SCRIPT), str(src)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _statuses(res.stdout) == [status] * len(cp.PATCHES), res.stdout


def test_a_patch_that_finds_nothing_fails_the_run_and_is_named(pristine: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    io_py = src / "python" / "caffe" / "io.py"
    io_py.write_text(io_py.read_text().replace("as_grey=", "as_gray="))  # "upstream" fixed one of three things
    res = subprocess.run([sys.executable, str(SCRIPT), str(src)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "python/caffe/io.py" in res.stderr and "1 patch(es)" in res.stderr, res.stderr
    # The others were still applied.
    statuses = _statuses(res.stdout)
    assert statuses[-1] == cp.MISSED and statuses[:-1] == [cp.APPLIED] * (len(cp.PATCHES) - 1)


def test_a_tree_that_is_not_caffe_misses_every_patch(tmp_path: Path) -> None:
    (tmp_path / "CMakeLists.txt").write_text("project(other)\n")
    results = cp.apply_patches(tmp_path)
    assert all(r.status == cp.MISSED and r.reason for r in results), results
    res = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and f"{len(cp.PATCHES)} patch(es) did not apply" in res.stderr
    assert (tmp_path / "CMakeLists.txt").read_text() == "project(other)\n"


def test_no_source_tree_is_a_usage_error(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a Caffe source tree" in res.stderr


def test_install_script_runs_the_patch_file() -> None:
    script = INSTALL.read_text()
    assert re.search(r'^PATCHES_PY=.*/caffe_patches\.py"$', script, re.M)
    assert '"$PYTHON" "$PATCHES_PY" "$SRC"' in script
    assert "re.subn" not in script  # the patches live in one place
