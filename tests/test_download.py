"""The downloader against a loopback HTTP server serving caffemodels the tests make; nothing touches the internet."""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from style_transfer import download
from style_transfer.caffe_model import registry
from style_transfer.caffe_model.registry import ModelInfo
from style_transfer.errors import ModelError
from tests import tinynets

REPO = Path(__file__).resolve().parents[1]
# Big enough (about 440 KB) that half a file spans several of the downloader's chunks.
SIZE = 224


@dataclass
class Server:
    """What the handler serves and how it misbehaves; `log` holds (path, Range header) of every request."""

    files: dict[str, bytes] = field(default_factory=dict)
    mode: str = "ok"  # ok | 404 | norange
    drops: int = 0  # this many next requests send half their body, then close the connection
    log: list[tuple[str, str | None]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def do_GET(self) -> None:
        state = self.server.state
        state.log.append((self.path, self.headers.get("Range")))
        body = state.files.get(self.path)
        if body is None or state.mode == "404":
            self.send_error(404)
            return
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and state.mode != "norange":
            start, status = int(match.group(1)), 206
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        payload = body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Accept-Ranges", "none" if state.mode == "norange" else "bytes")
        self.end_headers()
        if state.drops:
            state.drops -= 1
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _HTTPServer(ThreadingHTTPServer):
    state: Server


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = _HTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = Server(port=httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


@dataclass(frozen=True)
class FakeInfo(ModelInfo):
    """A registry entry whose prototxt is one the test wrote, not one shipped with the project."""

    prototxt_path: Path = Path()

    @property
    def prototxt(self) -> Path:
        return self.prototxt_path


@dataclass
class Fake:
    info: FakeInfo
    good: bytes
    models_dir: Path

    @property
    def final(self) -> Path:
        return self.models_dir / self.info.name / self.info.weights_file


def _tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server, *, with_sha1: bool) -> Fake:
    text = tinynets.prototxt(size=SIZE)
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(text)
    good = tinynets.caffemodel_bytes(text, tinynets.random_weights(text, seed=1))
    server.files["/tiny.caffemodel"] = good
    info = FakeInfo(name="tiny", weights_file="tiny.caffemodel", url=server.url("/tiny.caffemodel"),
                    content_layers={"conv2": 1.0}, style_layers={"conv1": 1.0},
                    sha1=hashlib.sha1(good).hexdigest() if with_sha1 else None,
                    licence=registry.VGG_LICENCE if not with_sha1 else registry.BVLC_LICENCE,
                    prototxt_path=proto)
    monkeypatch.setitem(registry.MODELS, "tiny", info)
    monkeypatch.delenv(registry.MODELS_DIR_ENV, raising=False)
    monkeypatch.delenv(download.url_env_var("tiny"), raising=False)
    return Fake(info, good, tmp_path / "models")


@pytest.fixture
def sha1_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server) -> Fake:
    return _tiny_model(tmp_path, monkeypatch, server, with_sha1=True)


