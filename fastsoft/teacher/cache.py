"""The teacher cache on disk: one safetensors shard per job plus ``index.json``, keyed by a fingerprint.

Kinds (per scored position): ``dense`` log-probs ``[V]``; ``topk`` ids + probs + tail mass; ``sampled``
ids with count weights (unbiased); ``hidden`` teacher final hidden states ``[H]`` (logits recomputed
inside the loss with the same frozen lm_head). Every shard also holds the tokenised queries and the
teacher's eval-query hidden states, so a job can be trained and evaluated from its shard alone.

Writes are atomic (temp file + rename) and each shard's sha256 is in the index; a cache built for a
different model, tokenizer, template or kind is refused with a sentence naming what differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastsoft.errors import FastsoftError
from fastsoft.io.atomic import atomic_write, sha256_file, write_json
from fastsoft.ops import Target
from fastsoft.teacher.batching import Taught

INDEX = "index.json"


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
        """Open (or create) the cache at ``root`` for targets of ``target_type``. With ``rebuild``, a mismatched
        or corrupted cache is emptied, and shards that fail their checksum are dropped so their jobs are taught again."""
        self.root = Path(root)
        self.fingerprint, self.target_type = fingerprint, target_type
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / INDEX
        self.index = None
        if path.exists():
            try:
                self.index = _read_index(path)
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
        for file in self.root.glob("*.safetensors"):
            file.unlink()
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
