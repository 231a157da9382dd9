"""Command 1 with the hand-written queries, this checkout against an older one, run back to back in pairs.

Issue #13 asks for command 1 (the shipped example with its 32 hand-written queries) in half the ``fastsoft compress``
time the code of f50e925 took, at its held-out ``gap_closed``. This VM's speed drifts by 10-30 % within hours, so a
figure from another day says little: both codes run here, alternately (baseline first), each in a fresh Python
process from its own tree (``PYTHONPATH`` puts the tree's ``fastsoft`` before the installed one; the baseline tree
needs its C++ extension built in place; both read this checkout's example files). Each code runs with its own
defaults — the prompt length among them, recorded a run — since the issue compares the command, not a setting.
Recorded a run: the ``fastsoft compress`` seconds (``summary.json``'s: from the loaded model to the written outputs,
what the command prints at its end), the wall seconds around the process (Python's start and the model load too),
``report.json``'s training seconds, held-out ``gap_closed`` and top-1 agreement; a pair: this checkout's
``fastsoft compress`` seconds over the baseline's.

    git worktree add /tmp/f50e925 f50e925 && (cd /tmp/f50e925 && python setup.py build_ext --inplace)
    python benchmarks/bench_command1.py --baseline /tmp/f50e925 --pairs 2          # ~15 min on 2 cores
    python benchmarks/bench_command1.py --baseline . --pairs 1 --extra "--steps 2 --model M" --smoke --out DIR

Writes ``benchmarks/results/command1-side-by-side-<device>[-<label>].{json,png}`` after every run (the plot: each
pair's seconds, its ratio, and each run's held-out gap closed).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import ROOT  # noqa: E402

EXAMPLE = ROOT / "examples" / "marrowick_island"
COMMAND = [
    "fastsoft", "compress", "--context", f"{EXAMPLE}.txt", "--queries", f"{EXAMPLE}.queries.txt",
    "--eval-queries", f"{EXAMPLE}.eval.txt", "--no-progress",
]  # fmt: skip


def tree_commit(tree: Path) -> str | None:
    """The tree's short commit (None outside git)."""
    return (common.checkout_state(tree)["commit"] or "")[:7] or None


