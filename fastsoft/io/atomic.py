"""Every file fastsoft writes goes through :func:`atomic_write`: a reader sees the old file or the new
one, never half of one, even after a crash or a full disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    The temporary file (``.<name>.tmp<pid>``) is removed if ``write`` fails, so nothing half-written is left.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        code = _errno_of(error)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from error  # the file the caller wrote, not the temporary one


def _errno_of(error: BaseException) -> int | None:
    """The OS error behind a failed write: an ``OSError``'s errno, or the ``(os error N)`` that writers outside
    Python (safetensors) put in their messages."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found and isinstance(error, Exception) else None


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent))


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writers which died mid-write left in ``folder`` and its sub-folders (one level).

    Only files named like :func:`atomic_write`'s (``.<name>.tmp<pid>``) whose process is gone are removed; call it
    while holding the folder's lock. Returns what was removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in [*folder.glob(".*.tmp*"), *folder.glob("*/.*.tmp*")]:
        pid = path.name.rpartition(".tmp")[2]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
