"""Small helpers more than one module needs: one-line messages, atomic JSON, writability probes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from style_transfer.errors import StyleTransferError


def one_line(text: object) -> str:
    """Any message as one line, so that logs and batch tables stay readable."""
    return " ".join(str(text).split()) or "unknown error"


def reason(exc: BaseException) -> str:
    """What went wrong with a file, without repeating its name (the caller puts it where it reads best)."""
    if isinstance(exc, OSError) and exc.strerror:
        return one_line(exc.strerror)
    return one_line(str(exc) or type(exc).__name__)


def check_writable(path: str | os.PathLike[str], what: str) -> Path:
    """Fail before a long run if `path` could not be written: creates its folder and a scratch file there.

    Permission bits say nothing to root, nor about read-only mounts, so the folder is proved by writing to it.
    """
    target = Path(path)
    if target.is_dir():
        raise StyleTransferError(f"{what} {target} is a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=f".{target.name}.tmp-", dir=target.parent):
            pass
    except OSError as exc:
        raise StyleTransferError(f"cannot write {what} {target}: {reason(exc)}") from None
    return target


def write_json(path: str | os.PathLike[str], data: dict[str, Any], what: str = "the report") -> None:
    """Write JSON atomically: a reader sees the old file or the whole new one, never half of it."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, target)
    except OSError as exc:
        raise StyleTransferError(f"cannot write {what} {target}: {reason(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def guarded(work: Callable[[], int], *, verbose: bool, say: Callable[[str], None], interrupted: str) -> int:
    """A command's exit code with every failure as one line: the user's (StyleTransferError, memory), Ctrl-C
    (`interrupted` says what was kept), and a bug, whose traceback only -v shows."""
    try:
        return work()
    except StyleTransferError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say(interrupted)
        return 130
    except MemoryError:
        say("error: out of memory; try a smaller -l/--length")
        return 1
    except Exception as exc:
        if verbose:
            raise
        say(f"error: unexpected {type(exc).__name__}: {exc} (rerun with -v for the traceback)")
        return 1
