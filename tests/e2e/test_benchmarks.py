"""The benchmarks' CPU smoke variants run and write their results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
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


def test_bench_selfstudy_smoke_runs(chatty_model_dir, tmp_path, capsys):
    """Every configuration (topic queries among them) in its own ``fastsoft compress`` subprocess on the chatty tiny
    model, then one merged rerun that takes a finished run's report instead of running it, beside an entry stored
    before topic queries existed; a report of other settings is refused."""
    spec = importlib.util.spec_from_file_location("bench_selfstudy", ROOT / "benchmarks" / "bench_selfstudy.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_selfstudy"] = bench
    spec.loader.exec_module(bench)
    from fastsoft.teacher.topics import topic_queries

    example = ROOT / "examples" / "quillstore"
    extra = f"--model {chatty_model_dir} --steps 2 --prompt-length 4 --max-new-tokens 4 --synthesis-temperature 3 --synthesis-top-p 1"
    base = ["--context", f"{example}.txt", "--counts", "4", "--topics", "4", "--out", str(tmp_path / "out")]
    base.append(f"--extra={extra}")
    assert bench.main([*base, "--runs", str(tmp_path / "runs")]) == 0
    (path,) = (tmp_path / "out").glob("selfstudy-*-quillstore.json")
    result = json.loads(path.read_text())
    names = ["synthetic 4", "topics 4", "topics 4 + synthetic 4", "user 16", "user 16 + synthetic 4"]
    assert list(result["configs"]) == names and result["user_queries"] == 16 and result["eval_count"] == 8
    asked = len(topic_queries(Path(f"{example}.txt").read_text(), 4))
    assert asked == 4  # two topics, two questions each
    for name, entry in result["configs"].items():
        assert entry["exit_code"] == 0 and entry["wall_seconds"] > 0 and entry["reused_from"] is None, name
        assert "mismatch" not in entry, entry["mismatch"]
        assert all(
            isinstance(entry[k], float) for k in ("gap_closed", "top1_agreement", "rouge_l", "kl_soft", "kl_none")
        )
        assert entry["eval_source"] == "eval_queries" and entry["queries"]["eval"] == 8
        assert set(entry["stage_seconds"]) == {"synthesis", "teacher", "training"}
        assert entry["startup_seconds"] > 0 and entry["unstaged_seconds"] >= 0
        assert (entry["synthesis"] is None) == (entry["synthetic"] == entry["topics"] == 0)
        assert entry["topics"] == (4 if name.startswith("topics") else 0)
        assert f"--synthesize {entry['synthetic']} --topic-queries {entry['topics']}" in entry["command"]
        topics = entry["topic_queries"]
        assert topics["asked"] == (asked if entry["topics"] else 0) and 0 <= topics["kept"] <= topics["asked"]
        if entry["synthesis"]:  # the report counts topic queries and model-written ones together
            made = entry["synthesis"]["kept"] + sum(entry["synthesis"]["dropped"].values())
            assert made == entry["synthetic"] + topics["asked"], name
    assert result["configs"]["user 16"]["queries"]["train"] == 16
    mixed = result["configs"]["user 16 + synthetic 4"]
    assert mixed["queries"]["train"] == 16 + mixed["synthesis"]["kept"]
    only_topics = result["configs"]["topics 4"]
    assert only_topics["topic_queries"]["kept"] == only_topics["synthesis"]["kept"] == only_topics["queries"]["train"]
    assert only_topics["topic_queries"]["kept"] > 0
    assert result["target"]["config"] == "topics 64 + synthetic 64"  # the README's first command, not run here
    assert path.with_suffix(".png").exists()
    # an entry stored before topic queries existed: no topics field, a command without --topic-queries
    old = dict(result["configs"]["synthetic 4"])
    del old["topics"], old["topic_queries"]
    old["command"] = old["command"].replace(" --topic-queries 0", "")
    path.write_text(json.dumps({**result, "configs": {**result["configs"], "synthetic 4": old}}))
    # a second invocation merges: one configuration reused from the first run's folder, the others kept
    report = tmp_path / "runs" / "topics-4" / "quillstore" / "report.json"
    assert bench.main([*base, "--configs", "topics 4", "--reuse", f"topics 4={report}"]) == 0
    merged = json.loads(path.read_text())
    assert list(merged["configs"]) == names and len(merged["invocations"]) == 2
    reused = merged["configs"]["topics 4"]
    assert reused["reused_from"] == str(report) and reused["wall_seconds"] is None and "mismatch" not in reused
    assert reused["gap_closed"] == only_topics["gap_closed"]
    assert reused["topic_queries"] == only_topics["topic_queries"]
    assert merged["configs"]["synthetic 4"] == {"topics": 0, **old}
    assert merged["configs"]["user 16"] == result["configs"]["user 16"]
    # a reused run of another prompt length than these runs' is refused before anything runs
    other = [arg.replace("--prompt-length 4", "--prompt-length 5") for arg in base]
    with pytest.raises(SystemExit) as refused:
        bench.main([*other, "--configs", "topics 4", "--reuse", f"topics 4={report}"])
    assert refused.value.code == 2 and "prompt_length 4 (these runs: 5)" in capsys.readouterr().err
    assert json.loads(path.read_text()) == merged


def test_bench_student_smoke_runs(tiny_model_dir, tmp_path):
    """fastsoft's student step and PEFT prompt tuning on the tiny model: both trained, timed and evaluated."""
    import math

    spec = importlib.util.spec_from_file_location("bench_student", ROOT / "benchmarks" / "bench_student.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_student"] = bench
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("student-*-smoke.json")
    result = json.loads(path.read_text())
    assert result["complete"] and result["steps"] == 6 and result["eval_every"] == 2
    methods = {r["method"] for r in result["rows"]}
    assert {"fastsoft", "peft prompt tuning"} <= methods
    numbers = ("seconds_per_step", "scored_tokens_per_s", "speedup_vs_peft", "final_gap_closed", "final_loss")
    for row in result["rows"]:
        assert all(math.isfinite(row[k]) for k in numbers), row
        assert row["seconds_per_step"] > 0 and row["scored_tokens_per_s"] > 0
        assert row["peak_rss_mib"] is None or math.isfinite(row["peak_rss_mib"])
    for method in methods:
        curve = result["curves"][method]
        assert [p["step"] for p in curve] == [0, 2, 4, 6]  # step 0, then every --eval-every steps
        assert all(math.isfinite(p["gap_closed"]) for p in curve)
        assert [p["seconds"] for p in curve] == sorted(p["seconds"] for p in curve) and curve[0]["seconds"] == 0
        assert len(result["losses"][method]) == 6
    # the σ-first held-out evaluation of PEFT's σ is PEFT's own logits-based KL
    assert all(c["abs_diff"] < 1e-4 for c in result["sanity_sigma_first"].values())
    assert path.with_suffix(".png").exists()


