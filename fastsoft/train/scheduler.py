"""Continuous batching over compression jobs, at optimizer-step granularity (Orca/vLLM style).

Queues: WAITING -> TEACHING -> TRAINING -> DONE / FAILED. A fixed number of prompt slots; a job is
admitted when a slot is free (a job that arrives while every slot is busy waits), and a job that
converges or spends its step budget frees its slot for the next waiting job at the next step.

Each step packs whole minibatches: a job's minibatch goes into a step entirely or not at all, so what a
job sees in a step never depends on the other jobs (its draws come from its own seeded stream, its loss is
normalised over its own tokens). Packing is best-fit into the step's token budget: the job that has
waited longest goes first (no job starves; one whose minibatch alone exceeds the budget still runs, alone
in its step), then the remaining budget is filled best-fit decreasing — the largest minibatch that still
fits, then the next largest that fits, and so on. A job left out waits for the next step.
"""

from __future__ import annotations

import enum
import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastsoft.data.jobs import Job


class State(enum.Enum):
    WAITING = "waiting"
    TEACHING = "teaching"
    TRAINING = "training"
    DONE = "done"
    FAILED = "failed"


def job_seed(seed: int, job_id: str) -> int:
    """A per-job seed that does not depend on the job's position or on the other jobs."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{job_id}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass
class JobRun:
    job: Job
    seed: int
    state: State = State.WAITING
    slot: int | None = None
    teacher: object = None  # fastsoft.teacher.cache.JobTeacher once taught
    step: int = 0
    losses: list[float] = field(default_factory=list)
    stop_reason: str = ""
    error: str = ""
    seconds: float = 0.0
    pending: list[int] | None = None  # the minibatch drawn for the job's next step (kept until it runs)
    report: dict | None = None
    generator: torch.Generator = None
    waited: int = 0  # training steps in a row this job was left out of (packing priority)
    eval_source: str = ""  # where the held-out queries come from; "" until the job is prepared (self-study + split)
    synthesis: dict | None = None  # self-study's counts (kept, dropped by reason), when it ran
    stage_seconds: dict = field(default_factory=dict)  # its equal share of the self-study and teacher batches it was in
    dropped: dict = field(default_factory=dict)  # queries dropped as repeated or held out (from the jobs, every run)
    _order: list[int] = field(default_factory=list)  # the rest of the current epoch's shuffle, drawn from the end

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def next_batch(self, batch_queries: int) -> list[int]:
        """The next minibatch of training-query indices: epochs of a per-job seeded shuffle."""
        count = len(self.teacher.train)
        chosen = []
        while len(chosen) < min(batch_queries, count):
            if not self._order:
                self._order = torch.randperm(count, generator=self.generator).tolist()
            chosen.append(self._order.pop())
        return chosen

    # -- checkpoints: plain values and tensors only (no pickle) ----------------------------------------

    _PROGRESS = ("slot", "step", "waited", "losses", "stop_reason", "error", "seconds", "pending", "report")

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this job exactly (its teacher comes back from the cache)."""
        return {
            "state": self.state.value,
            **{k: getattr(self, k) for k in self._PROGRESS},
            "order": list(self._order),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, saved: dict) -> None:
        self.state = State(saved["state"])
        for key in self._PROGRESS:
            setattr(self, key, saved[key])
        self._order = list(saved["order"])
        self.generator.set_state(saved["generator"])

    def outcome_dict(self, report_on_disk: bool) -> dict:
        """A finished job's outcome; its report only when it is not on disk (a split run's other ranks)."""
        return {
            "state": self.state.value,
            "step": self.step,
            "error": self.error,
            "report": None if report_on_disk else self.report,
        }

    def load_outcome(self, saved: dict, report: Callable[[], dict]) -> None:
        """Restore a finished job; ``report()`` reads its report from disk when the checkpoint does not hold it."""
        self.state, self.step, self.error, self.report = (
            State(saved["state"]),
            saved["step"],
            saved["error"],
            saved["report"],
        )
        if self.state is State.DONE and self.report is None:
            self.report = report()


class Scheduler:
    def __init__(self, slots: int, token_budget: int):
        if slots < 1 or token_budget < 1:
            raise ValueError("the scheduler needs at least one slot and a positive token budget")
        self.slots, self.token_budget = slots, token_budget
        self.waiting: deque[JobRun] = deque()
        self.running: list[JobRun] = []  # TEACHING or TRAINING, in admission order
        self.finished: list[JobRun] = []

    def submit(self, run: JobRun) -> None:
        self.waiting.append(run)

    def free_slots(self) -> list[int]:
        used = {run.slot for run in self.running}
        return [s for s in range(self.slots) if s not in used]

    def admit(self) -> list[JobRun]:
        """Move waiting jobs into free slots (state TEACHING); returns the admitted runs."""
        admitted = []
        for slot in self.free_slots():
            if not self.waiting:
                break
            run = self.waiting.popleft()
            run.slot, run.state = slot, State.TEACHING
            self.running.append(run)
            admitted.append(run)
        return admitted

    def retire(self, run: JobRun, state: State) -> None:
        """A job leaves: its slot is free from the next step on."""
        run.state = state
        self.running.remove(run)
        self.finished.append(run)

    def plan(self, minibatches: dict[int, list[int]], lengths: dict[int, list[int]]) -> list[JobRun]:
        """Training jobs whose whole minibatch goes into this step, packed best-fit into the token budget.

        ``minibatches[slot]`` is the job's query indices, ``lengths[slot]`` their packed lengths. Returns the
        chosen runs in admission order. Changes nothing: :meth:`commit` does, once the step has run.
        """
        training = [run for run in self.running if run.state is State.TRAINING]
        if not training:
            return []
        need = {run.slot: sum(lengths[run.slot]) for run in training}
        first = max(training, key=lambda run: run.waited)  # ties: the earliest admitted
        chosen, used = {first.slot}, need[first.slot]
        for run in sorted(training, key=lambda run: -need[run.slot]):  # stable: ties in admission order
            if run.slot not in chosen and used + need[run.slot] <= self.token_budget:
                chosen.add(run.slot)
                used += need[run.slot]
        return [run for run in training if run.slot in chosen]

    def commit(self, chosen: list[JobRun]) -> None:
        """A planned step has run: the jobs left out of it waited one step more, the chosen ones start again at 0."""
        slots = {run.slot for run in chosen}
        for run in self.running:
            if run.state is State.TRAINING:
                run.waited = 0 if run.slot in slots else run.waited + 1

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def counts(self) -> dict[str, int]:
        done = sum(r.state is State.DONE for r in self.finished)
        return {
            "waiting": len(self.waiting),
            "training": len(self.running),
            "done": done,
            "failed": len(self.finished) - done,
        }
