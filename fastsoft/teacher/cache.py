"""The teacher cache on disk: one safetensors shard per job plus ``index.json``, keyed by a fingerprint.

Kinds (per scored position): ``dense`` log-probs ``[V]``; ``topk`` ids + probs + tail mass; ``sampled``
ids with count weights (unbiased); ``hidden`` teacher final hidden states ``[H]`` (logits recomputed
inside the loss with the same frozen lm_head). Every shard also holds the tokenised queries and the
teacher's eval-query hidden states, so a job can be trained and evaluated from its shard alone.

Writes are atomic (temp file + rename) and each shard's sha256 is in the index; a cache built for a
different model, tokenizer, template or kind is refused with a sentence naming what differs.

A cache folder carries the marker file ``.fastsoft-cache``, written when fastsoft makes the cache; a folder that is
neither empty nor a cache (a model folder, another run's output) is refused, and ``--rebuild-cache`` deletes only the
shards the index lists, never other files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastsoft.errors import FastsoftError
from fastsoft.io.atomic import atomic_write, sha256_file, write_json
from fastsoft.io.lock import LOCK
from fastsoft.io.outputs import is_run_folder
from fastsoft.ops import Target
from fastsoft.teacher.batching import Taught

INDEX = "index.json"
MARKER = ".fastsoft-cache"  # "fastsoft made this folder a teacher cache": the proof that its indexed shards are its own


def _read_index(path: Path) -> dict:
    """``index.json``, checked to have the shape this module writes; anything else is refused as corrupted."""
    try:
        index = json.loads(path.read_text())
        ok = (
            isinstance(index, dict)
            and isinstance(index.get("fingerprint"), dict)
            and isinstance(index.get("jobs"), dict)
        )
        entry_keys = {"file": str, "sha256": str, "queries": int, "rows": int}
        if ok and not all(
            isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in entry_keys.items())
            for e in index["jobs"].values()
        ):
            ok = False
        if not ok:
            raise ValueError("not the index this version writes")
    except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
        raise FastsoftError(
            f"teacher cache index {path} is corrupted ({error}); pass --rebuild-cache to rebuild it"
        ) from error
    return index


def _is_shard(job_id: str, entry: dict) -> bool:
    """Whether an index entry names the shard :meth:`TeacherCache.put` writes for ``job_id``: ``<id>.safetensors``
    directly inside the folder (a tampered name that would reach outside it, or another file, is not one)."""
    name = entry["file"]
    return name == f"{job_id}.safetensors" and "/" not in name and "\0" not in name and not name.startswith(".")


def _holds_nothing(root: Path) -> bool:
    """Whether ``root`` holds nothing but what a run leaves in any folder it opens (its lock and dead writers'
    temporary files), and the per-rank caches of a torchrun run (``rank<N>/``, each marked), which a later run with
    another number of processes may sit beside."""
    return all(
        p.name == LOCK
        or (p.name.startswith(".") and ".tmp" in p.name)
        or (p.is_dir() and re.fullmatch(r"rank\d+", p.name) and (p / MARKER).is_file())
        for p in root.iterdir()
    )


def check_cache_folder(root: str | Path) -> bool:
    """Refuse ``root`` (``FastsoftError``) unless fastsoft may keep a teacher cache there: it does not exist yet, holds
    nothing, carries the marker, or is a cache of a fastsoft older than the marker (a readable index that lists only
    fastsoft shards). Returns whether the folder is already marked. Called before the model loads and on opening."""
    root = Path(root)
    if not root.is_dir() or (root / MARKER).is_file() or _holds_nothing(root):
        return (root / MARKER).is_file()
    try:
        index = _read_index(root / INDEX)
        if all(_is_shard(job_id, entry) for job_id, entry in index["jobs"].items()):
            return False
    except (FastsoftError, OSError):
        pass
    raise FastsoftError(
        f"--cache {root} is not a fastsoft teacher cache (it holds other files, and neither a {MARKER} marker nor a "
        "readable index.json), so fastsoft will not write or delete anything there; choose an empty or new --cache folder"
    )


def _flat(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(x) for x in lists], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.tensor([t for x in lists for t in x], dtype=torch.int32), offsets


def _unflat(values: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    return [values[a:b].tolist() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


@dataclass
class JobTeacher:
    """One job's cached teacher: tokenised training queries with their targets, and eval queries."""

    context_ids: list[int]
    train: list[Taught]  # hidden is empty here: the targets below carry the teacher
    targets: Target  # rows in query order, one per answer token
    row_offsets: list[int]  # query i owns rows row_offsets[i]:row_offsets[i + 1]
    eval: list[Taught]  # with fp32 teacher hidden states (exact evaluation)


