"""The scheduler: slots, waiting, best-fit packing of whole minibatches."""

from __future__ import annotations

from fastsoft.data.jobs import Job
from fastsoft.train.scheduler import JobRun, Scheduler, State


def _runs(n):
    return [JobRun(Job(f"j{i}", "c", ["q"]), seed=i) for i in range(n)]


def test_a_job_arriving_while_every_slot_is_busy_waits_and_a_finished_one_frees_its_slot():
    scheduler = Scheduler(slots=2, token_budget=100)
    a, b, c, d = _runs(4)
    scheduler.submit(a)
    scheduler.submit(b)
    assert scheduler.admit() == [a, b] and (a.slot, b.slot) == (0, 1)
    scheduler.submit(c)  # arrives while every slot is busy
    assert scheduler.admit() == [] and c.state is State.WAITING and scheduler.counts()["waiting"] == 1
    scheduler.retire(a, State.DONE)
    scheduler.submit(d)
    assert scheduler.admit() == [c] and c.slot == 0 and c.state is State.TEACHING  # first come, first served
    assert d.state is State.WAITING and scheduler.free_slots() == []
    assert scheduler.counts() == {"waiting": 1, "training": 2, "done": 1, "failed": 0}


def test_best_fit_packing_takes_whole_minibatches_and_never_starves_a_job():
    scheduler = Scheduler(slots=4, token_budget=100)
    runs = _runs(4)
    for run in runs:
        scheduler.submit(run)
    scheduler.admit()
    for run in runs:
        run.state = State.TRAINING
    lengths = {0: [30, 30], 1: [50], 2: [40], 3: [20]}  # per slot: the packed lengths of the job's minibatch
    minibatches = {slot: list(range(len(v))) for slot, v in lengths.items()}
    seen = []
    for _ in range(6):
        chosen = scheduler.plan(minibatches, lengths)
        assert scheduler.plan(minibatches, lengths) == chosen  # planning changes nothing; the step's commit does
        scheduler.commit(chosen)
        assert sum(sum(lengths[r.slot]) for r in chosen) <= 100 or len(chosen) == 1
        assert [r.slot for r in chosen] == sorted(r.slot for r in chosen)  # admission order
        seen.append([r.slot for r in chosen])
    # step 1: j0 (60) first, then best-fit decreasing in the 40 left: j2 (40) fits exactly
    assert seen[0] == [0, 2]
    assert {s for step in seen for s in step} == {0, 1, 2, 3}  # no job starves
    # a minibatch larger than the whole budget still runs, alone in its step
    lengths[1] = [250]
    for _ in range(4):
        chosen = scheduler.plan(minibatches, lengths)
        scheduler.commit(chosen)
        if any(r.slot == 1 for r in chosen):
            assert [r.slot for r in chosen] == [1]
            break
    else:
        raise AssertionError("the oversized job never ran")
