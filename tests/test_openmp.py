"""The short OpenMP spin is asked for only where it measured faster, and early enough to matter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from style_transfer.openmp import SHORT_SPIN, SPIN_VARIABLE, prefer_short_spin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(SPIN_VARIABLE, raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    return monkeypatch


def test_vgg_on_torch_gets_the_short_spin(clean_env: pytest.MonkeyPatch) -> None:
    assert prefer_short_spin(["vgg16", "vgg19"], "torch")
    assert os.environ[SPIN_VARIABLE] == SHORT_SPIN


@pytest.mark.parametrize(("models", "engine"), [
    (["googlenet"], "torch"),  # small layers: slower with it
    (["vgg16", "caffenet"], "torch"),  # one process for both: the slower one decides
    (["vgg19"], "caffe"),  # OpenBLAS threads, not libgomp's
    ([""], "torch"),  # a net of the user's own (--prototxt)
    ([], "torch"),
])
def test_other_nets_and_engines_are_left_alone(clean_env: pytest.MonkeyPatch, models: list[str], engine: str) -> None:
    assert not prefer_short_spin(models, engine)
    assert SPIN_VARIABLE not in os.environ


@pytest.mark.parametrize("variable", [SPIN_VARIABLE, "OMP_WAIT_POLICY"])
def test_the_users_own_setting_wins(clean_env: pytest.MonkeyPatch, variable: str) -> None:
    clean_env.setenv(variable, "passive" if variable == "OMP_WAIT_POLICY" else "5")
    assert not prefer_short_spin(["vgg16"], "torch")
    assert os.environ.get(SPIN_VARIABLE) == (None if variable == "OMP_WAIT_POLICY" else "5")


def test_the_cli_and_batch_load_without_torch() -> None:
    # libgomp reads the variable when torch loads it: style.py must decide before anything imports torch.
    code = "import sys, style_transfer.cli, style_transfer.batch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"
