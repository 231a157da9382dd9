"""One run per folder: an exclusive lock held for the run's whole life.

``fcntl.flock`` on ``<folder>/.fastsoft.lock``: the kernel drops it when its process ends, however it ends,
so a run killed with SIGKILL never leaves a lock behind (a later ``--resume`` is not blocked), while a second
run started into the same folder is refused with a sentence naming the holder (pid, host, start time,
command) read from the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from fastsoft.errors import FastsoftError

LOCK = ".fastsoft.lock"


class FolderLock:
    def __init__(self, folder: str | Path, what: str):
        self.path, self.what, self.handle = Path(folder) / LOCK, what, None

    def acquire(self) -> FolderLock:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                handle.close()
                raise
            handle.seek(0)
            text = handle.read()
            handle.close()
            role = _held_here(text)
            if role is not None:  # flock excludes a second open of the file even within one process
                raise FastsoftError(
                    f"{self.what} {self.path.parent} is already held by this same process (pid {os.getpid()}) as its "
                    f"{role}; one folder cannot serve as two of a run's folders, or hold two runs of one process, so "
                    "choose another folder"
                ) from None
            raise FastsoftError(
                f"{self.what} {self.path.parent} is in use by another fastsoft run ({_describe(text)}); "
                "wait for it to end or choose another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "what": self.what,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv)[:300],
                }
            )
        )
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _held_here(text: str) -> str | None:
    """The role (``what``) the lock file's holder took the folder for, when the holder is this very process; else None."""
    try:
        holder = json.loads(text)
        if holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
            return str(holder.get("what", "folder"))
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    return None


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder unknown"
