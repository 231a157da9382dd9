"""The run's folders on a shared cluster: no code from a checkpoint, one run per folder, damaged caches and exports,
job ids that would collide with the run's own files, read-only and full disks, leftovers of killed writers."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastsoft
from fastsoft.io.export import load_prompt

ROOT = Path(__file__).resolve().parents[2]
FAST = dict(steps=10, prompt_length=4, max_new_tokens=4, lr=0.05, tol=0.0, batch_queries=3, slots=2, progress=False)


def make_jobs(context: str, count: int = 3) -> list[fastsoft.Job]:
    words = context.split()
    queries = ["What colour?", "Who is it?", "How many?", "When?"]
    return [
        fastsoft.Job(f"job{i}", " ".join(words[i:] + words[:i]), queries, eval_queries=["Which one?"])
        for i in range(count)
    ]


def write_jobs(path: Path, jobs: list[fastsoft.Job]) -> Path:
    lines = [json.dumps({"id": j.id, "context": j.context, "queries": j.queries}) for j in jobs]
    path.write_text("\n".join(lines) + "\n")
    return path


def prompts(out: Path) -> dict[str, torch.Tensor]:
    return {p.parent.name: load_prompt(p.parent)[0] for p in sorted(out.glob("*/report.json"))}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastsoft", *args], capture_output=True, text=True, timeout=timeout)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error sentence of a refused run (exit 2, no traceback), or an empty string."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastsoft: error:")]
    return errors[0] if proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr else ""


class Payload:
    """What an attacker plants: unpickling it runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- 1. no code runs from a checkpoint --------------------------------------------------------------------


def test_a_planted_checkpoint_never_runs_code(tiny, tiny_job, tmp_path):
    fastsoft.compress(make_jobs(tiny_job.context), tiny, tmp_path, **FAST)
    marker = tmp_path / "pwned"
    for name in ("checkpoint.pt", "checkpoint.safetensors"):  # the old name and the current one
        (tmp_path / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(fastsoft.FastsoftError, match="damaged or not a fastsoft checkpoint"):
        fastsoft.compress(make_jobs(tiny_job.context), tiny, tmp_path, resume=True, **FAST)
    assert not marker.exists()


# -- 2. one run per folder ---------------------------------------------------------------------------------


def test_a_second_run_into_a_busy_folder_is_refused_and_a_dead_runs_lock_does_not_block(
    tiny_model_dir, tiny_job, tmp_path
):
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", make_jobs(tiny_job.context))
    out = tmp_path / "out"
    common = [
        "--model",
        str(tiny_model_dir),
        "--no-progress",
        "--prompt-length",
        "4",
        "--max-new-tokens",
        "4",
        "--tol",
        "0",
    ]
    run = [
        "compress",
        "--jobs",
        str(jobs_file),
        "--out",
        str(out),
        "--steps",
        "300",
        "--checkpoint-every",
        "1",
        *common,
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "fastsoft", *run], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.safetensors").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()
        second = cli("compress", "--jobs", str(jobs_file), "--out", str(out), "--steps", "3", *common)
        assert second.returncode == 2
        assert _error_line(second) and f"pid {first.pid}" in second.stderr and "in use" in second.stderr
        other_out = cli("compress", "--jobs", str(jobs_file), "--out", str(tmp_path / "b"), "--cache", str(out / "cache"),
                        "--steps", "3", *common)  # fmt: skip
        assert other_out.returncode == 2 and "teacher cache folder" in _error_line(other_out)
    finally:
        first.kill()  # SIGKILL: its lock goes with it
        first.wait()
    assert (out / ".fastsoft.lock").exists()  # left behind by the killed run, and not in the way:
    resumed = cli(*run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.parent.name for p in out.glob("*/report.json")) == ["job0", "job1", "job2"]


# -- 3. preemption ----------------------------------------------------------------------------------------


def test_sigterm_checkpoints_and_resume_ends_with_the_prompts_of_an_uninterrupted_run(
    tiny_model_dir, tiny_job, tmp_path
):
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", make_jobs(tiny_job.context))
    flags = ["--model", str(tiny_model_dir), "--no-progress", "--prompt-length", "4", "--max-new-tokens", "4", "--tol", "0",
             "--steps", "60", "--checkpoint-every", "5"]  # fmt: skip
    assert cli("compress", "--jobs", str(jobs_file), "--out", str(tmp_path / "ref"), *flags).returncode == 0
    out = tmp_path / "run"
    run = ["compress", "--jobs", str(jobs_file), "--out", str(out), *flags]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsoft", *run], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (out / "checkpoint.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated (SIGTERM); checkpoint saved, continue with --resume" in stderr, stderr
    assert len(list(out.glob("*/report.json"))) < 3  # it was stopped part way
    resumed = cli(*run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    reference = prompts(tmp_path / "ref")
    got = prompts(out)
    assert got.keys() == reference.keys() == {"job0", "job1", "job2"}
    for name in reference:
        assert torch.equal(got[name], reference[name]), name


# -- 4. and 5. damaged caches -----------------------------------------------------------------------------


def _interrupted_run(tiny, jobs, out, after_steps: int):
    calls = {"n": 0}

    def stop(runs):
        calls["n"] += 1
        if calls["n"] == after_steps:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fastsoft.compress(jobs, tiny, out, on_step=stop, **FAST)


@pytest.mark.parametrize("damage", ["flipped bytes", "edited fingerprint"])
def test_rebuild_cache_after_a_bad_cache_reteaches_and_resumes(tiny, tiny_job, tmp_path, damage):
    jobs = make_jobs(tiny_job.context)
    reference = fastsoft.compress(jobs, tiny, tmp_path / "ref", **FAST)
    out = tmp_path / "run"
    _interrupted_run(tiny, jobs, out, after_steps=4)
    if damage == "flipped bytes":
        shard = out / "cache" / "job0.safetensors"
        data = bytearray(shard.read_bytes())
        data[-20:] = bytes(255 - b for b in data[-20:])
        shard.write_bytes(bytes(data))
    else:
        index = json.loads((out / "cache" / "index.json").read_text())
        index["fingerprint"]["template"] = "edited"
        (out / "cache" / "index.json").write_text(json.dumps(index))
    with pytest.raises(fastsoft.FastsoftError, match="--rebuild-cache"):
        fastsoft.compress(jobs, tiny, out, resume=True, **FAST)
    resumed = fastsoft.compress(jobs, tiny, out, resume=True, rebuild_cache=True, **FAST)
    assert all("error" not in r for r in resumed)
    for got, want in zip(resumed, reference):  # the re-taught teacher is the same teacher
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-4, abs=1e-6)
    again = fastsoft.compress(jobs, tiny, out, resume=True, **FAST)  # and the folder stays resumable
    assert [r["job_id"] for r in again] == [j.id for j in jobs]


@pytest.mark.parametrize(
    "index", ["[]", '{"version": 1, "fingerprint": {}, "jobs": {"job0": {"file": "job0.safetensors"}}}']
)
def test_a_malformed_cache_index_is_refused_as_corrupted(tiny, tiny_job, tmp_path, index):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".fastsoft-cache").write_text("{}")  # a fastsoft cache (its marker) whose index is damaged
    (tmp_path / "cache" / "index.json").write_text(index)
    with pytest.raises(fastsoft.FastsoftError, match="index .* is corrupted.*--rebuild-cache"):
        fastsoft.compress(make_jobs(tiny_job.context, 1), tiny, tmp_path, **FAST)
    assert (
        fastsoft.compress(make_jobs(tiny_job.context, 1), tiny, tmp_path, rebuild_cache=True, **FAST)[0]["steps"] == 10
    )


