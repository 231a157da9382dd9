"""The maintained benchmarks' quick runs through the one entry point (``benchmarks/run.py --quick``), each writing
its raw JSON, its rows of the results table and its figure into a temporary results folder (never the repository's);
the table's merge rule and the plotting script's round trip. Smoke tests: the code runs and writes sane rows; no
timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def entry():
    return _module("run")


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(BENCHMARKS))
    import common

    return common


def _quick(entry, common, name: str, results: Path, *extra: str) -> list[dict]:
    """``run.py NAME --quick`` into ``results``: exit 0, and the benchmark's rows of the table, each one sane; its
    figure and the raw JSON the rows name beside the table."""
    assert entry.main([name, "--quick", "--device", "cpu", "--results", str(results), *extra]) == 0
    rows = [r for r in common.read_table(results / common.TABLE) if r["benchmark"] == name]
    assert rows, f"{name} wrote no rows"
    device = common.device_name("cpu")
    for r in rows:  # the commit: HEAD when the run began (40 hex digits; empty outside git)
        assert r["device"] == device and r["quick"] is True and len(r["commit"]) in (0, 40), r
        assert math.isfinite(r["value"]) and isinstance(r["unit"], str) and r["case"] and r["provider"], r
        assert r["q20"] is None or r["q20"] <= r["value"] <= r["q80"], r
        assert (results / r["source"]).is_file(), r
    keys = [common.key(r) for r in rows]
    assert len(keys) == len(set(keys))  # one row a key
    assert (results / f"{name}-{common.file_tag(device, 'quick')}.png").is_file()
    return rows


def test_run_lists_every_maintained_benchmark(entry, capsys):
    assert entry.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert set(entry.BENCHMARKS) == set("softmax_kl frozen_linear layers e2e student eval_memory compress".split())
    for name, bench in entry.BENCHMARKS.items():
        assert name in listed and (BENCHMARKS / f"{bench.module}.py").is_file()
        assert callable(entry.load(name).run)
    with pytest.raises(SystemExit) as refused:
        entry.main(["no_such_benchmark", "--quick"])
    assert refused.value.code == 2
    with pytest.raises(SystemExit) as refused:
        entry.main(["student", "--device", "cuda"])  # a CPU benchmark
    assert refused.value.code == 2


def test_no_retired_study_is_left():
    """The one-off studies retired (their results stay in benchmarks/results/): no script of theirs, nothing that
    imports one, nothing that probes an old checkout's signatures."""
    for retired in ("bench_rounding", "bench_command1", "bench_curves", "bench_selfstudy"):
        assert not (BENCHMARKS / f"{retired}.py").exists()
        for path in BENCHMARKS.glob("*.py"):
            assert f"import {retired}" not in path.read_text(), path
    assert "inspect.signature" not in (BENCHMARKS / "bench_student.py").read_text()
    assert list((BENCHMARKS / "results").glob("rounding-*.json")) and list((BENCHMARKS / "results").glob("curves-*"))


def test_layers_quick_compares_each_fused_op_with_the_formula(entry, common, tmp_path):
    rows = _quick(entry, common, "layers", tmp_path, "--same-process")
    times = [r for r in rows if r["metric"] == "time"]
    cases = {r["case"] for r in times}
    assert {c.split(":")[0] for c in cases} == {"rms_norm", "swiglu", "rope"}
    assert {c.rsplit(", ", 1)[1] for c in cases} == {"fwd", "fwd+bwd"}
    assert all(r["unit"] == "ms" and r["value"] > 0 and r["q20"] is not None for r in times)
    for case in cases:  # both sides of every case, and their ratio
        by = {r["provider"]: r["value"] for r in times if r["case"] == case}
        assert set(by) == {"fused (C++)", "transformers formula"}
        (speedup,) = [r["value"] for r in rows if r["case"] == case and r["metric"] == "speed-up"]
        assert speedup == pytest.approx(by["transformers formula"] / by["fused (C++)"], rel=1e-4)


def test_softmax_kl_quick(entry, common, tmp_path):
    rows = _quick(entry, common, "softmax_kl", tmp_path)
    providers = {r["provider"] for r in rows if r["metric"] == "fwd+bwd time"}
    assert {"floor (2 GEMMs)", "torch eager", "fastsoft reference", "fastsoft cpp"} <= providers
    assert all(r["value"] >= 0 for r in rows if r["metric"] == "peak extra memory")


