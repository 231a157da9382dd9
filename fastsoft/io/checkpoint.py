"""Crash-safe checkpoints of a compression run: ``OUT/checkpoint.safetensors``, written atomically, no pickle.

A checkpoint is a nested state of plain values (JSON) and tensors (safetensors): every tensor is stored
in the safetensors file under its path in the state, and the JSON that holds everything else rides in the
file's metadata. Loading it runs no code, so a checkpoint planted in a shared output folder can at worst
be refused, never executed.

What the engine puts in it: the prompt bank (slots and per-slot Adam state), the scheduler's queues, every
running job's progress (``JobRun.state_dict``: step, losses, next minibatch, shuffle order, sampling-stream
state) and the global RNG state — so a resumed seeded run ends with the same soft prompts as an
uninterrupted one. Its size follows the slots, not the jobs: a waiting job has no state yet (it is rebuilt
from its seed), and a finished one is only its outcome, its report being on disk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from fastsoft.errors import FastsoftError
from fastsoft.io.atomic import atomic_write

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "fastsoft-checkpoint-1"
# Settings that may change between a run and its resumption without changing its results.
NON_SEMANTIC = {"backend"}
_TENSOR = "__tensor__"


def jobs_digest(jobs) -> str:
    return hashlib.sha256(json.dumps([asdict(j) for j in jobs], sort_keys=True).encode()).hexdigest()


def _split(value, path: str, tensors: dict[str, torch.Tensor]):
    """``value`` with each tensor replaced by a reference to ``tensors[path]``."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"checkpoint state keys must be strings (at {path or 'the top'})")
        return {k: _split(v, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"checkpoint state holds a {type(value).__name__} at {path}; only plain values and tensors are stored"
    )


def _join(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_checkpoint(out: Path, state: dict, name: str = CHECKPOINT) -> None:
    """Write ``state`` (nested dicts/lists of plain values and tensors) to ``out/name`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    plain = _split(state, "", tensors)
    atomic_write(
        out / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": json.dumps(plain)})
    )


def read_checkpoint(path: Path) -> dict:
    """The state saved by :func:`save_checkpoint`; a damaged or foreign file is refused with one sentence."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError("not a fastsoft checkpoint")
        return _join(json.loads(metadata["state"]), load_file(str(path)))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        raise FastsoftError(
            f"checkpoint {path} is damaged or not a fastsoft checkpoint ({type(error).__name__}); "
            "delete it to start over"
        ) from error


# what a run checkpointed before a setting existed did, where that differs from the setting's default: such a run
# resumes only with the setting at that value (absent keys otherwise read as None, the default of most)
BEFORE_SETTING = {"topic_queries": 0}


def load_checkpoint(out: Path, jobs_hash: str, config: dict, name: str = CHECKPOINT) -> dict:
    """The checkpoint in ``out``, checked to belong to the same jobs and settings."""
    path = out / name
    if not path.is_file():
        raise FastsoftError(
            f"there is no checkpoint to resume in {out} (no {name}); run without --resume, or with the same number of ranks"
        )
    state = read_checkpoint(path)
    if state.get("jobs_digest") != jobs_hash:
        raise FastsoftError(
            f"the jobs differ from those of the checkpointed run in {out}; resume with the same jobs file"
        )
    saved = {**BEFORE_SETTING, **state["config"]}
    changed = sorted(k for k, v in config.items() if k not in NON_SEMANTIC and saved.get(k) != v)
    if changed:
        raise FastsoftError(
            f"these settings differ from the checkpointed run's: {', '.join('--' + c.replace('_', '-') for c in changed)}"
        )
    return state
