"""Scale-out under ``torchrun``: one process per GPU (or CPU process with gloo), no framework.

Two ways to spread work, chosen by ``shard_jobs``:

- **sharded** (default when there are at least as many jobs as ranks): rank ``r`` runs jobs
  ``r, r + world, ...`` with its own scheduler; ranks never talk until the end, when rank 0 gathers
  the reports. A job's result does not depend on the other jobs, so the soft prompts equal a
  single-process run's.
- **split** (fewer jobs than ranks, or ``--split-jobs``): every rank runs every job's schedule, but
  each takes a disjoint share of every minibatch; per-job token counts and the prompt gradients are
  all-reduced, so every rank holds the same σ, equal to a single-process run's. Rank 0 exports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    split: bool = False  # every rank shares every job (all-reduce of its gradient)

    @property
    def active(self) -> bool:
        return self.world > 1

    def suffix(self, name: str) -> str:
        """A per-rank file or folder name (``checkpoint.pt`` -> ``checkpoint-rank1.pt``) under torchrun."""
        if not self.active:
            return name
        stem, dot, ext = name.partition(".")
        return f"{stem}-rank{self.rank}{dot}{ext}"

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere); just ``[obj]`` in a single process."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out


def init_from_env(split: bool = False) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (a single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return Dist(rank, world, local_rank, split)


def shutdown(d: Dist, clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first meets the others at a barrier, so none tears its
    connections down while a peer still works on the last collective (a gloo rank left alone then aborted at exit,
    once in CI). After an error there is no barrier: the other ranks may never reach it."""
    if d.active and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
