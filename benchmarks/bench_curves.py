"""Held-out gap_closed against training seconds, for choosing the defaults: several settings on several contexts.

One model load; one teacher cache per context, shared by its settings. Every pass over a job's training queries
(``ceil(queries / batch_queries)`` steps) the held-out token KL with σ is measured against the no-context KL
(``gap_closed``, on the context's eval queries, which never train); the clock is the engine's own training seconds
(``run.seconds``: the steps only; model load, teacher, measurements excluded). Runs train for their whole step budget
(``min_improvement`` 0 unless a setting names it); for each threshold of the plateau rule (``--min-improvement``,
``fastsoft/train/stopping.py``) the run records where the rule would have stopped it, from its training losses alone,
and the gap closed there: exact, because the rule stops at a pass boundary, where the curve is measured, and stopping
does not change the steps before it.

    python benchmarks/bench_curves.py                                   # the default grid, both shipped contexts
    python benchmarks/bench_curves.py --settings '[{"lr": 0.3, "steps": 100}]' --contexts quillstore

About 4 minutes a setting a context on the 2-core CI machine (200 steps); writes
``benchmarks/results/curves-<device>[-label].{json,png}`` after every run (a cut run keeps what it measured).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout on sys.path)
from common import ROOT  # noqa: E402

import fastsoft  # noqa: E402
from fastsoft.config import CompressConfig  # noqa: E402
from fastsoft.data.jobs import job_from_files  # noqa: E402
from fastsoft.eval.evaluate import token_kl  # noqa: E402
from fastsoft.pipeline.conductor import Engine  # noqa: E402
from fastsoft.train.stopping import pass_steps, plateau_window, plateaued  # noqa: E402

CONTEXTS = ("marrowick_island", "quillstore")  # invented prose; a technical text
GRID = [
    {"lr": 0.1, "steps": 200},  # the defaults before this benchmark
    {"lr": 0.3, "steps": 200},
    {"lr": 0.3, "steps": 100},
    {"lr": 0.3, "steps": 100, "batch_queries": 8},
]
THRESHOLDS = (0.01, 0.02, 0.05, 0.1)


def curve_of(loaded, context: str, overrides: dict, work: Path) -> dict:
    """Train one job with ``overrides``; the held-out curve, the losses, and where each plateau threshold stops."""
    example = ROOT / "examples" / context
    job = job_from_files(f"{example}.txt", f"{example}.queries.txt", f"{example}.eval.txt")
    config = CompressConfig(**{"min_improvement": 0.0, **overrides})
    every, window = (
        pass_steps(len(job.queries), config.batch_queries),
        plateau_window(len(job.queries), config.batch_queries),
    )
    points, kl_none = [], {}

    def measure(run, kl: float) -> None:
        points.append(
            {"step": run.step, "seconds": round(run.seconds, 2), "gap_closed": round(1 - kl / kl_none["v"], 4)}
        )

    def at_step(runs):  # before each step: the prompt in the bank has trained run.step steps
        (run,) = runs
        if "v" not in kl_none:
            kl_none["v"] = float(token_kl(loaded, None, run.teacher.eval)[0].mean())
        if run.step % every == 0:
            measure(run, float(token_kl(loaded, engine.bank.get(run.slot), run.teacher.eval)[0].mean()))

    cache = work / f"cache-{context}"  # the teacher depends on the context, not on these settings
    engine = Engine(loaded, config, work / "out", cache_dir=cache, progress=False, overwrite=True, on_step=at_step)
    started = time.perf_counter()
    (run,) = engine.run([job])
    wall = time.perf_counter() - started
    if points[-1]["step"] != run.step:  # the last point: what the run's own evaluation measured
        measure(run, run.report["kl_soft"])
    return {
        "context": context,
        "settings": overrides,
        "config": config.to_dict(),  # what the overrides resolved to: the defaults change between commits
        "pass_steps": every,
        "plateau_window": window,
        "train_queries": len(job.queries),
        "kl_none": kl_none["v"],
        "curve": points,
        "losses": run.losses,
        "plateau_stops": plateau_stops(run.losses, points, window),
        "final": {k: run.report[k] for k in ("gap_closed", "top1_agreement", "rouge_l", "steps")},
        "wall_seconds": round(wall, 1),
    }


def plateau_stops(losses: list[float], curve: list[dict], window: int) -> dict:
    """For each threshold, the curve's point where the plateau rule stops the run (None: it never does)."""
    at, stops = {p["step"]: p for p in curve}, {}
    for threshold in THRESHOLDS:
        step = next((s for s in range(window, len(losses) + 1) if plateaued(losses[:s], window, threshold)), None)
        stops[str(threshold)] = at[step] if step is not None else None
    return stops


