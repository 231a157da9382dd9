"""The output folder of a run: ``OUT/<job id>/`` holds a finished job's PEFT export, ``fastsoft.json``,
``report.json`` and ``loss.png``, or a failed job's ``error.json`` — never both. ``report.json`` is written
last: a job whose report exists is finished and exported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastsoft.errors import FastsoftError
from fastsoft.io.atomic import write_json
from fastsoft.io.export import save_prompt
from fastsoft.io.lock import FolderLock
from fastsoft.io.report import write_report

REPORT, ERROR = "report.json", "error.json"


def make_folder(path: Path, flag: str) -> None:
    """Create a folder the run writes into, or say in one sentence why it cannot be."""
    if path.exists() and not path.is_dir():
        raise FastsoftError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FastsoftError(f"{flag} {path} cannot be created ({error.strerror})") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise FastsoftError(f"{flag} {path} is not writable (a read-only file system, or no permission)")


def cache_folder(out: Path, cache: str | Path | None, rank: int | None) -> Path:
    """The teacher cache folder of a run: ``--cache`` or ``OUT/cache``, one sub-folder a rank under torchrun
    (``rank`` None: a single process) so that no two writers share a file."""
    root = Path(cache) if cache is not None else Path(out) / "cache"
    return root if rank is None else root / f"rank{rank}"


def check_run_folders(out: Path, cache: Path, rank: int) -> None:
    """Before any work: both folders can be created and written, and no other run holds them (the engine then takes
    the locks for the run's life; this only refuses early, before a model loads)."""
    for folder, flag, what, mine in (
        (out, "--out", "output folder", rank == 0),
        (cache, "--cache", "teacher cache folder", True),
    ):
        make_folder(folder, flag)
        if mine:
            FolderLock(folder, what).acquire().release()


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def job(self, job_id: str) -> Path:
        return self.root / job_id

    def is_finished(self, job_id: str) -> bool:
        return (self.job(job_id) / REPORT).is_file()

    def read_report(self, job_id: str) -> dict:
        path = self.job(job_id) / REPORT
        if not path.is_file():
            raise FastsoftError(
                f"{path} of the finished job {job_id!r} is missing; restore it, or run without --resume"
            )
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FastsoftError(
                f"{path} of the finished job {job_id!r} is damaged; restore it, or run without --resume"
            ) from error

    def write_done(self, job_id: str, prompt: torch.Tensor, report: dict, **export) -> None:
        """Export ``prompt [P, H]`` (``export``: :func:`fastsoft.io.export.save_prompt`'s keywords), then the report."""
        folder = self.job(job_id)
        (folder / ERROR).unlink(missing_ok=True)
        save_prompt(folder, prompt, **export)
        write_report(folder, report)

    def write_error(self, job_id: str, message: str) -> None:
        folder = self.job(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / REPORT).unlink(missing_ok=True)  # a folder says one thing: this job failed
        write_json(folder / ERROR, {"job_id": job_id, "error": message})
