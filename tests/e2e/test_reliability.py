"""Nothing lost, bad input handled: kills and resumes, Ctrl-C, OOM back-off, poisoned caches, mismatches."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastsoft
from fastsoft.frozen.loading import load_model
from fastsoft.io.checkpoint import read_checkpoint
from fastsoft.io.export import load_prompt
from fastsoft.pipeline.conductor import Engine
from fastsoft.teacher.cache import TeacherCache

FAST = dict(steps=10, prompt_length=4, max_new_tokens=4, lr=0.05, tol=0.0, batch_queries=3, slots=2, progress=False)


def jobs(context: str) -> list[fastsoft.Job]:
    words = context.split()
    return [
        fastsoft.Job(
            f"job{i}",
            " ".join(words[i:] + words[:i]),
            ["What colour?", "Who is it?", "How many?", "When?"],
            eval_queries=["Which one?"],
        )
        for i in range(3)
    ]


def write_jobs(path: Path, context: str) -> Path:
    path.write_text(
        "\n".join(
            json.dumps({"id": j.id, "context": j.context, "queries": j.queries, "eval_queries": j.eval_queries})
            for j in jobs(context)
        )
        + "\n"
    )
    return path


def prompts(out: Path) -> dict[str, torch.Tensor]:
    return {p.name: load_prompt(p)[0] for p in sorted(out.iterdir()) if (p / "report.json").exists()}


def raising_at(error, call: int):
    """An ``on_step`` callback that raises ``error`` at its ``call``-th call (1-based), the ``n``-th planned step."""
    calls = {"n": 0}

    def on_step(runs):
        calls["n"] += 1
        if calls["n"] == call:
            raise error

    return on_step


def cli_args(jobs_file: Path, model: Path, out: Path) -> list[str]:
    flags = {
        "steps": 10,
        "prompt-length": 4,
        "max-new-tokens": 4,
        "lr": 0.05,
        "tol": 0.0,
        "batch-queries": 3,
        "slots": 2,
    }
    return [
        "compress",
        "--jobs",
        str(jobs_file),
        "--model",
        str(model),
        "--out",
        str(out),
        "--no-progress",
        "--checkpoint-every",
        "1",
        *[x for k, v in flags.items() for x in (f"--{k}", str(v))],
    ]


def test_sigkill_several_times_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tiny_job, tmp_path):
    from fastsoft.cli import main

    jobs_file = write_jobs(tmp_path / "jobs.jsonl", tiny_job.context)
    assert main(cli_args(jobs_file, tiny_model_dir, tmp_path / "ref")) == 0
    out, kills, first_reports = tmp_path / "killed", 0, {}
    checkpoint = out / "checkpoint.safetensors"
    for attempt in range(12):
        argv = cli_args(jobs_file, tiny_model_dir, out) + (["--resume"] if checkpoint.exists() else [])
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastsoft", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        seen = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
        new_checkpoints, deadline = 0, time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            for report in out.glob("*/report.json"):
                first_reports.setdefault(report.parent.name, report.stat().st_mtime_ns)
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
            if stamp != seen:
                seen, new_checkpoints = stamp, new_checkpoints + 1
            if kills < 3 and new_checkpoints >= 2 + attempt:  # kill at a different point each time
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        code = proc.wait(timeout=300)
        if code == 0:
            break
        assert code == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert kills == 3 and code == 0
    ref, got = prompts(tmp_path / "ref"), prompts(out)
    assert ref.keys() == got.keys() == {"job0", "job1", "job2"}  # no job lost or skipped
    for name in ref:
        assert torch.equal(got[name], ref[name]), name  # to the bit: no step is replayed in another packing
        report = out / name / "report.json"
        assert report.stat().st_mtime_ns == first_reports.get(name, report.stat().st_mtime_ns)  # never redone
        assert (
            json.loads(report.read_text())["steps"]
            == json.loads((tmp_path / "ref" / name / "report.json").read_text())["steps"]
        )


def test_ctrl_c_checkpoints_and_resume_finishes_identically(tiny, tiny_job, tmp_path):
    reference = fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "ref", **FAST)
    interrupted = raising_at(KeyboardInterrupt, 7)
    with pytest.raises(KeyboardInterrupt):
        fastsoft.compress(
            jobs(tiny_job.context), tiny, tmp_path / "run", checkpoint_every=1000, on_step=interrupted, **FAST
        )
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    resumed = fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "run", resume=True, **FAST)
    assert [r["losses"] for r in resumed] == [r["losses"] for r in reference]
    for name, prompt in prompts(tmp_path / "ref").items():
        assert torch.equal(prompts(tmp_path / "run")[name], prompt)


def test_ctrl_c_in_the_evaluation_of_one_of_two_jobs_stopping_together_resumes_identically(
    tiny, tiny_job, tmp_path, monkeypatch
):
    """job0 and job1 spend their budget in the same step; Ctrl-C while job0 is evaluated must not give job1 a step
    more on --resume (its stop was decided with the step, before the checkpoint)."""
    import fastsoft.pipeline.finish as engine

    reference = fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "ref", **FAST)
    assert [r["steps"] for r in reference[:2]] == [10, 10]  # the premise: both stop at the end of the same step
    evaluate, calls = engine.evaluate, {"n": 0}

    def interrupted_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "run", checkpoint_every=1000, **FAST)
    resumed = fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "run", resume=True, **FAST)
    assert [r["steps"] for r in resumed] == [r["steps"] for r in reference]
    for name, prompt in prompts(tmp_path / "ref").items():
        assert torch.equal(prompts(tmp_path / "run")[name], prompt), name


@pytest.mark.parametrize("at_call", [2, 5, 8])
def test_ctrl_c_in_a_step_that_left_a_job_waiting_resumes_with_the_same_packing(tiny, tiny_job, tmp_path, at_call):
    """With room for two of three jobs a step, which jobs share a step depends on who waited; an interrupted step
    must not count as waited, or the resumed run packs other jobs together (another rounding of every loss)."""
    settings = {**FAST, "slots": 3}
    needs: list[int] = []

    def packed_tokens(runs):  # each job's minibatch in packed tokens (prompt length 4)
        for run in runs:
            rows = [run.teacher.train[q] for q in run.pending]
            needs.append(sum(len(t.before) + 4 + len(t.after) + len(t.answer) for t in rows))

    fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "probe", on_step=packed_tokens, **settings)
    need = max(needs)
    steps: list[list[str]] = []
    settings["token_budget"] = 2 * need + 8  # two minibatches a step, never three
    reference = fastsoft.compress(
        jobs(tiny_job.context),
        tiny,
        tmp_path / "ref",
        on_step=lambda runs: steps.append([r.job.id for r in runs]),
        **settings,
    )
    assert max(len(s) for s in steps) == 2 and len({tuple(s) for s in steps}) > 1  # the premise: jobs take turns
    interrupted = raising_at(KeyboardInterrupt, at_call)
    with pytest.raises(KeyboardInterrupt):
        fastsoft.compress(
            jobs(tiny_job.context), tiny, tmp_path / "run", checkpoint_every=1000, on_step=interrupted, **settings
        )
    resumed_steps: list[list[str]] = []
    resumed = fastsoft.compress(
        jobs(tiny_job.context), tiny, tmp_path / "run", resume=True,
        on_step=lambda runs: resumed_steps.append([r.job.id for r in runs]), **settings,
    )  # fmt: skip
    assert resumed_steps == steps[at_call - 1 :]  # the interrupted step again, then the rest as planned
    assert [r["losses"] for r in resumed] == [r["losses"] for r in reference]
    for name, prompt in prompts(tmp_path / "ref").items():
        assert torch.equal(prompts(tmp_path / "run")[name], prompt), name


def test_resume_refuses_other_jobs_or_settings(tiny, tiny_job, tmp_path):
    fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path, **FAST)
    with pytest.raises(fastsoft.FastsoftError, match="--lr"):
        fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path, resume=True, **{**FAST, "lr": 0.1})
    with pytest.raises(fastsoft.FastsoftError, match="jobs differ"):
        fastsoft.compress(jobs(tiny_job.context)[:2], tiny, tmp_path, resume=True, **FAST)
    # no checkpoint yet (killed before the first): --resume starts the run, as a plain rerun would
    fresh = fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "fresh", resume=True, **FAST)
    assert all("error" not in r for r in fresh)


def test_out_of_memory_lowers_the_token_budget_and_keeps_results(tiny, tiny_job, tmp_path, capsys):
    reference = fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "ref", **FAST)
    oom_once = raising_at(torch.OutOfMemoryError("CUDA out of memory (simulated)"), 3)
    got = fastsoft.compress(
        jobs(tiny_job.context), tiny, tmp_path / "oom", on_step=oom_once, **{**FAST, "token_budget": 4096}
    )
    assert "token budget lowered from 4096 to 2048" in capsys.readouterr().err
    assert [r["losses"] for r in got] == [r["losses"] for r in reference]


def test_nan_in_one_jobs_cache_leaves_the_others_running(tiny, tiny_job, tmp_path):
    all_jobs = jobs(tiny_job.context)
    engine = Engine(
        tiny, fastsoft.CompressConfig(**{k: v for k, v in FAST.items() if k != "progress"}), tmp_path, progress=False
    )
    fastsoft.compress(all_jobs[1:2], tiny, tmp_path / "probe", **FAST)
    shard = TeacherCache(
        tmp_path / "probe" / "cache", engine.teach.cache.fingerprint, engine.teach.spec.target_type
    ).get("job1")
    shard.targets.wbar[0, 3] = float("nan")  # the default teacher kind, compact
    engine.teach.cache.put(
        "job1", shard.context_ids, shard.train, shard.targets, shard.eval, digest=all_jobs[1].digest()
    )
    runs = engine.run(all_jobs)
    assert [r.state.value for r in runs] == ["done", "failed", "done"]
    assert "job 'job1'" in runs[1].error and "NaN" in runs[1].error
    assert json.loads((tmp_path / "job1" / "error.json").read_text())["job_id"] == "job1"


def test_a_context_longer_than_the_model_fails_its_job_only(tiny, tiny_job, tmp_path):
    long = fastsoft.Job("long", "teal doors " * 1500, ["What colour?"])
    reports = fastsoft.compress([long, jobs(tiny_job.context)[0]], tiny, tmp_path, **FAST)
    assert "longer than the model's maximum of 2048" in reports[0]["error"] and "error" not in reports[1]


def test_a_cache_of_another_vocabulary_is_refused_then_rebuilt(tiny, tiny_model_dir, tiny_job, tmp_path):
    from conftest import build_model

    fastsoft.compress(jobs(tiny_job.context)[:1], tiny, tmp_path / "a", cache=tmp_path / "cache", **FAST)
    bigger = tmp_path / "bigger"
    model = build_model(tiny.tokenizer)
    model.resize_token_embeddings(len(tiny.tokenizer) + 8)
    model.save_pretrained(bigger)
    tiny.tokenizer.save_pretrained(bigger)
    other = load_model(bigger)
    with pytest.raises(
        fastsoft.FastsoftError, match=f"vocabulary of {tiny.vocab_size} tokens, the model has {tiny.vocab_size + 8}"
    ):
        fastsoft.compress(jobs(tiny_job.context)[:1], other, tmp_path / "b", cache=tmp_path / "cache", **FAST)
    report = fastsoft.compress(
        jobs(tiny_job.context)[:1], other, tmp_path / "b", cache=tmp_path / "cache", rebuild_cache=True, **FAST
    )[0]
    assert "error" not in report


def test_a_corrupted_shard_is_named_then_rebuilt(tiny, tiny_job, tmp_path):
    job = jobs(tiny_job.context)[:1]
    fastsoft.compress(job, tiny, tmp_path / "a", cache=tmp_path / "cache", **FAST)
    shard = tmp_path / "cache" / "job0.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = fastsoft.compress(job, tiny, tmp_path / "b", cache=tmp_path / "cache", **FAST)[0]
    assert "job0.safetensors is truncated or corrupted" in report["error"]
    report = fastsoft.compress(job, tiny, tmp_path / "c", cache=tmp_path / "cache", rebuild_cache=True, **FAST)[0]
    assert "error" not in report


def test_duplicate_job_ids_are_refused(tiny, tiny_job, tmp_path):
    with pytest.raises(fastsoft.FastsoftError, match="repeated: velmora"):
        fastsoft.compress([tiny_job, tiny_job], tiny, tmp_path, **FAST)


def test_nan_in_the_models_teacher_outputs_fails_that_job_only(tiny, tiny_job, tmp_path):
    all_jobs = jobs(tiny_job.context)
    clean = fastsoft.compress([all_jobs[0], all_jobs[2]], tiny, tmp_path / "clean", **FAST)
    others = {
        t
        for j in (all_jobs[0], all_jobs[2])
        for text in [j.context, *j.queries, *j.eval_queries]
        for t in tiny.tokenizer.encode(text)
    }
    all_jobs[1].queries[0] = "What about the quagmire zephyr?"
    bad = next(t for t in tiny.tokenizer.encode(all_jobs[1].queries[0]) if t not in others)
    # the model itself overflows on one token that only job1 contains (as an fp16 model can)
    hook = tiny.embed.register_forward_hook(
        lambda module, args, out: out.masked_fill((args[0] == bad)[..., None], float("nan"))
    )
    try:
        reports = fastsoft.compress(all_jobs, tiny, tmp_path / "poisoned", **FAST)
    finally:
        hook.remove()
    assert "error" not in reports[0] and "error" not in reports[2]
    assert (
        reports[1]["error"]
        == "the model's outputs for job 'job1' are NaN or infinite in the teacher pass (try --dtype fp32); nothing was cached for it"
    )
    assert "job1" not in json.loads((tmp_path / "poisoned" / "cache" / "index.json").read_text())["jobs"]
    for name, report in (("job0", clean[0]), ("job2", clean[1])):  # sharing teacher batches with job1 changed nothing
        assert reports[int(name[-1])]["losses"] == pytest.approx(report["losses"], rel=1e-4, abs=1e-6)
        torch.testing.assert_close(
            prompts(tmp_path / "poisoned")[name], prompts(tmp_path / "clean")[name], rtol=1e-4, atol=1e-5
        )


def test_nan_in_the_models_student_outputs_fails_that_job_only(tiny, tiny_job, tmp_path):
    all_jobs = jobs(tiny_job.context)
    clean = fastsoft.compress([all_jobs[0], all_jobs[2]], tiny, tmp_path / "clean", **FAST)

    def overflowing(runs):  # from its 3rd step on, job1's forward pass overflows
        for run in runs:
            if run.job.id == "job1" and run.step >= 2:
                with torch.no_grad():
                    engine.train.bank.prompts[run.slot] = float("inf")

    engine = Engine(
        tiny,
        fastsoft.CompressConfig(**{k: v for k, v in FAST.items() if k != "progress"}),
        tmp_path / "poisoned",
        progress=False,
        on_step=overflowing,
    )
    runs = engine.run(all_jobs)
    assert [r.state.value for r in runs] == ["done", "failed", "done"]
    assert runs[1].error == "the loss of job 'job1' became nan at step 3"
    assert json.loads((tmp_path / "poisoned" / "job1" / "error.json").read_text())["error"] == runs[1].error
    for run, report in ((runs[0], clean[0]), (runs[2], clean[1])):  # packed with a NaN job, the others are untouched
        assert run.report["losses"] == pytest.approx(report["losses"], rel=1e-4, abs=1e-6)
        torch.testing.assert_close(
            prompts(tmp_path / "poisoned")[run.job.id], prompts(tmp_path / "clean")[run.job.id], rtol=1e-4, atol=1e-5
        )


def test_checkpoints_grow_with_the_slots_not_with_the_jobs(tiny, tiny_job, tmp_path):
    many = [
        fastsoft.Job(f"job{i}", j.context, j.queries, eval_queries=j.eval_queries)
        for i, j in enumerate(jobs(tiny_job.context) * 4)
    ]
    sizes = {}
    for count in (3, 12):
        fastsoft.compress(many[:count], tiny, tmp_path / str(count), **FAST)
        state = read_checkpoint(tmp_path / str(count) / "checkpoint.safetensors")
        assert not state["running"] and len(state["finished"]) == count
        assert all(saved["report"] is None for saved in state["finished"].values())  # the reports are on disk
        sizes[count] = (tmp_path / str(count) / "checkpoint.safetensors").stat().st_size
    assert sizes[12] - sizes[3] < 9 * 400, (
        sizes
    )  # a few hundred bytes a finished job (its outcome), no reports or RNG states
    resumed = fastsoft.compress(
        many[:12], tiny, tmp_path / "12", resume=True, **FAST
    )  # nothing left to do: reports come back from disk
    assert [r["job_id"] for r in resumed] == [j.id for j in many] and all("kl_soft" in r for r in resumed)


def test_a_checkpoint_from_before_topic_queries_resumes_only_without_them(tmp_path):
    from fastsoft.io.checkpoint import load_checkpoint, save_checkpoint

    old = fastsoft.CompressConfig().to_dict()
    del old["topic_queries"]  # written before the setting existed: those runs asked no topic questions
    save_checkpoint(tmp_path, {"jobs_digest": "d", "config": old})
    with pytest.raises(fastsoft.FastsoftError, match="--topic-queries"):
        load_checkpoint(tmp_path, "d", fastsoft.CompressConfig().to_dict())
    assert load_checkpoint(tmp_path, "d", fastsoft.CompressConfig(topic_queries=0).to_dict())["jobs_digest"] == "d"