def reanalyse(path: Path) -> dict:
    """A saved result with its plateau stops recomputed by today's rule (no training)."""
    result = json.loads(path.read_text())
    for run in result["runs"]:
        run["plateau_window"] = plateau_window(run["train_queries"], run["settings"].get("batch_queries", 4))
        run["plateau_stops"] = plateau_stops(run["losses"], run["curve"], run["plateau_window"])
    return result


def plot(result: dict, plt, path: Path) -> None:
    """One column a context: held-out gap closed against training seconds (top) and steps (bottom)."""
    contexts = list(dict.fromkeys(r["context"] for r in result["runs"]))
    fig, axes = plt.subplots(2, len(contexts), figsize=(6.5 * len(contexts), 8.4), squeeze=False)
    mark = str(result["marked_threshold"])
    for column, context in enumerate(contexts):
        for row, x in enumerate(("seconds", "step")):
            ax = axes[row][column]
            for r in (r for r in result["runs"] if r["context"] == context):
                label = ", ".join(f"{k} {v}" for k, v in r["settings"].items()) or "defaults"
                if "config" in r and "prompt_length" not in r["settings"]:
                    label += f" (prompt_length {r['config']['prompt_length']})"
                (line,) = ax.plot([p[x] for p in r["curve"]], [p["gap_closed"] for p in r["curve"]], label=label)
                stop = r["plateau_stops"].get(mark)
                if stop:
                    ax.plot(stop[x], stop["gap_closed"], "o", color=line.get_color(), markersize=8)
            ax.set_title(f"{context} (dot: where the plateau rule {mark} stops)", fontsize=10)
            ax.set_xlabel("training seconds" if x == "seconds" else "step")
            ax.set_ylabel("held-out gap_closed")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(result["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--settings", default=json.dumps(GRID), help="JSON list of CompressConfig overrides")
    parser.add_argument(
        "--contexts", nargs="+", default=list(CONTEXTS), help="examples/<name>.{txt,queries.txt,eval.txt}"
    )
    parser.add_argument("--mark", type=float, default=0.01, help="plateau threshold marked on the plot")
    parser.add_argument("--label", default="", help="suffix of the result files")
    parser.add_argument(
        "--reanalyse", type=Path, help="recompute a saved result's plateau stops and plot (no training)"
    )
    args = parser.parse_args(argv)
    if args.reanalyse:
        result = {**reanalyse(args.reanalyse), "marked_threshold": args.mark}
        print(common.save(result, args.reanalyse.stem, [args.reanalyse.parent], plot))
        return 0
    device = common.device_name("cpu")
    result = {**common.run_info(device, "bench_curves.py", argv), "marked_threshold": args.mark, "runs": []}
    stem = "curves-" + common.file_tag(device, args.label)
    dirs = common.out_dirs(args.out)
    loaded = fastsoft.load_model()
    work = Path(tempfile.mkdtemp(prefix="fastsoft-curves-"))
    for context in args.contexts:
        for overrides in json.loads(args.settings):
            run = curve_of(loaded, context, overrides, work)
            result["runs"].append(run)
            stops = {t: (s["step"], s["gap_closed"]) if s else None for t, s in run["plateau_stops"].items()}
            print(json.dumps({"context": context, "settings": overrides, "final": run["final"],
                              "seconds": run["curve"][-1]["seconds"], "stops": stops}), flush=True)  # fmt: skip
            common.save(result, stem, dirs)
    print(common.save(result, stem, dirs, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