def test_bench_rounding_smoke_runs(tiny_model_dir, tmp_path):
    """The compact and dense students and rounding twins of each, trained alike on the tiny model: their σ stay within
    rounding of each other over a few steps (they separate only over many), every number is saved, and the means
    over each teacher's runs are those runs' means."""
    import math

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_rounding", ROOT / "benchmarks" / "bench_rounding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--smoke", "--twins", "2", "--dense-twins", "1", "--model", str(tiny_model_dir), "--out", str(tmp_path)]
    assert bench.main(args) == 0
    (path,) = tmp_path.glob("rounding-*-smoke.json")
    result = json.loads(path.read_text())
    assert result["complete"] and result["steps"] == 6
    assert result["students"] == ["compact", "dense", "twin 1", "twin 2", "dense twin 1"]
    assert all(len(result["losses"][n]) == 6 for n in result["students"])
    for name, distances in result["sigma_distance"].items():
        assert len(distances) == 6 and 0 < distances[-1] < 1e-4, name  # apart by rounding, not by more
    assert all(math.isfinite(row["gap_closed"]) for row in result["final"].values())
    assert abs(result["spread"]["dense_minus_compact"]) < 1e-3
    groups, final = result["groups"], result["final"]
    assert groups["dense_runs"] == [final["dense"]["gap_closed"], final["dense twin 1"]["gap_closed"]]
    assert len(groups["compact_runs"]) == 3
    assert math.isclose(groups["dense_mean"], sum(groups["dense_runs"]) / 2)
    assert math.isclose(groups["dense_minus_compact_mean"], groups["dense_mean"] - groups["compact_mean"])
    assert 0 <= groups["standard_error"] < 1e-3  # rounding apart over 6 steps
    assert groups["ci90"][0] <= groups["dense_minus_compact_mean"] <= groups["ci90"][1]
    assert path.with_suffix(".png").exists()

    # a later run's twins start past the first run's, and --combine counts every run once
    later = tmp_path / "later"
    assert bench.main([*args[:-1], str(later), "--first-twin", "3"]) == 0
    (later_path,) = later.glob("rounding-*-smoke.json")
    assert json.loads(later_path.read_text())["students"] == ["compact", "dense", "twin 3", "twin 4", "dense twin 3"]
    assert bench.main(["--combine", str(path), str(later_path), "--smoke", "--out", str(tmp_path / "both")]) == 0
    (both,) = (tmp_path / "both").glob("rounding-*-combined.json")
    combined = json.loads(both.read_text())
    assert len(combined["groups"]["compact_runs"]) == 5 and len(combined["groups"]["dense_runs"]) == 3
    assert [c["first_twin"] for c in combined["combined_from"]] == [1, 3]
    assert bench.main(["--combine", str(path), str(path), "--smoke", "--out", str(tmp_path / "twice")]) != 0


