"""How far apart do trainings end that differ only in rounding? The compact teacher against the dense one, and
against itself perturbed at the level of fp32 rounding, on the real default model on CPU.

The default compact teacher (``w̄ = Σ q W`` and ``Σ q log q`` a token) and the dense one (all V log-probs) give the
same forward KL and gradient, exactly in real arithmetic (tested to 1e-12 in fp64); in fp32 they round differently.
Issue #11 asks that README command 1 give the same held-out ``gap_closed`` with either within 0.005. This measures
what a single 200-step run can say about that: the same job (the shipped example's 32 training queries and 8
held-out ones, as ``bench_student.py``), the same seeded minibatches of 4, init and lr schedule, trained by

- ``compact``: the default teacher;
- ``dense``: the dense teacher (its log-probs, the distribution the compact target encodes);
- ``twin k``: the compact teacher with every ``w̄`` number multiplied by ``1 + 2^-24 ε`` (``ε ~ N(0, 1)``, seed k):
  a perturbation the size of one fp32 rounding, i.e. another run of the same maths;
- ``dense twin k`` (``--dense-twins K``, none by default): the dense teacher's log-probs perturbed alike.

With twins of both, each teacher's runs give a mean held-out ``gap_closed`` and the difference of the two means
comes with its standard error and Welch intervals: the comparison that single runs, which scatter by about 0.01,
cannot make. The two are the same within 0.005 when the 90 % interval lies inside ±0.005 (the two one-sided tests
at 5 %, the usual test of equivalence).

``--wide-eval FILE`` scores every run a second time on a wider held-out set, the 8 held-out queries and FILE's (one
a line; ``benchmarks/data/marrowick_island.more_eval.txt``: 56 more, none a training query): ``gap_closed_wide``,
with its own groups and interval (``groups_wide``). Eight queries measure a σ's held-out quality coarsely; part of
the runs' scatter is which eight, and a wider set shrinks that part.

Measured, in one run (students interleaved step by step): each student's per-step loss and the relative distance of
its σ from the ``compact`` student's, and the held-out ``gap_closed`` of each at the end. The twins' spread is what
rounding alone does to a run; ``dense`` against ``compact`` is then compared with it.

    OMP_NUM_THREADS=2 python benchmarks/bench_rounding.py               # 200 steps, 3 twins: ~15 min on 2 cores
    python benchmarks/bench_rounding.py --twins 5 --dense-twins 5 --label means   # 12 runs: about 40 min
    python benchmarks/bench_rounding.py --twins 4 --dense-twins 4 --first-twin 6 --label means2   # 8 new twins
    python benchmarks/bench_rounding.py --twins 12 --dense-twins 12 --first-twin 32 \\
        --wide-eval benchmarks/data/marrowick_island.more_eval.txt --label means6   # 26 runs, also on 64 queries
    python benchmarks/bench_rounding.py --combine benchmarks/results/rounding-*-means{,2,3,4,5,6}.json --label means-all
    python benchmarks/bench_rounding.py --smoke --model DIR --out DIR   # the tiny model, seconds (tests)

Writes ``benchmarks/results/rounding-<device>[-<label>].json`` and ``.png`` (left: σ distance from ``compact``
against step, log scale; middle: each run's final held-out gap_closed by teacher, with each teacher's mean; right,
with twins of both: dense - compact's 90 and 95 % intervals against ±0.005, on each measure).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_student  # noqa: E402  (the job, its teacher, the minibatches, the fastsoft student)
import common  # noqa: E402

ULP = 2.0**-24  # fp32's relative rounding unit


def _rounded(values: torch.Tensor, seed: int) -> torch.Tensor:
    """``values * (1 + 2^-24 ε)``, ``ε ~ N(0, 1)`` from ``seed``: another rounding of the same numbers."""
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (values.double() * (1 + ULP * noise)).to(values.dtype)


def students_for(loaded, data, config, twins: int, dense_twins: int = 0, first: int = 1) -> dict:
    """``{name: FastsoftStudent}``: compact, dense, ``twins`` rounding twins of compact (``twin k``: its ``w̄``
    perturbed, seed k) and ``dense_twins`` of dense (``dense twin k``: its log-probs perturbed, seed 1000 + k), k from
    ``first`` (a later run's twins are new runs, not repeats)."""
    from fastsoft.ops import DenseTarget

    base = data["targets"]
    variants = {"compact": base, "dense": DenseTarget(data["dense"])}
    for k in range(first, first + twins):
        variants[f"twin {k}"] = dataclasses.replace(base, wbar=_rounded(base.wbar, k))
    for k in range(first, first + dense_twins):
        variants[f"dense twin {k}"] = DenseTarget(_rounded(data["dense"], 1000 + k))
    return {name: bench_student.FastsoftStudent(loaded, dict(data, targets=t), config) for name, t in variants.items()}


def group_stats(compact: list[float], dense: list[float]) -> dict:
    """Each teacher's runs (the plain run and its twins): mean and standard deviation of the held-out gap_closed,
    and the difference of the means with its standard error (Welch) — what many runs say where one cannot."""
    out = {"compact_runs": compact, "dense_runs": dense}
    for name, values in (("compact", compact), ("dense", dense)):
        out[f"{name}_mean"] = statistics.fmean(values)
        out[f"{name}_stdev"] = statistics.stdev(values) if len(values) > 1 else None
    if len(compact) > 1 and len(dense) > 1:
        diff = out["dense_minus_compact_mean"] = out["dense_mean"] - out["compact_mean"]
        a, b = out["compact_stdev"] ** 2 / len(compact), out["dense_stdev"] ** 2 / len(dense)
        se = out["standard_error"] = (a + b) ** 0.5
        df = out["welch_df"] = (a + b) ** 2 / (a**2 / (len(compact) - 1) + b**2 / (len(dense) - 1)) if se else None
        for level in (90, 95):  # the 90 % interval inside ±margin is the equivalence test (TOST) at 5 %
            half = t_quantile(0.5 + level / 200, df) * se if se else 0.0
            out[f"ci{level}"] = [diff - half, diff + half]
        out["margin"] = MARGIN
        out["equivalent_within_margin"] = -MARGIN < out["ci90"][0] and out["ci90"][1] < MARGIN
    return out


MARGIN = 0.005  # issue #11: "the same held-out gap_closed within 0.005"


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile by the Cornish-Fisher expansion around the normal one, for p <= 0.975: within 0.003 of
    the exact one from 10 degrees of freedom (0.03 at 5), enough for intervals over tens of runs; no scipy needed."""
    z = statistics.NormalDist().inv_cdf(p)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def summarise(final: dict) -> dict:
    """``groups`` and ``spread`` of the final rows by name: the dense teacher's runs are named ``dense...``, every
    other run is the compact teacher's (the plain run and its rounding twins)."""
    compact = [row["gap_closed"] for name, row in final.items() if not name.startswith("dense")]
    dense = [row["gap_closed"] for name, row in final.items() if name.startswith("dense")]
    out = {}
    wide = {n: row["gap_closed_wide"] for n, row in final.items() if "gap_closed_wide" in row}  # --wide-eval runs
    wide_compact = [g for n, g in wide.items() if not n.startswith("dense")]
    wide_dense = [g for n, g in wide.items() if n.startswith("dense")]
    if len(wide_compact) > 1 and len(wide_dense) > 1:
        out["groups_wide"] = group_stats(wide_compact, wide_dense)
    spread = {
        "compact_and_twins": compact,
        "stdev": statistics.stdev(compact) if len(compact) > 1 else None,
        "range": max(compact) - min(compact),
        "dense_minus_compact": final["dense"]["gap_closed"] - final["compact"]["gap_closed"],
    }
    return {"groups": group_stats(compact, dense), "spread": spread, **out}


def run(loaded, data, config, args, result: dict) -> None:
    from fastsoft.train.lr_schedule import lr_at

    students = students_for(loaded, data, config, args.twins, args.dense_twins, args.first_twin)
    schedule = bench_student.batches(len(data["train"]), config.batch_queries, args.steps, seed=config.seed + 3)
    T = config.temperature
    kl_none = bench_student.heldout_kl(loaded, None, data["held_out"], T)
    losses = {n: [] for n in students}
    distance = {n: [] for n in students if n != "compact"}
    seconds = {n: 0.0 for n in students}
    names = list(students)
    result.update(students=names, kl_none=kl_none, losses=losses, sigma_distance=distance, seconds=seconds)
    for step, batch in enumerate(schedule):
        lr = lr_at(step, args.steps, config.lr, config.warmup)
        for name in names if step % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            losses[name].append(students[name].step(batch, lr)[0])
            seconds[name] += time.perf_counter() - started
        ref = students["compact"].prompt()
        for name in distance:
            distance[name].append(float((students[name].prompt() - ref).norm() / ref.norm()))
        if (step + 1) % max(1, args.steps // 10) == 0:
            line = "  ".join(f"{n} {distance[n][-1]:.1e}" for n in distance)
            print(f"  step {step + 1:4d}  σ distance from compact: {line}", flush=True)
    final = {}
    wide = data.get("held_out_wide")
    kl_none_wide = bench_student.heldout_kl(loaded, None, wide, T) if wide else None
    if wide:
        result.update(kl_none_wide=kl_none_wide, held_out_wide_queries=len(wide))
    for name, student in students.items():
        kl = bench_student.heldout_kl(loaded, student.prompt(), data["held_out"], T)
        final[name] = {"kl_soft": kl, "gap_closed": 1 - kl / kl_none, "final_loss": losses[name][-1]}
        if wide:
            kl_wide = bench_student.heldout_kl(loaded, student.prompt(), wide, T)
            final[name].update(kl_soft_wide=kl_wide, gap_closed_wide=1 - kl_wide / kl_none_wide)
    result.update(final=final, **summarise(final))
    result["spread"]["first_step_sigma_distance_above_1e-3"] = {
        n: next((i + 1 for i, d in enumerate(distance[n]) if d > 1e-3), None) for n in distance
    }


def combine(paths: list[Path]) -> dict:
    """One result from several runs of the same experiment (``--first-twin`` kept their twins apart), every run once.
    The plain compact and dense runs repeat in each file: where one agrees to the bit with any earlier file's (the same
    machine) it counts once; where it does not (another machine rounds differently: another draw of the same maths)
    it counts, named ``compact [file]``. σ distances stay relative to each file's own compact run."""
    results = [json.loads(p.read_text()) for p in paths]
    first = results[0]
    same = ("steps", "model_name", "teacher_kind", "perturbation")
    for path, r in zip(paths[1:], results[1:]):
        for key in same:
            if r.get(key) != first.get(key):
                raise ValueError(f"--combine: {path} has {key} {r.get(key)!r}, {paths[0]} {first.get(key)!r}")
    wide = {(r["wide_eval"], r["held_out_wide_queries"]) for r in results if "wide_eval" in r}
    if len(wide) > 1:
        raise ValueError(f"--combine: the files were scored on different --wide-eval sets {sorted(wide)}")
    merged = {key: first.get(key) for key in ("device", "torch", "triton", "python", *same)}
    if wide:
        merged["wide_eval"], merged["held_out_wide_queries"] = wide.pop()
    merged.update(final={}, sigma_distance={}, losses={}, combined_from=[])
    plain_seen = {"compact": {}, "dense": {}}  # every file's plain runs so far: final gap_closed -> merged key
    for index, (path, r) in enumerate(zip(paths, results)):
        keys = ("command", "time", "checkout", "device", "twins", "dense_twins", "first_twin")
        merged["combined_from"].append({"file": path.name, **{k: r.get(k) for k in keys}})
        for name, row in r["final"].items():
            key = name
            if name in plain_seen:
                seen = plain_seen[name].get(row["gap_closed"])
                if seen is not None:  # the same run again (any earlier file's): count it once, keep every score
                    merged["final"][seen] = {**row, **merged["final"][seen]}  # e.g. a later file's gap_closed_wide
                    continue
                key = name if index == 0 else f"{name} [{path.stem}]"
                plain_seen[name][row["gap_closed"]] = key
            if key in merged["final"]:
                raise ValueError(f"--combine: {name} is in more than one file (give later runs --first-twin)")
            merged["final"][key] = row
            merged["losses"][key] = r["losses"][name]
            if name in r["sigma_distance"]:
                merged["sigma_distance"][key] = r["sigma_distance"][name]
    return {**merged, **summarise(merged["final"])}


def read_wide_eval(path: Path) -> tuple[list[str], str | None]:
    """``path``'s queries (one a line) and what is wrong with them for a wider held-out set, if anything: none, or
    some that are the example job's own training or held-out queries."""
    queries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    example = bench_student.EXAMPLE
    own = {
        q.strip()
        for suffix in (".queries.txt", ".eval.txt")
        for q in Path(f"{example}{suffix}").read_text().splitlines()
    }
    overlap = sorted(set(queries) & own)
    if not queries:
        return queries, f"{path} holds no queries"
    if overlap:
        return queries, f"{len(overlap)} of {path}'s queries are the job's own (e.g. {overlap[0]!r}): not held out"
    return queries, None


def taught_held_out(loaded, data, config, queries: list[str]) -> list:
    """``queries`` answered by the teacher with the context, as the job's held-out ones are."""
    from fastsoft.teacher.batching import teach_jobs

    job = dataclasses.replace(data["job"], queries=data["job"].queries[:1], eval_queries=queries)
    taught = teach_jobs(loaded, data["template"], [job], config.max_new_tokens, use_answers=True)[job.id]
    if isinstance(taught, Exception):
        raise taught
    return taught[1]


def print_table(result: dict) -> None:
    final = result.get("final")
    if not final:
        return
    print(f"\nheld-out gap_closed after {result['steps']} steps (the same job, batches, init and lr for each):")
    print("| student | gap_closed | final training loss | σ distance from compact at the end |")
    print("|---|---|---|---|")
    for name, row in final.items():
        dist = result["sigma_distance"].get(name)
        far = f"{dist[-1]:.2e}" if dist else "—"
        print(f"| {name} | {row['gap_closed']:.3f} | {row['final_loss']:.3f} | {far} |")
    spread = result["spread"]
    stdev = spread["stdev"]
    print(
        f"compact and its rounding twins: range {spread['range']:.3f}"
        + (f", stdev {stdev:.3f}" if stdev is not None else "")
        + f"; dense - compact: {spread['dense_minus_compact']:+.3f}"
    )
    print_groups(result.get("groups", {}), "the 8 held-out queries")
    if "groups_wide" in result:
        print_groups(result["groups_wide"], f"the {result.get('held_out_wide_queries', 'wide')} held-out queries")


def print_groups(groups: dict, measure: str) -> None:
    if "standard_error" in groups:
        print(
            f"means over runs, {measure}: compact {groups['compact_mean']:.4f} ({len(groups['compact_runs'])} runs, "
            f"sd {groups['compact_stdev']:.4f}), dense {groups['dense_mean']:.4f} ({len(groups['dense_runs'])} runs, "
            f"sd {groups['dense_stdev']:.4f}); dense - compact {groups['dense_minus_compact_mean']:+.4f} ± "
            f"{groups['standard_error']:.4f} (one standard error)"
        )
    if "ci90" in groups:
        lo90, hi90 = groups["ci90"]
        lo95, hi95 = groups["ci95"]
        verdict = "inside" if groups["equivalent_within_margin"] else "not inside"
        print(
            f"dense - compact, 90 % interval [{lo90:+.4f}, {hi90:+.4f}] (95 %: [{lo95:+.4f}, {hi95:+.4f}]; Welch, "
            f"{groups['welch_df']:.0f} df): {verdict} ±{groups['margin']} (equivalence test at 5 %)"
        )


def plot(result: dict, plt, path: Path) -> None:
    """Left: each run's σ distance from the compact run by step, coloured by teacher. Middle: each run's final held-out
    gap_closed by teacher, with each teacher's mean. Right (with runs of both teachers): dense − compact with its 90 %
    and 95 % intervals against issue #11's ±0.005, on the 8 held-out queries and (``--wide-eval``) the wide set."""
    groups = result.get("groups", {})
    with_interval = "ci90" in groups
    fig, axes = plt.subplots(1, 3 if with_interval else 2, figsize=(15 if with_interval else 11, 4.8))
    left, middle = axes[0], axes[1]
    for name, dist in result.get("sigma_distance", {}).items():
        color = "C1" if name.startswith("dense") else "C0"
        left.semilogy(range(1, len(dist) + 1), [max(d, 1e-9) for d in dist], color=color, alpha=0.6, lw=1)
    left.plot([], [], color="C0", label="compact's rounding twins")
    left.plot([], [], color="C1", label="dense and its twins")
    left.set_xlabel("step")
    left.set_ylabel("‖σ − σ_compact‖ / ‖σ_compact‖")
    left.set_title("runs that differ by rounding separate")
    left.legend(fontsize=8)
    final = result.get("final", {})
    for x, (teacher, color) in enumerate((("compact", "C0"), ("dense", "C1"))):
        values = [row["gap_closed"] for n, row in final.items() if n.startswith("dense") == (teacher == "dense")]
        jitter = [x + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(values))]  # spread, deterministic
        middle.scatter(jitter, values, color=color, alpha=0.7, s=18)
        if values:
            mean = sum(values) / len(values)
            middle.hlines(mean, x - 0.3, x + 0.3, colors=color, linestyles="--")
            middle.annotate(f"mean {mean:.4f}", (x + 0.32, mean), color=color, fontsize=8, va="center")
        middle.plot([], [], "o", color=color, label=f"{teacher}: {len(values)} runs")
    middle.set_xticks([0, 1], ["compact", "dense"])
    middle.set_xlim(-0.5, 1.9)
    middle.set_ylabel("held-out gap_closed")
    middle.set_title(f"each run after {result['steps']} steps ({result['device']})")
    middle.legend(fontsize=8, loc="lower right")
    if with_interval:
        right, margin = axes[2], groups["margin"]
        measures = [("8 held-out", groups)]
        if "ci90" in result.get("groups_wide", {}):
            measures.append((f"{result.get('held_out_wide_queries', 'wide')} held-out", result["groups_wide"]))
        right.axhspan(-margin, margin, color="0.9", label=f"±{margin} (issue #11)")
        for x, (_, g) in enumerate(measures):
            for level, width in ((95, 1.5), (90, 4)):
                lo, hi = g[f"ci{level}"]
                right.vlines(x, lo, hi, lw=width, color="C3", alpha=0.5 if level == 95 else 1)
            right.plot([x], [g["dense_minus_compact_mean"]], "o", color="C3")
            n = f"{len(g['compact_runs'])} + {len(g['dense_runs'])} runs"
            right.annotate(
                f"{'inside' if g['equivalent_within_margin'] else 'not inside'}\n{n}",
                (x + 0.08, g["ci90"][1]),
                fontsize=8,
                va="bottom",
            )
        right.plot([], [], color="C3", lw=4, label="90 % interval")
        right.plot([], [], color="C3", lw=1.5, alpha=0.5, label="95 % interval")
        right.axhline(0, color="0.5", lw=0.8)
        right.set_xlim(-0.7, len(measures) - 0.3)
        right.set_xticks(range(len(measures)), [label for label, _ in measures])
        span = max(margin * 2.2, *(abs(v) * 1.2 for _, g in measures for v in g["ci95"]))
        right.set_ylim(-span, span)
        right.set_title("dense − compact, mean over runs: the 90 % interval inside ±0.005?", fontsize=9)
        right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200; --smoke: 6)")
    parser.add_argument("--twins", type=int, default=3, help="rounding twins of the compact student (3)")
    parser.add_argument(
        "--dense-twins", type=int, default=0, help="rounding twins of the dense student too (0), for means over runs"
    )
    parser.add_argument(
        "--first-twin", type=int, default=1, help="seed of the first twin (1); later runs: past the last"
    )
    parser.add_argument(
        "--combine", type=Path, nargs="+", help="merge saved runs of the same experiment into one result (no training)"
    )
    parser.add_argument("--label", default="", help="appended to the results' file name")
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--wide-eval", type=Path, default=None, help="more held-out queries (one a line): every run scored on them too"
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps, 8 training queries, only into --out")
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.smoke else 200)
    if args.steps < 1 or args.twins < 1 or args.dense_twins < 0 or args.first_twin < 1:
        parser.error("--steps, --twins and --first-twin must be positive, --dense-twins at least 0")
    wide_queries = None
    if args.wide_eval:
        if not args.wide_eval.is_file():
            parser.error(f"--wide-eval: no file {args.wide_eval}")
        wide_queries, problem = read_wide_eval(args.wide_eval)
        if problem:
            parser.error(f"--wide-eval: {problem}")
    if args.combine:
        missing = [str(p) for p in args.combine if not p.is_file()]
        if missing or len(args.combine) < 2:
            parser.error(f"--combine needs two or more saved results; not found: {', '.join(missing) or 'none'}")
        try:
            merged = combine(args.combine)
        except ValueError as error:
            print(f"bench_rounding: {error}", file=sys.stderr)
            return 2
        result = {**common.run_info(common.device_name("cpu"), "bench_rounding.py", argv), **merged}
        print_table(result)
        stem = "-".join(["rounding", common.file_tag(result["device"], args.label or "combined")])
        print(common.save(result, stem, common.out_dirs(args.out, only_out=args.smoke), plot))
        return 0

    from fastsoft.config import CompressConfig
    from fastsoft.models import load_model

    config = CompressConfig(
        prompt_length=4 if args.smoke else 16,  # the means run's P, kept so later runs combine with it
        steps=args.steps,
        batch_queries=4,
        **({"max_new_tokens": 6} if args.smoke else {}),
    )
    name = common.device_name("cpu")
    print(f"runs that differ only in rounding on {name}, {torch.get_num_threads()} threads", flush=True)
    result = {
        **common.run_info(name, "bench_rounding.py", argv),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "twins": args.twins,
        "dense_twins": args.dense_twins,
        "first_twin": args.first_twin,
        "perturbation": "wbar (dense twins: the log-probs) * (1 + 2^-24 * N(0, 1)), seeded per twin",
    }
    stem = "-".join(["rounding", common.file_tag(name, "smoke" if args.smoke else "", args.label)])
    dirs = common.out_dirs(args.out, only_out=args.smoke)

    def body():
        loaded = load_model(args.model)
        result["model_name"] = Path(loaded.path).name
        data = bench_student.prepare(loaded, config, max_train=8 if args.smoke else None)
        result["teacher_kind"] = data["teacher_kind"]
        if args.wide_eval:
            data["held_out_wide"] = data["held_out"] + taught_held_out(loaded, data, config, wide_queries)
            result["wide_eval"] = str(args.wide_eval)
        run(loaded, data, config, args, result)

    status = common.run_keeping_partial(result, body)
    print_table(result)
    print()
    print(common.save(result, stem, dirs, plot))
    return status


if __name__ == "__main__":
    sys.exit(main())
