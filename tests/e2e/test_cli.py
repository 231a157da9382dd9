"""The command line: a full run on the tiny model, and a user's mistakes (one sentence, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastsoft.cli import main


@pytest.fixture
def files(tmp_path, tiny_job):
    (tmp_path / "ctx.txt").write_text(tiny_job.context)
    (tmp_path / "q.txt").write_text("\n".join(tiny_job.queries) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(tiny_job.eval_queries) + "\n")
    return tmp_path


FAST = ["--steps", "4", "--prompt-length", "4", "--max-new-tokens", "4", "--no-progress"]


def test_compress_then_generate(files, tiny_model_dir, capsys):
    out = files / "out"
    code = main(
        [
            "compress",
            "--context",
            str(files / "ctx.txt"),
            "--queries",
            str(files / "q.txt"),
            "--eval-queries",
            str(files / "eval.txt"),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--teacher",
            "topk",
            *FAST,
        ]
    )
    assert code == 0
    report = json.loads((out / "ctx" / "report.json").read_text())
    assert report["steps"] == 4 and report["eval_queries"] == 2 and report["teacher"] == "topk"
    assert "gap_closed" in capsys.readouterr().out  # the metrics table
    assert json.loads((out / "summary.json").read_text())["done"] == 1
    assert (
        main(
            [
                "generate",
                "--prompt",
                str(out / "ctx"),
                "--query",
                "Who is the mayor?",
                "--model",
                str(tiny_model_dir),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )


def test_jobs_file(files, tiny_model_dir, tiny_job):
    jobs = files / "jobs.jsonl"
    jobs.write_text(
        "\n".join(
            json.dumps({"id": f"j{i}", "context": tiny_job.context, "queries": tiny_job.queries}) for i in range(2)
        )
    )
    assert (
        main(
            [
                "compress",
                "--jobs",
                str(jobs),
                "--model",
                str(tiny_model_dir),
                "--out",
                str(files / "o"),
                "--slots",
                "2",
                *FAST,
            ]
        )
        == 0
    )
    assert (files / "o" / "j0" / "adapter_model.safetensors").exists() and (files / "o" / "j1" / "report.json").exists()


@pytest.mark.parametrize(
    "mistake,message",
    [
        (lambda f: ["--context", str(f / "missing.txt"), "--queries", str(f / "q.txt")], "does not exist"),
        (lambda f: ["--context", str(f / "empty.txt"), "--queries", str(f / "q.txt")], "is empty"),
        (lambda f: ["--context", str(f / "ctx.txt"), "--queries", str(f / "empty.txt")], "has no queries"),
        (
            lambda f: ["--context", str(f / "ctx.txt"), "--synthesize", "0", "--topic-queries", "0"],
            "has no queries and --synthesize and --topic-queries are 0",
        ),
        (
            lambda f: ["--context", str(f / "ctx.txt"), "--queries", str(f / "q.txt"), "--prompt-length", "0"],
            "--prompt-length must be at least 1",
        ),
        (
            lambda f: ["--context", str(f / "ctx.txt"), "--queries", str(f / "q.txt"), "--model", str(f / "no-model")],
            "does not exist",
        ),
        (
            lambda f: ["--context", str(f / "ctx.txt"), "--queries", str(f / "q.txt"), "--objective", "kld"],
            "unknown objective",
        ),
        (
            lambda f: ["--context", str(f / "ctx.txt"), "--queries", str(f / "q.txt"), "--teacher", "fuzzy"],
            "--teacher must be dense, topk, sampled, hidden or compact, got 'fuzzy'",
        ),
    ],
)
def test_user_mistakes_get_one_sentence_and_exit_2(files, tiny_model_dir, capsys, mistake, message):
    (files / "empty.txt").write_text("\n")
    argv = ["compress", *FAST, *mistake(files), "--out", str(files / "o")]
    if "--model" not in argv:
        argv += ["--model", str(tiny_model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastsoft: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_module_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastsoft",
            "compress",
            "--context",
            str(tmp_path / "none.txt"),
            "--queries",
            "x",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"fastsoft: error: context file {tmp_path / 'none.txt'} does not exist"
    )
