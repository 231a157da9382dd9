"""torchrun with 2 CPU ranks (gloo): the same soft prompts as one process, jobs sharded or split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastsoft.cli import main
from fastsoft.io.export import load_prompt

FLAGS = [
    "--steps",
    "6",
    "--prompt-length",
    "4",
    "--max-new-tokens",
    "4",
    "--lr",
    "0.05",
    "--tol",
    "0",
    "--batch-queries",
    "4",
    "--slots",
    "2",
    "--no-progress",
]


def write_jobs(path, context, count):
    queries = ["What colour?", "Who is it?", "How many?", "When?", "Where?"]
    lines = [
        json.dumps({"id": f"job{i}", "context": context[i:], "queries": queries, "eval_queries": ["Which?"]})
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def torchrun(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "fastsoft",
        *args,
    ]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("count,mode", [(3, "sharded"), (1, "split")])
def test_two_ranks_give_the_same_prompts_as_one_process(tiny_model_dir, tiny_job, tmp_path, count, mode):
    jobs = write_jobs(tmp_path / "jobs.jsonl", tiny_job.context, count)
    common = ["compress", "--jobs", str(jobs), "--model", str(tiny_model_dir), *FLAGS]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    torchrun([*common, "--out", str(tmp_path / "two")], cwd=tmp_path)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["done"] == count
    for i in range(count):
        one, two = load_prompt(tmp_path / "one" / f"job{i}")[0], load_prompt(tmp_path / "two" / f"job{i}")[0]
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-6)
        assert json.loads((tmp_path / "two" / f"job{i}" / "report.json").read_text())["steps"] == 6
    if mode == "split":  # each rank kept its own cache shard; rank 0 alone exported
        assert (tmp_path / "two" / "cache" / "rank1" / "job0.safetensors").exists()