class TeacherCache:
    """A folder of per-job shards and an index, bound to one fingerprint."""

    def __init__(self, root: str | Path, fingerprint: dict, target_type: type, rebuild: bool = False):
        """Open (or create) the cache at ``root`` for targets of ``target_type``; a folder that is not a cache is
        refused (:func:`check_cache_folder`). With ``rebuild``, a mismatched cache loses the shards its index lists
        (nothing else), a corrupted index is replaced by an empty one (with no index to prove which files are
        fastsoft's, none is deleted: a stale shard is overwritten when its job is taught again), and shards that fail
        their checksum are dropped so their jobs are taught again."""
        self.root = Path(root)
        self.fingerprint, self.target_type = fingerprint, target_type
        marked = check_cache_folder(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if not marked:  # a new folder, or a cache of an older fastsoft: from now on a marked cache
            write_json(self.root / MARKER, {"what": "fastsoft teacher cache", "index": INDEX}, indent=1)
        path = self.root / INDEX
        self.index = None
        if path.exists():
            try:
                self.index = _read_index(path)
            except FastsoftError:
                if not rebuild:
                    raise  # with rebuild: an unreadable index proves no file ours, so a fresh one starts below
        if self.index is not None:
            try:
                self._check_fingerprint(self.index["fingerprint"])
            except FastsoftError:
                if not rebuild:
                    raise
                self._clear()
            else:
                if rebuild:
                    for job_id, entry in list(self.index["jobs"].items()):
                        shard = self.root / entry["file"]
                        if not shard.exists() or sha256_file(shard) != entry["sha256"]:
                            del self.index["jobs"][job_id]
                    self._save_index()
        if self.index is None:
            self.index = {"version": 1, "fingerprint": fingerprint, "jobs": {}}
            self._save_index()

    def _clear(self) -> None:
        """Delete the shards the index lists (only those: a file fastsoft did not index is not its to delete)."""
        for job_id, entry in self.index["jobs"].items():
            if _is_shard(job_id, entry):
                (self.root / entry["file"]).unlink(missing_ok=True)
        self.index = None

    def _check_fingerprint(self, found: dict) -> None:
        if found.get("vocab_size") != self.fingerprint.get("vocab_size"):
            raise FastsoftError(
                f"teacher cache {self.root} was built for a vocabulary of {found.get('vocab_size')} tokens, "
                f"the model has {self.fingerprint.get('vocab_size')}; use another --cache folder or pass --rebuild-cache"
            )
        names = {
            "model": "model weights or tokenizer",
            "template": "prompt template",
            "kind": "teacher kind",
            "params": "teacher parameters",
        }
        for key, name in names.items():
            if found.get(key) != self.fingerprint.get(key):
                raise FastsoftError(
                    f"teacher cache {self.root} was built with another {name} ({found.get(key)!r}, now {self.fingerprint.get(key)!r}); "
                    "use another --cache folder or pass --rebuild-cache"
                )

    def _save_index(self) -> None:
        write_json(self.root / INDEX, self.index, indent=1)

    def has(self, job_id: str, digest: str | None = None) -> bool:
        """Whether a teacher for ``job_id`` is cached (for exactly the job of ``digest``, :meth:`Job.digest`, when given:
        a job whose context or queries changed under the same id is taught again)."""
        entry = self.index["jobs"].get(job_id)
        return entry is not None and (digest is None or entry.get("job_digest") == digest)

    def put(
        self,
        job_id: str,
        context_ids: list[int],
        train: list[Taught],
        targets: Target,
        eval: list[Taught],
        flush: bool = True,
        digest: str | None = None,
    ) -> None:
        """Write one job's shard atomically and index it. With ``flush=False`` the index is written by the next
        :meth:`flush` (one index write per batch of jobs: the index is rewritten whole, so per-job writes would
        cost O(jobs²) over a large run; a shard written but not yet indexed is simply taught again)."""
        tensors = {f"target.{name}": value.contiguous() for name, value in targets.tensors().items()}
        for split, taught in (("train", train), ("eval", eval)):
            for part in ("before", "after", "answer"):
                tensors[f"{split}.{part}"], tensors[f"{split}.{part}_offsets"] = _flat(
                    [getattr(t, part) for t in taught]
                )
        tensors["eval.hidden"] = torch.cat([t.hidden.float().cpu() for t in eval]) if eval else torch.zeros(0)
        tensors["context"] = torch.tensor(context_ids, dtype=torch.int32)
        name = f"{job_id}.safetensors"
        atomic_write(self.root / name, lambda tmp: save_file(tensors, str(tmp)))
        self.index["jobs"][job_id] = {
            "file": name,
            "queries": len(train),
            "rows": sum(len(t.answer) for t in train),
            "sha256": sha256_file(self.root / name),
            "job_digest": digest,
        }
        if flush:
            self.flush()

    def flush(self) -> None:
        """Write the index (atomically)."""
        self._save_index()

    def get(self, job_id: str, digest: str | None = None) -> JobTeacher:
        """The cached teacher of ``job_id`` (checked against ``digest`` when given), its shard verified by its sha256."""
        if not self.has(job_id, digest):
            raise FastsoftError(
                f"teacher cache {self.root} holds no teacher for this job {job_id!r}; pass --rebuild-cache to teach it again"
            )
        entry = self.index["jobs"][job_id]
        path = self.root / entry["file"]
        if not path.exists():
            raise FastsoftError(f"teacher cache shard {path} is missing; pass --rebuild-cache to rebuild it")
        if sha256_file(path) != entry["sha256"]:
            raise FastsoftError(
                f"teacher cache shard {path} is truncated or corrupted (checksum mismatch); pass --rebuild-cache to rebuild it"
            )
        tensors = load_file(str(path))
        splits = {}
        for split in ("train", "eval"):
            parts = {
                part: _unflat(tensors[f"{split}.{part}"], tensors[f"{split}.{part}_offsets"])
                for part in ("before", "after", "answer")
            }
            splits[split] = [
                Taught(b, a, y, torch.zeros(0)) for b, a, y in zip(parts["before"], parts["after"], parts["answer"])
            ]
        start = 0
        for taught in splits["eval"]:
            taught.hidden = tensors["eval.hidden"][start : start + len(taught.answer)]
            start += len(taught.answer)
        lengths = [len(t.answer) for t in splits["train"]]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        targets = {k.removeprefix("target."): v for k, v in tensors.items() if k.startswith("target.")}
        for name, value in list(targets.items()) + [("eval hidden states", tensors["eval.hidden"])]:
            bad = (
                torch.isnan(value)
                | (value == float("inf"))
                | ((value == float("-inf")) if name != "logprobs" else False)
            )
            if bool(bad.any()):
                raise FastsoftError(
                    f"the teacher cache of job {job_id!r} holds NaN or infinite values ({name}); pass --rebuild-cache"
                )
        return JobTeacher(
            tensors["context"].tolist(),
            splits["train"],
            self.target_type.from_tensors(targets),
            offsets,
            splits["eval"],
        )


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop: compare the paths as written
        return Path(os.path.abspath(path))


def check_cache_placement(out: Path, cache: Path) -> None:
    """Refuse (``FastsoftError``) a ``--cache`` that is ``--out`` itself, holds ``--out``, or is or lies inside another
    run's ``--out``; a folder inside the run's own ``--out`` (as the default ``OUT/cache``) is fine."""
    out_at, cache_at = _resolved(Path(out)), _resolved(Path(cache))
    if cache_at == out_at:
        raise FastsoftError(
            f"--cache {cache} is the --out folder itself, and the teacher cache needs a folder of its own; "
            f"leave --cache out (it defaults to {Path(out) / 'cache'}) or choose another --cache folder"
        )
    if cache_at in out_at.parents:
        raise FastsoftError(f"--out {out} lies inside --cache {cache}; choose a --cache folder outside the run's --out")
    for folder in (cache_at, *cache_at.parents):
        if folder == out_at:
            return
        if is_run_folder(folder):
            where = "is" if folder == cache_at else f"lies inside {folder},"
            raise FastsoftError(
                f"--cache {cache}: the teacher cache folder {where} the output folder of another fastsoft run; "
                "choose a --cache folder outside every run's --out"
            )


def cache_folder(out: Path, cache: str | Path | None, rank: int | None) -> Path:
    """The teacher cache folder of a run: ``--cache`` or ``OUT/cache``, one sub-folder a rank under torchrun
    (``rank`` None: a single process) so that no two writers share a file. Refuses, before anything is written, a
    misplaced ``--cache`` (:func:`check_cache_placement`) and a folder that is not a teacher cache
    (:func:`check_cache_folder`); the CLI's early check and the engine both come through here."""
    root = Path(cache) if cache is not None else Path(out) / "cache"
    if cache is not None:
        check_cache_placement(Path(out), root)
    folder = root if rank is None else root / f"rank{rank}"
    check_cache_folder(folder)
    return folder
