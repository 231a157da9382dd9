"""Resuming and rerunning a run folder (issue #27): no false "done", nothing redone that was verified, the same bits.

Kills, signals and deletions at the moments that used to lose work: during exports, before the first checkpoint,
inside a report's plotting; a resume on another model; an export deleted after the run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from test_reliability import FAST, jobs, prompts, write_jobs

import fastsoft
from fastsoft.signals import Interrupted

KILL_AT_EXPORT = """
import os, sys
import fastsoft
from fastsoft.io.outputs import RunFolder
from fastsoft.data.jobs import read_jobs
write_done, calls = RunFolder.write_done, [0]
def dying(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os._exit(9)  # as SIGKILL: nothing runs after it
    return write_done(self, *args, **kwargs)
RunFolder.write_done = dying
model = fastsoft.load_model(sys.argv[1])
fastsoft.compress(read_jobs(sys.argv[2]), model, sys.argv[4], checkpoint_every=1, **{FAST})
"""


def _log(steps: list):
    return lambda runs: steps.append([r.job.id for r in runs])


def _reference(tiny, tiny_job, tmp_path):
    reference = fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "ref", **FAST)
    return reference, prompts(tmp_path / "ref")


def _same_as_reference(reports, reference, out, ref_prompts):
    assert [r.get("losses") for r in reports] == [r["losses"] for r in reference]
    got = prompts(out)
    assert got.keys() == ref_prompts.keys()
    for name, prompt in ref_prompts.items():
        assert torch.equal(got[name], prompt), name


@pytest.mark.parametrize("dies_at_export", [2, 3])
def test_killed_during_exports_with_a_checkpoint_every_step_resumes_to_the_bit(
    tiny, tiny_model_dir, tiny_job, tmp_path, dies_at_export
):
    """job0 and job1 stop in the same step; dying at job1's export (2) replayed that step without job0 (another
    packing: other rounding, seen up to 4.7e-7 on 40 jobs); dying at job2's (3), after a checkpoint of a later step,
    must lose nothing either. The resumed run runs exactly the steps the reference ran after that point."""
    ref_steps, resumed_steps = [], []
    reference = fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "ref", on_step=_log(ref_steps), **FAST)
    ref_prompts = prompts(tmp_path / "ref")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", tiny_job.context)
    script = KILL_AT_EXPORT.replace("{FAST}", repr({k: v for k, v in FAST.items()}))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model_dir), str(jobs_file), str(dies_at_export), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert len(list(out.glob("*/report.json"))) == dies_at_export - 1
    resumed = fastsoft.compress(jobs(tiny_job.context), tiny, out, resume=True, on_step=_log(resumed_steps), **FAST)
    _same_as_reference(resumed, reference, out, ref_prompts)
    assert resumed_steps == ref_steps[len(ref_steps) - len(resumed_steps) :]  # no step replayed in another packing


def test_a_deleted_export_is_compressed_again_never_reported_done(tiny, tiny_job, tmp_path):
    reference, ref_prompts = _reference(tiny, tiny_job, tmp_path)
    out = tmp_path / "ref"
    kept = (out / "job0" / "report.json").stat().st_mtime_ns
    (out / "job1" / "adapter_model.safetensors").unlink()
    resumed = fastsoft.compress(jobs(tiny_job.context), tiny, out, resume=True, **FAST)
    assert all("error" not in r for r in resumed)
    assert (out / "job0" / "report.json").stat().st_mtime_ns == kept  # verified: not redone
    again = prompts(out)["job1"]  # redone alone: equal to the lost one up to rounding (a job's neighbours differ)
    torch.testing.assert_close(again, ref_prompts["job1"], rtol=1e-4, atol=1e-6)
    # a changed export is not finished either
    (out / "job2" / "adapter_config.json").write_text("{}")
    fastsoft.compress(jobs(tiny_job.context), tiny, out, **FAST)  # a plain rerun: the same check
    assert json.loads((out / "job2" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"


def test_killed_before_any_checkpoint_or_a_report_deleted_a_rerun_continues(tiny, tiny_job, tmp_path, capsys):
    reference, ref_prompts = _reference(tiny, tiny_job, tmp_path)
    out = tmp_path / "ref"
    (out / "checkpoint.safetensors").unlink()  # as if killed before the first checkpoint
    (out / "job2" / "report.json").unlink()  # and one finished job's report lost
    stamps = {name: (out / name / "report.json").stat().st_mtime_ns for name in ("job0", "job1")}
    for resume in (True, False):  # --resume without a checkpoint, and a plain rerun: both continue
        reports = fastsoft.compress(jobs(tiny_job.context), tiny, out, resume=resume, **FAST)
        assert all("error" not in r for r in reports)
        assert {name: (out / name / "report.json").stat().st_mtime_ns for name in stamps} == stamps
        assert (out / "job2" / "report.json").exists()
        (out / "job2" / "report.json").unlink()
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_on_another_model_is_refused_before_the_cache_is_touched(tiny, tiny_job, tmp_path):
    from conftest import build_model, build_tokenizer

    from fastsoft.frozen.loading import load_model

    with pytest.raises(KeyboardInterrupt):
        fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path, on_step=_interrupt_at(4), **FAST)
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=123).save_pretrained(tmp_path / "other")  # other weights: another fingerprint
    tokenizer.save_pretrained(tmp_path / "other")
    other = load_model(tmp_path / "other")
    assert other.fingerprint != tiny.fingerprint
    shards = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    with pytest.raises(fastsoft.FastsoftError, match="another model"):
        fastsoft.compress(jobs(tiny_job.context), other, tmp_path, resume=True, rebuild_cache=True, **FAST)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == shards


def _interrupt_at(call: int):
    calls = {"n": 0}

    def on_step(runs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt

    return on_step


def test_sigterm_only_sets_a_flag_and_the_run_stops_at_its_next_safe_point(tiny, tiny_job, tmp_path, monkeypatch):
    """SIGTERM arriving while the first finished job's report is plotted (where it once broke matplotlib's import):
    that report is written whole, the run checkpoints and stops, and --resume ends as an uninterrupted run."""
    import fastsoft.io.report as report

    reference, ref_prompts = _reference(tiny, tiny_job, tmp_path)
    plot, calls = report.plot_losses, {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            signal.raise_signal(signal.SIGTERM)  # delivered now, in the middle of the report
        return plot(*args, **kwargs)

    monkeypatch.setattr(report, "plot_losses", signalled)
    with pytest.raises(Interrupted) as stopped:
        fastsoft.compress(jobs(tiny_job.context), tiny, tmp_path / "run", checkpoint_every=1000, **FAST)
    assert stopped.value.exit_status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler that was there is back
    out = tmp_path / "run"
    assert json.loads((out / "job0" / "report.json").read_text())["job_id"] == "job0"  # written whole
    assert (out / "checkpoint.safetensors").exists()
    monkeypatch.setattr(report, "plot_losses", plot)
    resumed = fastsoft.compress(jobs(tiny_job.context), tiny, out, resume=True, **FAST)
    _same_as_reference(resumed, reference, out, ref_prompts)


def test_the_cli_exits_143_on_sigterm_with_a_checkpoint_to_resume(tiny_model_dir, tiny_job, tmp_path):
    from test_reliability import cli_args

    jobs_file = write_jobs(tmp_path / "jobs.jsonl", tiny_job.context)
    out = tmp_path / "run"
    script = (
        "import os, signal, sys\n"
        "import fastsoft.pipeline.conductor as engine\n"
        "step = engine.TrainStage.step\n"
        "calls = [0]\n"
        "def signalled(self):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 4:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return step(self)\n"
        "engine.TrainStage.step = signalled\n"
        "from fastsoft.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *cli_args(jobs_file, tiny_model_dir, out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "terminated (SIGTERM); checkpoint saved, continue with --resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    from fastsoft.io.checkpoint import read_checkpoint

    assert read_checkpoint(out / "checkpoint.safetensors")["loop_steps"] == 4  # the step it was in ran whole
