"""The output folder of a run: ``OUT/<job id>/`` holds a finished job's PEFT export, ``fastsoft.json``,
``report.json`` and ``loss.png``, or a failed job's ``error.json`` — never both. ``report.json`` is written
last: a job whose report exists is finished and exported. ``OUT/.fastsoft-run`` marks the folder as a run's output,
so that no other run puts its teacher cache inside it (``fastsoft.teacher.cache.cache_folder``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastsoft.errors import FastsoftError
from fastsoft.io.atomic import write_json
from fastsoft.io.export import save_prompt
from fastsoft.io.lock import LOCK, FolderLock
from fastsoft.io.report import write_report

REPORT, ERROR = "report.json", "error.json"
RUN_MARKER = ".fastsoft-run"  # job ids never start with ".", so no job folder can take this name


def make_folder(path: Path, flag: str) -> None:
    """Create a folder the run writes into, or say in one sentence why it cannot be. The ``--out`` folder is marked
    as a run's output (:data:`RUN_MARKER`): the CLI's early check and the engine both create it through here."""
    path = Path(path)
    for link in (path, *path.parents):
        if link.is_symlink() and not link.exists():
            where = "is" if link == path else f"lies under {link}, which is"
            raise FastsoftError(
                f"{flag} {path} {where} a symbolic link to {os.readlink(link)}, which does not exist; "
                f"create its target or choose another {flag} folder"
            )
    if path.exists() and not path.is_dir():
        raise FastsoftError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FastsoftError(f"{flag} {path} cannot be created ({error.strerror})") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise FastsoftError(f"{flag} {path} is not writable (a read-only file system, or no permission)")
    if flag == "--out" and not (path / RUN_MARKER).is_file():
        try:
            write_json(path / RUN_MARKER, {"what": "fastsoft run output folder"}, indent=1)
        except OSError as error:
            raise FastsoftError(f"{flag} {path} cannot be written ({error.strerror})") from error


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a fastsoft run's ``--out``: it carries :data:`RUN_MARKER`, or (a run of a fastsoft older
    than the marker) the run lock beside a checkpoint or ``summary.json``; a teacher cache has neither of those."""
    try:
        if (folder / RUN_MARKER).is_file():
            return True
        return (folder / LOCK).is_file() and (
            (folder / "summary.json").is_file() or any(folder.glob("checkpoint*.safetensors"))
        )
    except OSError:  # a folder we may not look into is no run's that we could share
        return False


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
