"""The benchmarks' CPU smoke variants run and write their results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_e2e_cpu_small_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "benchmarks" / "bench_e2e.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = bench
    spec.loader.exec_module(bench)
    assert bench.main(["--cpu-small", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("e2e-*.json")
    result = json.loads(path.read_text())
    assert result["variant"] == "cpu-small" and result["device"]
    teacher = result["teacher"]
    assert {"context_tokens", "queries", "rows", "speedup", "target"} <= set(teacher)
    assert {r["method"] for r in teacher["rows"]} >= {"naive per query", "fastsoft shared context"}
    assert all(r["seconds"] > 0 for r in teacher["rows"])
    assert teacher["max_abs_diff"] < 1e-3  # the same hidden states as the naive teacher (fp32)
    training = result["training"]
    assert {"rows", "speedup", "target", "curves"} <= set(training)
    methods = {r["method"] for r in training["rows"]}
    assert "fastsoft, 1 job" in methods and "peft prompt tuning" in methods
    assert all(r["scored_tokens_per_s"] > 0 for r in training["rows"])
    curves = training["curves"]
    assert len(curves["fastsoft, 1 job"]) == len(curves["peft prompt tuning"]) > 1
    # same data, same batches, same init, same Adam: the two losses follow the same trajectory
    assert curves["fastsoft, 1 job"] == pytest.approx(curves["peft prompt tuning"], rel=1e-3)
    assert path.with_suffix(".png").exists()