# -- 6. job ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job_id",
    ["cache", "checkpoint.safetensors", "checkpoint-rank1.safetensors", "summary.json", "x" * 300, "a\x00b", "a\nb"],
)
def test_job_ids_that_cannot_be_a_folder_of_their_own_are_refused_up_front(tiny_job, tmp_path, job_id):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(json.dumps({"id": job_id, "context": tiny_job.context, "queries": ["Who?"]}) + "\n")
    got = cli(
        "compress", "--jobs", str(jobs_file), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-model")
    )
    assert got.returncode == 2 and got.stderr.count("\n") == 1 and "job id" in got.stderr, got.stderr
    assert "Traceback" not in got.stderr and not (tmp_path / "out").exists()  # refused before anything was written


# -- 7. the output folder itself -------------------------------------------------------------------------


def test_out_naming_a_file_is_one_sentence(tiny_model_dir, tiny_job, tmp_path):
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", make_jobs(tiny_job.context, 1))
    (tmp_path / "file").write_text("mine")
    got = cli("compress", "--jobs", str(jobs_file), "--out", str(tmp_path / "file"), "--model", str(tiny_model_dir))
    assert got.returncode == 2 and "--out" in got.stderr and "is a file" in got.stderr and "Traceback" not in got.stderr
    assert (tmp_path / "file").read_text() == "mine"


def _fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its file system is full."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: closing it flushes nothing more
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def _full_disk_then_resume(tiny, jobs, out: Path, reference: dict, make_full, make_room):
    """Fill the disk at the 6th step; the run must stop with one sentence, leave no half-written export, and
    finish after room is made, with the prompts of an uninterrupted run."""
    calls = {"n": 0}

    def at_step(runs):
        calls["n"] += 1
        if calls["n"] == 6:
            make_full()

    with pytest.raises(fastsoft.FastsoftError, match="(?i)no space left on device.*--resume") as refused:
        fastsoft.compress(jobs, tiny, out, on_step=at_step, checkpoint_every=2, **FAST)
    assert calls["n"] == 6, refused.value  # the disk filled where the test filled it
    for folder in out.iterdir():
        if folder.is_dir() and folder.name != "cache":
            for name in ("adapter_config.json", "adapter_model.safetensors", "fastsoft.json", "report.json"):
                assert not (folder / name).exists() or (folder / name).stat().st_size > 0
    make_room()
    resumed = fastsoft.compress(jobs, tiny, out, resume=True, **FAST)
    assert all("error" not in r for r in resumed)
    got = prompts(out)
    assert got.keys() == reference.keys()
    for name, prompt in reference.items():
        assert torch.equal(got[name], prompt), name