def run_once(tree: Path, code: str, extra: list[str], work: Path) -> dict:
    """One ``fastsoft compress`` of command 1 from ``tree``; its seconds and held-out quality."""
    out = work / f"{code}-{time.strftime('%H%M%S')}"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started, clock = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", *COMMAND, "--out", str(out), *extra], cwd=tree, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - clock
    row = {"code": code, "commit": tree_commit(tree), "started": started, "exit_code": proc.returncode}
    reports = list(out.glob("*/report.json"))
    if proc.returncode != 0 or len(reports) != 1 or not (out / "summary.json").is_file():
        return {**row, "error": (proc.stderr or proc.stdout)[-1500:] or f"{len(reports)} reports in {out}"}
    report = json.loads(reports[0].read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {
        **row,
        "fastsoft_compress_seconds": round(summary["seconds"], 2),
        "wall_seconds_with_python_start": round(wall, 1),
        "training_seconds": round(report["seconds"], 2),
        "gap_closed": round(report["gap_closed"], 4),
        "top1_agreement": round(report["top1_agreement"], 4),
        "prompt_length": report.get("prompt_length"),
    }


def complete_pairs(runs: list[dict]) -> list[tuple[dict, dict]]:
    """(baseline, this checkout) pairs in the order run, the pairs with a failed run left out."""
    pairs = zip(runs[0::2], runs[1::2])
    return [(b, h) for b, h in pairs if b.get("fastsoft_compress_seconds") and h.get("fastsoft_compress_seconds")]


def ratios(runs: list[dict]) -> list[float]:
    """This checkout's ``fastsoft compress`` seconds over the baseline's run just before it, pair by pair."""
    return [round(h["fastsoft_compress_seconds"] / b["fastsoft_compress_seconds"], 3) for b, h in complete_pairs(runs)]


def plot(result: dict, plt, path: Path) -> None:
    """Each pair's two ``fastsoft compress`` times side by side, labelled with their held-out gap closed."""
    pairs = complete_pairs(result["runs"])
    if not pairs:
        print("no complete pair to plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = max(r["fastsoft_compress_seconds"] for pair in pairs for r in pair)
    for i, (base, head) in enumerate(pairs):
        for dx, r, color in ((-0.2, base, "C7"), (0.2, head, "C0")):
            ax.bar(i + dx, r["fastsoft_compress_seconds"], 0.38, color=color)
            ax.annotate(f"{r['gap_closed']:.3f}", (i + dx, r["fastsoft_compress_seconds"]), ha="center", va="bottom",
                        fontsize=8)  # fmt: skip
        ratio = head["fastsoft_compress_seconds"] / base["fastsoft_compress_seconds"]
        ax.annotate(f"{ratio:.2f}× the time", (i, top * 1.1), ha="center", fontsize=9, weight="bold")
    base, head = pairs[0]
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="C7", label=f"baseline ({base['commit']}, P = {base['prompt_length']})"),
        plt.Rectangle((0, 0), 1, 1, color="C0", label=f"this checkout ({head['commit']}, P = {head['prompt_length']})"),
    ]
    ax.set_ylim(0, top * 1.35)
    ax.set_xticks(range(len(pairs)), [f"pair {i + 1}\n{b['started'][11:]}" for i, (b, _) in enumerate(pairs)])
    ax.set_ylabel("fastsoft compress seconds (label: held-out gap closed)")
    ax.set_title(f"command 1, hand-written queries, back to back ({result['device']})", fontsize=9)
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the older code (ext built)")
    parser.add_argument("--pairs", type=int, default=2, help="baseline-then-this-checkout pairs (2)")
    parser.add_argument("--extra", default="", help="flags added to both commands, e.g. --extra='--steps 2'")
    parser.add_argument("--label", default="", help="suffix of the result files")
    parser.add_argument("--smoke", action="store_true", help="write only into --out (tests)")
    args = parser.parse_args(argv)
    if args.smoke and args.out is None:
        parser.error("--smoke needs --out")
    if not (args.baseline / "fastsoft" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a fastsoft checkout (no fastsoft/__init__.py)")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    device = common.device_name("cpu")
    result = {
        **common.run_info(device, "bench_command1.py", argv),
        "compress_command": " ".join(COMMAND + ["--out", "DIR", *shlex.split(args.extra)]),
        "baseline_commit": tree_commit(args.baseline),
        "threads": os.environ.get("OMP_NUM_THREADS", f"all {os.cpu_count()}"),
        "runs": [],
    }
    stem = "command1-side-by-side-" + common.file_tag(device, args.label)
    dirs = common.out_dirs(args.out, only_out=args.smoke)
    for folder in dirs:  # the pairs measured by hand before this benchmark live under the unlabelled name
        earlier = folder / f"{stem}.json"
        if earlier.is_file() and "compress_command" not in json.loads(earlier.read_text()):
            parser.error(f"{earlier} holds runs this benchmark did not write; pass --label")
    extra = shlex.split(args.extra)

    def body():
        with tempfile.TemporaryDirectory(prefix="fastsoft-command1-") as work:
            for _ in range(args.pairs):
                for tree, code in ((args.baseline.resolve(), "baseline"), (ROOT, "this checkout")):
                    row = run_once(tree, code, extra, Path(work))
                    result["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    result["ratio_this_over_baseline"] = ratios(result["runs"])
                    common.save(result, stem, dirs)

    status = common.run_keeping_partial(result, body)
    print(f"ratios (this checkout / baseline, pair by pair): {result.get('ratio_this_over_baseline')}")
    print(common.save(result, stem, dirs, plot))
    failed = [r for r in result["runs"] if r["exit_code"] != 0]
    return status or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
