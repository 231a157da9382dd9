"""Crash-safe checkpoints of a compression run: ``OUT/checkpoint.pt``, written atomically.

Holds everything the loop needs to continue exactly where it stopped: the prompt bank (slots and
per-slot Adam state), the scheduler's queues, every running job's progress (step, losses, the
minibatch drawn for its next step, its shuffle order and sampling-stream state) and the global RNG
state. A resumed seeded run therefore ends with the same soft prompts as an uninterrupted one.

Its size follows the slots, not the jobs: a waiting job has no state yet (it is rebuilt from its
seed), and a finished one is only its outcome, its report being on disk (``OUT/<job>/report.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from fastsoft.errors import FastsoftError

CHECKPOINT = "checkpoint.pt"
# Settings that may change between a run and its resumption without changing its results.
NON_SEMANTIC = {"backend"}


def jobs_digest(jobs) -> str:
    return hashlib.sha256(json.dumps([asdict(j) for j in jobs], sort_keys=True).encode()).hexdigest()


def save_checkpoint(out: Path, state: dict, name: str = CHECKPOINT) -> None:
    path = out / name
    tmp = path.with_name(f".{name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(out: Path, jobs_hash: str, config: dict, name: str = CHECKPOINT) -> dict:
    path = out / name
    if not path.is_file():
        raise FastsoftError(f"there is no checkpoint to resume in {out} (no {name}); run without --resume, or with the same number of ranks")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise FastsoftError(f"checkpoint {path} cannot be read ({type(error).__name__}); delete it to start over") from error
    if state.get("jobs_digest") != jobs_hash:
        raise FastsoftError(f"the jobs differ from those of the checkpointed run in {out}; resume with the same jobs file")
    changed = sorted(k for k, v in config.items() if k not in NON_SEMANTIC and state["config"].get(k) != v)
    if changed:
        raise FastsoftError(f"these settings differ from the checkpointed run's: {', '.join('--' + c.replace('_', '-') for c in changed)}")
    return state


RUN_FIELDS = ("slot", "step", "waited", "losses", "stop_reason", "error", "seconds", "pending", "report", "_order")


def run_state(run) -> dict:
    """What a checkpoint needs to continue one job exactly (its teacher comes back from the cache)."""
    return {"job_id": run.job.id, "state": run.state.value, **{k: getattr(run, k) for k in RUN_FIELDS},
            "generator": run.generator.get_state()}


def restore_run(run, saved: dict, states) -> None:
    run.state = states(saved["state"])
    for key in RUN_FIELDS:
        setattr(run, key, saved[key])
    run.generator.set_state(saved["generator"])


def finished_state(run, report_on_disk: bool) -> dict:
    """A finished job's outcome; its report only when this rank did not write it to disk (a split run's other ranks)."""
    return {"state": run.state.value, "step": run.step, "error": run.error, "report": None if report_on_disk else run.report}


def restore_finished(run, saved: dict, report_file: Path, states) -> None:
    run.state, run.step, run.error, run.report = states(saved["state"]), saved["step"], saved["error"], saved["report"]
    if run.state is states.DONE and run.report is None:
        if not report_file.is_file():
            raise FastsoftError(f"{report_file} of the finished job {run.job.id!r} is missing; restore it, or run without --resume")
        run.report = json.loads(report_file.read_text())
