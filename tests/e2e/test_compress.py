"""fastsoft.compress end to end on the tiny model: training, objectives, slots, independence of jobs."""

from __future__ import annotations

import pytest
import torch

import fastsoft
from fastsoft.data.jobs import Job
from fastsoft.io.export import load_prompt


def _jobs():
    base = CONTEXTS[0] + " " + CONTEXTS[1]
    return [
        Job(f"job{i}", base[i * 7 :] if i % 2 else base[::-1][i * 5 :], QUERIES[i % 2 :] + QUERIES[: i % 2])
        for i in range(4)
    ]


CONTEXTS = [
    "The harbour town of Velmora paints every door teal and holds a lantern festival each spring.",
    "Its mayor, Odile Varsk, keeps seventeen goats and a blue bicycle named Comet. " * 3,
    "Velmora",
]


QUERIES = [
    "What colour are the doors?",
    "Who?",
    "How many goats does the mayor keep, and what is the bicycle named?",
    "When is the festival?",
]


SMALL = dict(
    steps=3,
    prompt_length=3,
    max_new_tokens=2,
    lr=0.05,
    tol=0.0,
    batch_queries=2,
    eval_fraction=0.0,
    init="random",
    progress=False,
    seed=7,
)


TRAIN = dict(steps=12, prompt_length=4, max_new_tokens=5, lr=0.05, tol=0.0, batch_queries=5, progress=False)


def test_a_jobs_result_does_not_depend_on_its_neighbours(tiny, tmp_path):
    """Same seed, same σ (fp32, rtol 1e-4) whether a job runs alone or among others with slots=3 and a token
    budget that lets only two jobs' minibatches into a step (so jobs wait for slots and for steps)."""
    together_steps = []
    jobs = _jobs()
    reports = fastsoft.compress(
        jobs,
        tiny,
        tmp_path / "together",
        slots=3,
        token_budget=250,
        on_step=lambda runs: together_steps.append([r.job.id for r in runs]),
        **SMALL,
    )
    assert all("error" not in r for r in reports)
    assert max(len(s) for s in together_steps) == 2  # the budget never lets a third job in: jobs waited
    assert "job3" not in together_steps[0]  # the fourth job waited for a slot
    for job, report in zip(jobs, reports):
        alone = fastsoft.compress([job], tiny, tmp_path / f"alone-{job.id}", slots=1, **SMALL)[0]
        a = load_prompt(tmp_path / "together" / job.id)[0]
        b = load_prompt(tmp_path / f"alone-{job.id}" / job.id)[0]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert report["losses"] == pytest.approx(alone["losses"], rel=1e-4, abs=1e-6)


def test_a_waiting_job_starts_only_when_a_slot_frees(tiny, tmp_path):
    log = []
    jobs = _jobs()[:3]
    fastsoft.compress(jobs, tiny, tmp_path, slots=2, on_step=lambda runs: log.append([r.job.id for r in runs]), **SMALL)
    first = {j.id: next(i for i, s in enumerate(log) if j.id in s) for j in jobs}
    last = {j.id: max(i for i, s in enumerate(log) if j.id in s) for j in jobs}
    assert first["job0"] == first["job1"] == 0
    assert first["job2"] > min(last["job0"], last["job1"])  # it waited for a slot to free


def test_only_sigma_trains_and_loss_falls(tiny, tiny_job, tmp_path):
    report = fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)[0]
    assert all(not p.requires_grad and p.grad is None for p in tiny.model.parameters())
    assert report["steps"] == 12 and report["stop_reason"] == "step budget"
    losses = report["losses"]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    for key in (
        "kl_soft",
        "kl_none",
        "gap_closed",
        "top1_agreement",
        "exact_match",
        "rouge_l",
        "compression_ratio",
        "seconds",
    ):
        assert key in report
    assert report["kl_soft"] < report["kl_none"]
    assert report["compression_ratio"] == report["context_tokens"] / 4
    folder = tmp_path / tiny_job.id
    assert {"adapter_model.safetensors", "adapter_config.json", "fastsoft.json", "report.json", "loss.png"} <= {
        p.name for p in folder.iterdir()
    }


def test_seeded_runs_are_reproducible(tiny, tiny_job, tmp_path):
    a = fastsoft.compress([tiny_job], tiny, tmp_path / "a", seed=3, init="random", **TRAIN)[0]
    b = fastsoft.compress([tiny_job], tiny, tmp_path / "b", seed=3, init="random", **TRAIN)[0]
    fastsoft.compress([tiny_job], tiny, tmp_path / "c", seed=4, init="random", **TRAIN)[0]
    pa, pb, pc = (load_prompt(tmp_path / x / tiny_job.id)[0] for x in "abc")
    assert torch.equal(pa, pb) and a["losses"] == b["losses"]
    assert not torch.equal(pa, pc)