def test_frozen_linear_quick(entry, common, tmp_path):
    rows = _quick(entry, common, "frozen_linear", tmp_path)
    assert {r["provider"] for r in rows if r["metric"] == "fwd+bwd time"} == {
        "torch linear (MKL)",
        "frozen_linear (oneDNN, packed)",
    }
    assert {r["case"].split()[0] for r in rows} >= {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def test_e2e_quick(entry, common, tmp_path):
    rows = _quick(entry, common, "e2e", tmp_path)
    assert {r["metric"] for r in rows} >= {"time", "scored tokens a second", "speed-up over PEFT"}
    (path,) = tmp_path.glob("e2e-*-cpu-small.json")
    result = json.loads(path.read_text())
    assert result["variant"] == "cpu-small" and result["device"]
    teacher = result["teacher"]
    assert {r["method"] for r in teacher["rows"]} >= {"naive per query", "fastsoft shared context"}
    assert all(r["seconds"] > 0 for r in teacher["rows"])
    assert teacher["max_abs_diff"] < 1e-3  # the same hidden states as the naive teacher (fp32)
    training = result["training"]
    methods = {r["method"] for r in training["rows"]}
    assert "fastsoft, 1 job" in methods and "peft prompt tuning" in methods
    curves = training["curves"]
    assert len(curves["fastsoft, 1 job"]) == len(curves["peft prompt tuning"]) > 1
    # same data, same batches, same init, same Adam: the two losses follow the same trajectory
    assert curves["fastsoft, 1 job"] == pytest.approx(curves["peft prompt tuning"], rel=1e-3)


def test_student_quick(entry, common, tmp_path):
    """fastsoft's student step (with and without the shared prefix) and PEFT prompt tuning on the tiny model: both
    trained, timed and evaluated."""
    rows = _quick(entry, common, "student", tmp_path)
    methods = {"fastsoft", "fastsoft, no shared prefix", "peft prompt tuning"}
    assert {r["provider"] for r in rows if r["metric"] == "seconds a step"} == methods
    (path,) = tmp_path.glob("student-*-smoke.json")
    result = json.loads(path.read_text())
    assert result["complete"] and result["steps"] == 6 and result["eval_every"] == 2
    for method in methods:
        curve = result["curves"][method]
        assert [p["step"] for p in curve] == [0, 2, 4, 6]  # step 0, then every --eval-every steps
        assert all(math.isfinite(p["gap_closed"]) for p in curve)
        assert [p["seconds"] for p in curve] == sorted(p["seconds"] for p in curve) and curve[0]["seconds"] == 0
        assert len(result["losses"][method]) == 6
    # the σ-first held-out evaluation of PEFT's σ is PEFT's own logits-based KL
    assert all(c["abs_diff"] < 1e-4 for c in result["sanity_sigma_first"].values())


def test_eval_memory_quick(entry, common, tmp_path):
    rows = _quick(entry, common, "eval_memory", tmp_path)
    peaks = {r["case"]: r["value"] for r in rows if r["metric"] == "peak RSS"}
    assert set(peaks) == {"10 held-out queries", "100 held-out queries"} and all(v > 0 for v in peaks.values())


def test_compress_quick(entry, common, tmp_path):
    """Command 1 as written (self-study: topic and model-written queries) and with the hand-written queries, each a
    ``fastsoft compress`` subprocess on the chatty tiny model."""
    rows = _quick(entry, common, "compress", tmp_path)
    assert {r["case"] for r in rows} == {"quillstore: as written", "quillstore: hand-written queries"}
    (path,) = tmp_path.glob("compress-*-quick.json")
    result = json.loads(path.read_text())
    configs = result["configs"]
    for name, entry_ in configs.items():
        assert entry_["exit_code"] == 0 and entry_["wall_seconds"] > 0 and "mismatch" not in entry_, name
        assert entry_["eval_source"] == "eval_queries" and entry_["queries"]["eval"] == 8
        assert set(entry_["stage_seconds"]) == {"synthesis", "teacher", "training"}
        assert entry_["startup_seconds"] > 0 and entry_["unstaged_seconds"] >= 0
    hand, written = configs["hand-written queries"], configs["as written"]
    assert hand["queries"]["train"] == 16 and hand["synthesis"] is None  # a job with queries: no self-study
    assert written["synthesis"]["kept"] == written["queries"]["train"] > 0


def test_table_rows_merge_by_key_and_plot_round_trip(common, tmp_path):
    """A rerun replaces its rows of the same key in place and keeps every other row (other devices, quick and full
    apart); rows without a finite value are left out; the plotting script draws each benchmark and device's figure."""
    plot = _module("plot")

    def result(device: str, commit: str) -> dict:
        checkout = {"commit": commit, "uncommitted_library_files": ["fastsoft/x.py"]}
        return {"device": device, "time": "2026-01-02 03:04:05", "checkout": checkout}

    def rows(device: str, scale: float, quick: bool, commit: str = "a" * 40) -> list[dict]:
        measured = [
            common.timing_row("rms_norm: 8 x 576, fwd", "fused (C++)", "time", [scale * t for t in (1e-3, 2e-3, 4e-3)]),
            common.row("rms_norm: 8 x 576, fwd", "transformers formula", "time", scale * 5.0, "ms"),
            common.row("rms_norm: 8 x 576, fwd", "fused over the formula", "speed-up", float("nan"), "x"),
            common.row("rope: 8 rows, fwd", "fused (C++)", "time", scale * 1.5, "ms"),
        ]
        return common.table_rows("layers", measured, result(device, commit), quick, "layers-x.json")

    table = tmp_path / common.TABLE
    first = rows("Test CPU x2", 1.0, quick=True)
    assert len(first) == 3  # the NaN speed-up is left out
    assert first[0]["q20"] <= first[0]["value"] == 2.0 <= first[0]["q80"] and first[0]["uncommitted"] == 1
    common.write_table(table, first + rows("Other GPU", 1.0, quick=False) + rows("Test CPU x2", 1.0, quick=False))
    rerun = rows("Test CPU x2", 3.0, quick=True, commit="b" * 40)[:2]  # a rerun that measured two of the three
    common.write_table(table, common.merge_rows(common.read_table(table), rerun))
    back = common.read_table(table)
    assert len(back) == 9 and [common.key(r) for r in back[:3]] == [common.key(r) for r in first]
    assert [r["value"] for r in back[:3]] == [6.0, 15.0, 1.5] and [r["commit"][0] for r in back[:3]] == ["b", "b", "a"]
    assert all(r["value"] in (2.0, 5.0, 1.5) for r in back[3:])  # the other device's and the full rows: untouched
    assert back[0]["quick"] is True and back[3]["quick"] is False and back[0]["unit"] == "ms"
    assert set(open(table).readline().strip().split(",")) == set(common.FIELDS)

    assert plot.main(["--results", str(tmp_path)]) == 0
    for name in ("layers-test-cpu-x2-quick.png", "layers-test-cpu-x2.png", "layers-other-gpu.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert plot.draw(table, "layers", "No such device", False) is None


def test_every_result_names_the_commit_it_measured(common):
    """run_info, which every benchmark's JSON starts with, records the checkout's commit (None outside git) and the
    library files changed since it."""
    info = common.run_info("cpu", "bench_x.py", ["--flag"])
    assert info["command"] == "python benchmarks/bench_x.py --flag"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert info["checkout"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(info["checkout"]["uncommitted_library_files"], list)


def test_checkout_state_names_changed_library_files_whole(common, tmp_path):
    """A modified tracked file (porcelain " M path", whose first column is a space) and a new one are named by their
    whole paths; files outside the library are not named."""

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    (tmp_path / "fastsoft").mkdir()
    (tmp_path / "fastsoft" / "engine.py").write_text("a = 1\n")
    (tmp_path / "notes.md").write_text("x\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    (tmp_path / "fastsoft" / "engine.py").write_text("a = 2\n")
    (tmp_path / "fastsoft" / "new.py").write_text("b = 1\n")
    (tmp_path / "notes.md").write_text("y\n")
    state = common.checkout_state(tmp_path)
    assert len(state["commit"]) == 40
    assert state["uncommitted_library_files"] == ["fastsoft/engine.py", "fastsoft/new.py"]
