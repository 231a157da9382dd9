"""Every file fastsoft writes goes through :func:`atomic_write`: a reader sees the old file or the new
one, never half of one, even after a crash or a full disk."""

from __future__ import annotations

import json
import os
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent))