def test_shared_prefix_on_and_off_train_the_same(tiny, tiny_job, tmp_path):
    """The switch changes only rounding: the same per-step losses and held-out metrics."""
    on = fastsoft.compress([tiny_job], tiny, tmp_path / "on", **TRAIN)[0]
    off = fastsoft.compress([tiny_job], tiny, tmp_path / "off", share_prefix=False, **TRAIN)[0]
    assert on["losses"] == pytest.approx(off["losses"], rel=1e-4, abs=1e-6)
    assert on["gap_closed"] == pytest.approx(off["gap_closed"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "objective,teacher", [("answer", "dense"), ("kl:0.5,answer:0.5", "topk"), ("kl", "sampled"), ("kl", "hidden")]
)
def test_objectives_and_teacher_kinds_train(tiny, tiny_job, tmp_path, objective, teacher):
    report = fastsoft.compress([tiny_job], tiny, tmp_path, objective=objective, teacher=teacher, **TRAIN)[0]
    assert report["losses"][-1] < report["losses"][0]


def test_supervised_needs_answers(tiny, tiny_job, tmp_path):
    with pytest.raises(fastsoft.FastsoftError, match="no answers"):
        fastsoft.compress([tiny_job], tiny, tmp_path, objective="supervised", **TRAIN)
    tiny_job.answers = ["teal", "Odile Varsk", "seventeen", "spring", "Comet"]
    report = fastsoft.compress([tiny_job], tiny, tmp_path, objective="supervised", **TRAIN)[0]
    assert report["losses"][-1] < report["losses"][0]


def test_convergence_stops_early(tiny, tiny_job, tmp_path):
    report = fastsoft.compress([tiny_job], tiny, tmp_path, **{**TRAIN, "tol": 1e9, "patience": 2})[0]
    assert report["steps"] == 2 and report["stop_reason"] == "converged"


def test_several_jobs_share_slots_and_a_failing_job_does_not_stop_the_others(tiny, tiny_job, tmp_path):
    short = fastsoft.Job("short", "tiny", ["What?"])
    other = fastsoft.Job("other", tiny_job.context[::-1], tiny_job.queries, eval_queries=["Which?"])
    reports = fastsoft.compress([tiny_job, short, other], tiny, tmp_path, slots=2, **TRAIN)
    assert [r["job_id"] for r in reports] == ["velmora", "short", "other"]
    assert "larger than the context" in reports[1]["error"]
    assert reports[0]["steps"] == reports[2]["steps"] == 12
    assert (tmp_path / "short" / "error.json").exists()


def test_finished_exports_are_kept_and_never_overwritten_by_another_job(tiny, tiny_job, tmp_path):
    first = fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)[0]
    written = (tmp_path / tiny_job.id / "adapter_model.safetensors").stat().st_mtime_ns
    again = fastsoft.compress([tiny_job], tiny, tmp_path, **TRAIN)[0]  # the same job and settings: kept as it is
    assert again["losses"] == first["losses"]
    assert (tmp_path / tiny_job.id / "adapter_model.safetensors").stat().st_mtime_ns == written
    changed = Job(tiny_job.id, tiny_job.context + " It rains.", tiny_job.queries, eval_queries=tiny_job.eval_queries)
    with pytest.raises(fastsoft.FastsoftError, match="another job or other settings; pass --overwrite"):
        fastsoft.compress([changed], tiny, tmp_path, **TRAIN)
    with pytest.raises(fastsoft.FastsoftError, match="another job or other settings; pass --overwrite"):
        fastsoft.compress([tiny_job], tiny, tmp_path, **{**TRAIN, "lr": TRAIN.get("lr", 0.05) * 2})
    fastsoft.compress([changed], tiny, tmp_path, overwrite=True, **TRAIN)


def test_training_queries_that_are_also_held_out_or_repeated_are_dropped_and_said(tiny, tiny_job, tmp_path, capsys):
    queries = [*tiny_job.queries, "who is  the MAYOR?", tiny_job.eval_queries[0]]  # a repeat, a held-out query
    job = Job(tiny_job.id, tiny_job.context, queries, eval_queries=tiny_job.eval_queries)
    report = fastsoft.compress([job], tiny, tmp_path, **TRAIN)[0]
    assert report["queries"] == {"train": len(tiny_job.queries), "eval": len(tiny_job.eval_queries)}
    assert report["dropped_queries"] == {"duplicate_queries": 1, "held_out_overlap": 1, "duplicate_eval_queries": 0}
    lines = [line for line in capsys.readouterr().err.splitlines() if "dropped" in line]
    assert len(lines) == 1 and "also held-out eval queries" in lines[0]
    with pytest.raises(fastsoft.FastsoftError, match="left once the 2 that are also eval queries are dropped"):
        only_held_out = Job("held", tiny_job.context, tiny_job.eval_queries, eval_queries=tiny_job.eval_queries)
        fastsoft.compress([only_held_out], tiny, tmp_path / "held", synthesize=0, topic_queries=0, **TRAIN)