def test_bench_rounding_equivalence_interval():
    """The dense-vs-compact verdict: Welch's interval with t quantiles (known values), inside ±0.005 only when the
    90 % interval is (two one-sided tests at 5 %)."""
    import math
    import random

    spec = importlib.util.spec_from_file_location("bench_rounding", ROOT / "benchmarks" / "bench_rounding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert abs(bench.t_quantile(0.95, 20) - 1.7247) < 2e-3 and abs(bench.t_quantile(0.975, 10) - 2.2281) < 3e-3
    rng = random.Random(0)
    compact = [0.69 + rng.gauss(0, 0.002) for _ in range(30)]
    same = bench.group_stats(compact, [0.69 + rng.gauss(0, 0.002) for _ in range(30)])
    lo, hi = same["ci90"]
    assert lo < same["dense_minus_compact_mean"] < hi and same["equivalent_within_margin"]
    half = bench.t_quantile(0.95, same["welch_df"]) * same["standard_error"]
    assert math.isclose(hi - lo, 2 * half) and same["ci95"][1] - same["ci95"][0] > hi - lo
    apart = bench.group_stats(compact, [0.70 + rng.gauss(0, 0.002) for _ in range(30)])
    assert not apart["equivalent_within_margin"]  # 0.01 apart
    noisy = bench.group_stats(compact[:3], [0.69 + rng.gauss(0, 0.01) for _ in range(3)])
    assert not noisy["equivalent_within_margin"]  # too few runs to say


def test_bench_rounding_combine_counts_each_plain_run_once(tmp_path):
    """Files 2 and 3 ran on one machine (their plain runs equal to the bit), file 1 on another: the plain runs count
    twice in all (once a machine), not once a file; twins always count."""
    spec = importlib.util.spec_from_file_location("bench_rounding", ROOT / "benchmarks" / "bench_rounding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def saved(name: str, plain: tuple[float, float], first: int) -> Path:
        final = {"compact": plain[0], "dense": plain[1], f"twin {first}": 0.70, f"dense twin {first}": 0.71}
        result = {
            "steps": 200, "model_name": "m", "teacher_kind": "compact", "perturbation": "p", "first_twin": first,
            "final": {n: {"gap_closed": g, "kl_soft": 1 - g, "final_loss": 0.3} for n, g in final.items()},
            "losses": {n: [0.5] for n in final},
            "sigma_distance": {n: [1e-7] for n in final if n != "compact"},
        }  # fmt: skip
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(result))
        return path

    files = [saved("a", (0.690, 0.692), 1), saved("b", (0.702, 0.704), 2), saved("c", (0.702, 0.704), 3)]
    groups = bench.combine(files)["groups"]
    assert sorted(groups["compact_runs"]) == [0.69, 0.70, 0.70, 0.70, 0.702]
    assert sorted(groups["dense_runs"]) == [0.692, 0.704, 0.71, 0.71, 0.71]

    # file c alone was also scored on a wider set: its plain runs, counted as b's, keep c's wide scores
    c = json.loads(files[2].read_text())
    c.update(wide_eval="more.txt", held_out_wide_queries=64)
    for n, row in c["final"].items():
        row["gap_closed_wide"] = 0.72 if n.startswith("dense") else 0.73
    files[2].write_text(json.dumps(c))
    combined = bench.combine(files)
    assert combined["held_out_wide_queries"] == 64 and combined["final"]["compact [b]"]["gap_closed_wide"] == 0.73
    assert combined["groups_wide"]["compact_runs"] == [0.73, 0.73] and len(combined["groups"]["compact_runs"]) == 5
    b = json.loads(files[1].read_text())
    files[1].write_text(json.dumps({**b, "wide_eval": "other.txt", "held_out_wide_queries": 20}))
    with pytest.raises(ValueError, match="different --wide-eval"):
        bench.combine(files)


def test_bench_rounding_wide_eval_scores_every_run_on_more_held_out_queries(tiny_model_dir, tmp_path):
    """--wide-eval: each run scored on the 8 held-out queries and the file's too, with its own groups; a file that
    repeats one of the job's queries (not held out) or holds none is refused before any model loads."""
    spec = importlib.util.spec_from_file_location("bench_rounding", ROOT / "benchmarks" / "bench_rounding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    more = tmp_path / "more.txt"
    more.write_text("Which birds nest on the island?\nWhat are the walls made of?\n\nWho flies kites?\n")
    args = ["--smoke", "--twins", "1", "--dense-twins", "1", "--model", str(tiny_model_dir), "--out", str(tmp_path)]
    assert bench.main([*args, "--wide-eval", str(more)]) == 0
    (path,) = tmp_path.glob("rounding-*-smoke.json")
    result = json.loads(path.read_text())
    assert result["held_out_wide_queries"] == 8 + 3
    final, wide = result["final"], result["groups_wide"]
    assert all(0 < row["kl_soft_wide"] and row["gap_closed_wide"] != row["gap_closed"] for row in final.values())
    assert wide["dense_runs"] == [final["dense"]["gap_closed_wide"], final["dense twin 1"]["gap_closed_wide"]]
    assert len(wide["compact_runs"]) == 2 and "ci90" in wide
    assert result["groups"]["compact_runs"] == [final["compact"]["gap_closed"], final["twin 1"]["gap_closed"]]
    train = (ROOT / "examples" / "marrowick_island.queries.txt").read_text().splitlines()[3]
    for text in (f"A new question?\n{train}\n", "\n\n"):
        more.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            bench.main([*args, "--wide-eval", str(more), "--model", str(tmp_path / "no-model-here")])
        assert exit_info.value.code == 2


def test_every_result_names_the_commit_it_measured():
    """run_info, which every benchmark's JSON starts with, records the checkout's commit (None outside git) and the
    library files changed since it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    info = common.run_info("cpu", "bench_x.py", ["--flag"])
    assert info["command"] == "python benchmarks/bench_x.py --flag"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert info["checkout"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(info["checkout"]["uncommitted_library_files"], list)


def test_checkout_state_names_changed_library_files_whole(tmp_path):
    """A modified tracked file (porcelain " M path", whose first column is a space) and a new one are named by their
    whole paths; files outside the library are not named."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

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


def test_bench_curves_reanalyses_its_saved_curves(tmp_path):
    """bench_curves recomputes where the plateau rule stops from a saved run's training losses (no model, no training):
    the committed results give the stops benchmarks/RESULTS.md quotes."""
    import shutil

    saved = shutil.copy(ROOT / "benchmarks" / "results" / "curves-amd-epyc-x2-1thread.json", tmp_path / "curves.json")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_curves.py"), "--reanalyse", str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {(r["context"], json.dumps(r["settings"])): r for r in json.loads(Path(saved).read_text())["runs"]}
    island = runs[("marrowick_island", json.dumps({"lr": 0.1, "steps": 200}))]
    quill = runs[("quillstore", json.dumps({"lr": 0.1, "steps": 200}))]
    assert island["plateau_window"] == 8 and quill["plateau_window"] == 8
    assert (island["plateau_stops"]["0.01"]["step"], island["plateau_stops"]["0.01"]["gap_closed"]) == (176, 0.699)
    assert (quill["plateau_stops"]["0.01"]["step"], quill["plateau_stops"]["0.01"]["gap_closed"]) == (144, 0.426)


def test_bench_command1_runs_a_pair(tiny_model_dir, tmp_path):
    """A baseline-then-this-checkout pair of command 1 (here both the same tree, on the tiny model): two runs with
    their seconds and held-out quality, one ratio, the plot; only into --out."""
    out = tmp_path / "out"
    extra = f"--model {tiny_model_dir} --steps 2 --prompt-length 4 --max-new-tokens 4"
    argv = ["--baseline", str(ROOT), "--pairs", "1", f"--extra={extra}", "--smoke", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_command1.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("command1-side-by-side-*.json")
    result = json.loads(path.read_text())
    assert [r["code"] for r in result["runs"]] == ["baseline", "this checkout"]
    for run in result["runs"]:
        assert run["exit_code"] == 0 and run["fastsoft_compress_seconds"] is not None
        assert 0 < run["training_seconds"] and run["prompt_length"] == 4
        assert isinstance(run["gap_closed"], float)
    assert len(result["ratio_this_over_baseline"]) == 1 and result["complete"]
    assert path.with_suffix(".png").exists()
