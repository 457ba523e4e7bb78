"""Packaging: file modes in git, package data, and metadata that agrees with itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from style_transfer.caffe_model import registry

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


def _copy_project(dest: Path) -> Path:
    """What a build of the package reads, copied so the build's by-products stay out of the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "style_transfer", dest / "style_transfer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


_INSTALLED_CHECK = """
import importlib.metadata, json, sys
import style_transfer
from style_transfer.caffe_model import registry
from style_transfer.caffe_model.reader import read_prototxt
info = registry.get_model("vgg19")
net = read_prototxt(info.prototxt)
print(json.dumps({"package": registry.__file__, "prototxt": str(info.prototxt), "exists": info.prototxt.is_file(),
                  "layers": len(net.layers), "weights": str(info.weights_path()),
                  "root": str(registry.models_root()), "version": importlib.metadata.version("style-transfer-caffe"),
                  "__version__": style_transfer.__version__}))
"""


def test_an_installed_package_has_its_prototxts_and_keeps_weights_out_of_site_packages(tmp_path: Path) -> None:
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(_copy_project(tmp_path / "project"))],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    # The venv's site-packages for the dependencies, but not this checkout (pytest puts it on sys.path).
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", registry.MODELS_DIR_ENV, "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=os.pathsep.join([str(target), *deps]), HOME=str(home))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, "-c", _INSTALLED_CHECK], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert Path(got["package"]).is_relative_to(target)
    assert got["exists"] and Path(got["prototxt"]).is_relative_to(target) and got["layers"] > 0
    root = Path(got["root"])
    assert not root.is_relative_to(target) and not Path(got["weights"]).is_relative_to(target)
    assert root == home / ".cache" / "style-transfer" / "models"
    assert got["version"] == got["__version__"]  # the built metadata takes the package's version


def test_weights_root_in_a_checkout_and_its_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(registry.MODELS_DIR_ENV, raising=False)
    assert registry.models_root() == ROOT / "models"  # README: models/<model>/<file>
    assert registry.get_model("vgg16").weights_path() == ROOT / "models" / "vgg16" / "VGG_ILSVRC_16_layers.caffemodel"
    monkeypatch.setenv(registry.MODELS_DIR_ENV, str(tmp_path / "env"))
    assert registry.models_root() == tmp_path / "env"
    assert registry.models_root(tmp_path / "flag") == tmp_path / "flag"  # --models-dir beats the environment
    assert registry.get_model("vgg16").prototxt == ROOT / "style_transfer" / "models" / "vgg16" / "deploy.prototxt"


def test_user_models_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.user_models_dir() == tmp_path / "xdg" / "style-transfer" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.user_models_dir() == tmp_path / "home" / ".cache" / "style-transfer" / "models"


def test_shipped_prototxts_are_package_data() -> None:
    for name, info in registry.MODELS.items():
        assert info.prototxt.is_file(), name
        assert info.prototxt.is_relative_to(ROOT / "style_transfer"), name
    assert not list((ROOT / "models").glob("*/deploy.prototxt")), "prototxts left in models/"


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _requirement_lines(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _by_name(requirements: list[Requirement]) -> dict[str, Requirement]:
    out: dict[str, Requirement] = {}
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name not in out, f"{req.name} is listed twice"
        out[name] = req
    return out


def test_requirements_txt_and_pyproject_agree() -> None:
    project = _pyproject()["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        declared += [Requirement(r) for r in extra]
    declared_by_name = _by_name(declared)
    pinned = _by_name(_requirement_lines(ROOT / "requirements.txt"))
    undeclared = sorted(set(pinned) - set(declared_by_name))
    assert not undeclared, f"in requirements.txt but not in pyproject.toml: {undeclared}"
    for name, req in pinned.items():
        other = declared_by_name[name]
        assert (req.specifier, req.extras, req.marker) == (other.specifier, other.extras, other.marker), \
            f"{name}: requirements.txt says {req}, pyproject.toml says {other}"
    assert {"scikit-image", "h5py"} <= set(pinned)


def test_protobuf_is_pinned_to_what_pycaffe_links_against() -> None:
    """One protobuf everywhere: Debian 12's C++ protobuf 3.21 is in the same process as pycaffe."""
    deps = _by_name([Requirement(r) for r in _pyproject()["project"]["dependencies"]])
    assert str(deps["protobuf"].specifier) == "==4.21.12"
    script = (ROOT / "scripts" / "install_caffe.sh").read_text()
    assert "readonly PY_PROTOBUF_VERSION=4.21.12\n" in script


def test_the_version_is_written_once() -> None:
    data = _pyproject()
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "style_transfer.__version__"}
    import style_transfer

    assert Version(style_transfer.__version__)  # a valid version


def test_dask_is_an_optional_extra() -> None:
    project = _pyproject()["project"]
    extra = _by_name([Requirement(r) for r in project["optional-dependencies"]["dask"]])
    assert "distributed" in extra["dask"].extras
    assert "dask" not in _by_name([Requirement(r) for r in project["dependencies"]])
    # The tests use dask, so what CI installs has it.
    ci = _by_name(_requirement_lines(ROOT / "requirements.txt") + _requirement_lines(ROOT / "requirements-dev.txt"))
    assert "dask" in ci