def test_a_full_disk_stops_with_one_sentence_and_resumes_after_room_is_made_simulated(
    tiny, tiny_job, tmp_path, monkeypatch
):
    """ENOSPC from every write once the disk is 'full' (the write helper every file goes through)."""
    import fastsoft.io.atomic as atomic

    jobs = make_jobs(tiny_job.context)
    fastsoft.compress(jobs, tiny, tmp_path / "ref", **FAST)
    full = {"on": False}
    real_fsync = os.fsync

    def fsync(fd):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    _full_disk_then_resume(tiny, jobs, tmp_path / "run", prompts(tmp_path / "ref"),
                           lambda: full.update(on=True), lambda: full.update(on=False))  # fmt: skip


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def tmpfs(tmp_path):
    folder = tmp_path / "tmpfs"
    if os.geteuid() != 0 or shutil.which("mount") is None or not _mount_tmpfs(folder, "8m"):
        pytest.skip(
            "this machine does not let the tests mount a tmpfs; the simulated full-disk test covers the same path"
        )
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_stops_with_one_sentence_and_resumes_after_room_is_made_on_a_tmpfs(tiny, tiny_job, tmp_path, tmpfs):
    jobs = make_jobs(tiny_job.context)
    fastsoft.compress(jobs, tiny, tmp_path / "ref", **FAST)
    filler = {}
    _full_disk_then_resume(tiny, jobs, tmpfs / "run", prompts(tmp_path / "ref"),
                           lambda: filler.update(path=_fill(tmpfs)), lambda: filler["path"].unlink())  # fmt: skip


def test_a_read_only_out_is_one_sentence(tiny_model_dir, tiny_job, tmp_path, tmpfs):
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", make_jobs(tiny_job.context, 1))
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    got = cli("compress", "--jobs", str(jobs_file), "--out", str(tmpfs / "out"), "--model", str(tiny_model_dir))
    assert got.returncode == 2 and got.stderr.count("\n") == 1 and "--out" in got.stderr, got.stderr


# -- 8. generate on a damaged export ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["fastsoft.json", "adapter_model.safetensors"])
def test_generate_names_the_damaged_file(tiny, tiny_model_dir, tiny_job, tmp_path, damage):
    fastsoft.compress(make_jobs(tiny_job.context, 1), tiny, tmp_path, **FAST)
    path = tmp_path / "job0" / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    got = cli("generate", "--prompt", str(tmp_path / "job0"), "--query", "Who?", "--model", str(tiny_model_dir))
    assert got.returncode == 2 and str(path) in got.stderr and "damaged" in got.stderr and "Traceback" not in got.stderr


# -- 9. leftovers -------------------------------------------------------------------------------------------------


def test_leftovers_of_dead_writers_are_removed_when_a_run_starts(tiny, tiny_job, tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    leftovers = [tmp_path / f".checkpoint.safetensors.tmp{dead}", tmp_path / "job0" / f".report.json.tmp{dead}",
                 tmp_path / "cache" / f".job0.safetensors.tmp{dead}"]  # fmt: skip
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    fastsoft.compress(make_jobs(tiny_job.context, 1), tiny, tmp_path, **FAST)
    assert not [p for p in leftovers if p.exists()]
    assert not list(tmp_path.rglob("*.tmp*"))


def test_a_job_that_fails_under_overwrite_leaves_only_its_error(tiny, tiny_job, tmp_path):
    job = make_jobs(tiny_job.context, 1)[0]
    fastsoft.compress([job], tiny, tmp_path, **FAST)
    assert (tmp_path / "job0" / "report.json").exists()
    short = fastsoft.Job("job0", "teal", job.queries)  # the same id, a new context, shorter than the prompt: it fails
    (report,) = fastsoft.compress([short], tiny, tmp_path, overwrite=True, **FAST)
    assert "prompt length 4 is larger than the context" in report["error"] and "--prompt-length" in report["error"]
    assert (tmp_path / "job0" / "error.json").exists() and not (tmp_path / "job0" / "report.json").exists()


def test_a_changed_job_under_the_same_id_is_taught_again(tiny, tiny_job, tmp_path):
    """The cache is keyed by the job's content, not only its id: a new context never trains on the old teacher."""
    first, second = make_jobs(tiny_job.context, 2)
    (a,) = fastsoft.compress([first], tiny, tmp_path / "a", cache=tmp_path / "cache", **FAST)
    renamed = fastsoft.Job("job0", second.context, second.queries, eval_queries=second.eval_queries)
    (b,) = fastsoft.compress([renamed], tiny, tmp_path / "b", cache=tmp_path / "cache", **FAST)
    (c,) = fastsoft.compress([renamed], tiny, tmp_path / "c", **FAST)  # the same, with a fresh cache
    assert b["losses"] == c["losses"] != a["losses"]