@pytest.fixture
def vgg_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server) -> Fake:
    return _tiny_model(tmp_path, monkeypatch, server, with_sha1=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _get(fake: Fake, **kwargs: object) -> Path:
    return download.download_model("tiny", models_dir=fake.models_dir, progress=False, quiet=True,
                                   **kwargs)  # type: ignore[arg-type]


# --- good downloads and verification --------------------------------------------------------------------------


def test_good_download_is_verified_and_recorded(sha1_model: Fake, server: Server) -> None:
    path = _get(sha1_model)
    assert path == sha1_model.final
    assert path.read_bytes() == sha1_model.good
    assert _leftovers(path.parent) == ["tiny.caffemodel", "tiny.caffemodel.sha256"]
    first = download.sidecar_path(path).read_text().splitlines()[0]
    assert first == f"{hashlib.sha256(sha1_model.good).hexdigest()}  tiny.caffemodel"
    assert download.verify_model("tiny", sha1_model.models_dir) == path
    # A second run finds the verified file and does not ask the server again.
    requests_before = len(server.log)
    assert _get(sha1_model) == path
    assert len(server.log) == requests_before


def test_sha1_mismatch_deletes_the_file(sha1_model: Fake, server: Server) -> None:
    server.files["/tiny.caffemodel"] = sha1_model.good[:-1] + bytes([sha1_model.good[-1] ^ 0xFF])
    with pytest.raises(ModelError) as err:
        _get(sha1_model)
    message = str(err.value)
    assert "sha1" in message and sha1_model.info.sha1 in message and "deleted" in message  # type: ignore[operator]
    assert "--mirror" in message and "\n" not in message
    assert _leftovers(sha1_model.final.parent) == []


def test_force_refetches_and_keeps_the_old_file_when_that_fails(sha1_model: Fake, server: Server) -> None:
    path = _get(sha1_model)
    server.mode = "404"
    with pytest.raises(ModelError, match="HTTP 404"):
        _get(sha1_model, force=True)
    assert path.read_bytes() == sha1_model.good
    server.mode = "ok"
    requests_before = len(server.log)
    _get(sha1_model, force=True)
    assert len(server.log) == requests_before + 1


# --- failures that name the way out ---------------------------------------------------------------------------


def test_404_names_the_url_and_the_mirror_options(sha1_model: Fake, server: Server) -> None:
    server.mode = "404"
    with pytest.raises(ModelError) as err:
        _get(sha1_model)
    message = str(err.value)
    assert sha1_model.info.url in message and "HTTP 404" in message
    assert "--mirror URL" in message and "STYLE_TRANSFER_TINY_URL" in message and "local file" in message
    assert "\n" not in message
    assert _leftovers(sha1_model.final.parent) == []


def test_refused_connection(sha1_model: Fake) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/tiny.caffemodel"
    with pytest.raises(ModelError) as err:
        _get(sha1_model, url=url)
    message = str(err.value)
    assert url in message and "refused" in message and "--mirror" in message and "\n" not in message
    assert _leftovers(sha1_model.final.parent) == []


def test_unresolvable_host_is_one_line(sha1_model: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*_: object, **__: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # Fails the lookup here rather than asking a real resolver, which may be slow or absent.
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ModelError) as err:
        _get(sha1_model, url="http://no-such-host.invalid/tiny.caffemodel")
    message = str(err.value)
    assert "no-such-host.invalid" in message and "DNS" in message and "--mirror" in message and "\n" not in message


# --- interrupted downloads --------------------------------------------------------------------------------------


def test_dropped_connection_resumes_in_the_same_run(sha1_model: Fake, server: Server) -> None:
    server.drops = 1
    path = _get(sha1_model)
    assert path.read_bytes() == sha1_model.good
    assert server.log[0][1] is None
    resumed = server.log[1][1]
    assert resumed is not None
    start = int(re.fullmatch(r"bytes=(\d+)-", resumed).group(1))  # type: ignore[union-attr]
    assert 0 < start <= len(sha1_model.good) // 2
    assert _leftovers(path.parent) == ["tiny.caffemodel", "tiny.caffemodel.sha256"]


def test_dropped_connection_keeps_the_part_and_the_next_run_resumes(sha1_model: Fake, server: Server,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_RESUME_ATTEMPTS", 0)
    server.drops = 1
    with pytest.raises(ModelError) as err:
        _get(sha1_model)
    part = download.part_path(sha1_model.final)
    assert "resumes" in str(err.value) and str(part) in str(err.value)
    assert not sha1_model.final.exists()
    partial = part.stat().st_size
    assert 0 < partial <= len(sha1_model.good) // 2
    path = _get(sha1_model)
    assert server.log[-1][1] == f"bytes={partial}-"
    assert path.read_bytes() == sha1_model.good
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(sha1_model: Fake, server: Server) -> None:
    server.mode = "norange"
    server.drops = 1
    path = _get(sha1_model)
    assert path.read_bytes() == sha1_model.good
    assert server.log[1][1] is not None  # it asked to resume, got the whole file, and wrote it from zero


def test_stale_part_longer_than_the_file_restarts(sha1_model: Fake, server: Server) -> None:
    part = download.part_path(sha1_model.final)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * (len(sha1_model.good) + 10))
    assert _get(sha1_model).read_bytes() == sha1_model.good


def test_bad_resumed_file_starts_over(sha1_model: Fake, server: Server) -> None:
    part = download.part_path(sha1_model.final)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # the start of some other file
    assert _get(sha1_model).read_bytes() == sha1_model.good
    assert [r for _, r in server.log] == ["bytes=1000-", None]


def test_ctrl_c_keeps_only_the_part_and_exits_130(sha1_model: Fake, server: Server, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    real_bar = download._ResumingDownloader._bar

    def interrupting_bar(self: download._ResumingDownloader, total: int | None, initial: int) -> object:
        bar = real_bar(self, total, initial)

        def update(n: int = 1) -> None:
            raise KeyboardInterrupt

        bar.update = update  # type: ignore[method-assign]
        return bar

    monkeypatch.setattr(download._ResumingDownloader, "_bar", interrupting_bar)
    code = download.download_main(["tiny", "--models-dir", str(sha1_model.models_dir), "--quiet"])
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()
    part = download.part_path(sha1_model.final)
    assert len(err) == 1 and "interrupted" in err[0] and str(part) in err[0]
    assert _leftovers(sha1_model.final.parent) == ["tiny.caffemodel.part"]


def test_second_download_of_the_same_model_is_refused(sha1_model: Fake) -> None:
    fcntl = pytest.importorskip("fcntl")
    part = download.part_path(sha1_model.final)
    part.parent.mkdir(parents=True)
    with part.open("ab") as held:
        held.write(b"some bytes")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ModelError, match="another download"):
            _get(sha1_model)
    assert part.read_bytes() == b"some bytes"


# --- VGG-style files: no published checksum -------------------------------------------------------------------


def _weights_without(layer: str) -> bytes:
    text = tinynets.prototxt(size=SIZE)
    weights = tinynets.random_weights(text, seed=2)
    del weights[layer]
    return tinynets.caffemodel_bytes(text, weights)


def test_vgg_style_missing_layer_is_rejected(vgg_model: Fake, server: Server,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    server.files["/tiny.caffemodel"] = _weights_without("conv2")
    with pytest.raises(ModelError, match="'conv2'") as err:
        _get(vgg_model)
    assert "deleted" in str(err.value) and "\n" not in str(err.value)
    assert _leftovers(vgg_model.final.parent) == []
    assert "non-commercial" in capsys.readouterr().out.lower()  # the licence shows even when quiet


def test_vgg_style_wrong_shape_is_rejected(vgg_model: Fake, server: Server) -> None:
    layers = [(n, k, b, t, p.replace("num_output: 6", "num_output: 8")) for n, k, b, t, p in tinynets.TINY_LAYERS]
    text = tinynets.prototxt(size=SIZE, layers=layers)
    server.files["/tiny.caffemodel"] = tinynets.caffemodel_bytes(text, tinynets.random_weights(text))
    with pytest.raises(ModelError, match=r"layer 'conv2'.*shape"):
        _get(vgg_model)
    assert _leftovers(vgg_model.final.parent) == []


def test_vgg_style_truncated_file_is_rejected(vgg_model: Fake, server: Server) -> None:
    server.files["/tiny.caffemodel"] = vgg_model.good[: len(vgg_model.good) * 2 // 3]
    with pytest.raises(ModelError, match="deleted"):
        _get(vgg_model)
    assert _leftovers(vgg_model.final.parent) == []


def test_vgg_style_good_file_gets_a_sidecar_and_corruption_is_caught(vgg_model: Fake) -> None:
    path = _get(vgg_model)
    sidecar = download.sidecar_path(path)
    assert sidecar.read_text().startswith(hashlib.sha256(vgg_model.good).hexdigest())
    assert download.verify_model("tiny", vgg_model.models_dir, quick=True) == path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(download.DamagedModelError) as err:
        download.verify_model("tiny", vgg_model.models_dir, quick=True)  # the mtime moved, so it re-hashes
    assert "sha256" in str(err.value) and "scripts/download_models.sh tiny" in str(err.value)
    # Fetching again replaces the damaged file.
    assert _get(vgg_model).read_bytes() == vgg_model.good


def test_quick_check_skips_hashing_when_size_and_mtime_match(vgg_model: Fake,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = _get(vgg_model)
    monkeypatch.setattr(download, "_file_hash", lambda *_: pytest.fail("quick check hashed the file"))
    assert download.verify_model("tiny", vgg_model.models_dir, quick=True) == path


def test_broken_prototxt_does_not_condemn_the_weights(vgg_model: Fake) -> None:
    path = _get(vgg_model)
    download.sidecar_path(path).unlink()
    vgg_model.info.prototxt.write_text("layer { name: ")
    with pytest.raises(ModelError) as err:
        download.download_model("tiny", models_dir=vgg_model.models_dir, progress=False, quiet=True)
    assert not isinstance(err.value, download.DamagedModelError) and "prototxt" in str(err.value)
    assert path.read_bytes() == vgg_model.good


def test_file_placed_by_hand_is_verified_then_recorded(vgg_model: Fake) -> None:
    vgg_model.final.parent.mkdir(parents=True)
    vgg_model.final.write_bytes(vgg_model.good)
    download.verify_model("tiny", vgg_model.models_dir)
    assert download.sidecar_path(vgg_model.final).exists()
    vgg_model.final.write_bytes(_weights_without("fc"))
    download.sidecar_path(vgg_model.final).unlink()
    with pytest.raises(download.DamagedModelError, match="'fc'"):
        download.verify_model("tiny", vgg_model.models_dir)


# --- sources and places -----------------------------------------------------------------------------------------


def test_local_file_and_file_url_mirrors(sha1_model: Fake, server: Server, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "tiny.caffemodel"
    copy.parent.mkdir()
    copy.write_bytes(sha1_model.good)
    assert _get(sha1_model, url=str(copy)).read_bytes() == sha1_model.good
    assert _get(sha1_model, url=copy.as_uri(), force=True).read_bytes() == sha1_model.good
    # A folder holding the usual file name works as well.
    assert _get(sha1_model, url=str(copy.parent), force=True).read_bytes() == sha1_model.good
    assert server.log == []
    copy.write_bytes(b"not it")
    with pytest.raises(ModelError, match="sha1"):
        _get(sha1_model, url=str(copy), force=True)


def test_missing_local_file(sha1_model: Fake, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is not a file"):
        _get(sha1_model, url=str(tmp_path / "nope.caffemodel"))
    assert _leftovers(sha1_model.final.parent) == []


def test_url_precedence(sha1_model: Fake, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    info = sha1_model.info
    assert download.resolve_source(info) == info.url
    monkeypatch.setenv("STYLE_TRANSFER_TINY_URL", "http://mirror.example/models/")
    assert download.resolve_source(info) == "http://mirror.example/models/tiny.caffemodel"
    assert download.resolve_source(info, "http://other.example/x.bin") == "http://other.example/x.bin"
    assert download.url_env_var("vgg19") == "STYLE_TRANSFER_VGG19_URL"
    server.files["/mirror/tiny.caffemodel"] = sha1_model.good
    monkeypatch.setenv("STYLE_TRANSFER_TINY_URL", server.url("/mirror/tiny.caffemodel"))
    _get(sha1_model)
    assert server.log[-1][0] == "/mirror/tiny.caffemodel"


def test_models_dir_from_environment(sha1_model: Fake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    monkeypatch.setenv(registry.MODELS_DIR_ENV, str(shared))
    path = download.download_model("tiny", progress=False, quiet=True)
    assert path == shared / "tiny" / "tiny.caffemodel"
    assert download.ensure_model("tiny") == path


def test_ensure_model_names_the_command(sha1_model: Fake) -> None:
    with pytest.raises(ModelError) as err:
        download.ensure_model("tiny", sha1_model.models_dir)
    message = str(err.value)
    assert "scripts/download_models.sh tiny --models-dir" in message
    assert "python style.py --download tiny" in message and "--download-missing" in message
    assert str(sha1_model.final) in message
    path = download.ensure_model("tiny", sha1_model.models_dir, download_missing=True, progress=False)
    assert path.read_bytes() == sha1_model.good


def test_ensure_model_refetches_a_damaged_file_only_when_allowed(sha1_model: Fake) -> None:
    path = _get(sha1_model)
    path.write_bytes(b"junk")
    with pytest.raises(download.DamagedModelError):
        download.ensure_model("tiny", sha1_model.models_dir)
    assert download.ensure_model("tiny", sha1_model.models_dir, download_missing=True, progress=False) == path
    assert path.read_bytes() == sha1_model.good


# --- the command --------------------------------------------------------------------------------------------------


def test_main_downloads_then_skips(sha1_model: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["tiny", "--models-dir", str(sha1_model.models_dir)]
    assert download.download_main(argv) == 0
    out = capsys.readouterr()
    assert "saved and verified" in out.out and out.err == ""
    assert download.download_main(argv) == 0
    assert "already there, verified" in capsys.readouterr().out


def test_main_failure_is_one_line_on_stderr(sha1_model: Fake, server: Server,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    server.mode = "404"
    assert download.download_main(["tiny", "--models-dir", str(sha1_model.models_dir), "-q"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("download: error: ") and "--mirror" in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_main_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert download.download_main(["nonesuch"]) == 2
    assert "unknown model 'nonesuch'" in capsys.readouterr().err
    assert download.download_main([]) == 2
    assert download.download_main(["vgg16", "vgg19", "--mirror", "http://x.example/one.caffemodel"]) == 2
    assert "folder URL" in capsys.readouterr().err


def test_script_without_arguments_prints_usage(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(REPO / "scripts" / "download_models.sh")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "usage:" in done.stderr and "vgg19|vgg16|googlenet|caffenet|all" in done.stderr


def test_script_runs_the_downloader_from_any_folder(tmp_path: Path) -> None:
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "download_models.sh"), "nonesuch"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "unknown model 'nonesuch'" in done.stderr
