"""``fastsoft compress`` end to end on one context, command 1 of the README: as written (no queries of its own, so
fastsoft's topic questions and the queries the model writes, its defaults) and with the context's hand-written
queries (``--queries``), each in a fresh subprocess, timed alone; held-out quality and seconds by stage.

Both runs hold out the context's eval queries (``--eval-queries``, never trained on) and take every other setting
from the defaults, so the benchmark follows what the command does at each commit. On the shipped example
(``examples/marrowick_island.txt``; ``<runs>`` a temporary folder, ``--extra`` flags at the end of each)::

    as written             python -m fastsoft compress --context examples/marrowick_island.txt \\
                               --eval-queries examples/marrowick_island.eval.txt --out <runs>/as-written --no-progress
    hand-written queries   ... --out <runs>/hand-written-queries --no-progress \\
                               --queries examples/marrowick_island.queries.txt

Each run's ``<runs>/<config>/<context stem>/report.json`` gives the held-out ``gap_closed``, ``top1_agreement``,
``rouge_l``, ``kl_soft``, ``kl_none`` (and ``exact_match``), the query counts and ``stage_seconds`` (synthesis,
teacher, training); beside them the subprocess's wall seconds, the seconds inside ``fastsoft compress`` outside the
stages (evaluation, export) and around it (start-up, model load), and the exit status (a failed run is recorded with
its error and stderr tail, and the benchmark goes on). The README's first command is meant to take under 10 minutes
on this project's 2-core CPU machine: ``within_target`` says whether the as-written run did.

    python benchmarks/bench_compress.py               # both runs on SmolLM2-135M (2 CPU cores: about 10 minutes)
    python benchmarks/bench_compress.py --context examples/quillstore.txt
    python benchmarks/bench_compress.py --quick       # the tests' chatty tiny model, 2 steps: seconds

``--eval-queries`` and ``--queries`` default to ``<context>.eval.txt`` and ``<context>.queries.txt`` beside the
context (without a queries file, only the as-written run). ``--extra`` adds flags to both runs
(``--extra="--steps 2 --model DIR"``). Writes ``benchmarks/results/compress-<device>[-<context stem>][-quick].json``,
its rows into ``all.csv`` and the figure ``compress-<device>[-quick].png`` (``plot.py``), and prints a table. Exit
status 1 when a run failed (it is in the JSON all the same).

The study that chose the defaults (how many queries the model writes, topic questions, with and without the user's
queries) was this script's earlier form, ``bench_selfstudy.py``; its results stay in ``benchmarks/results/selfstudy-*``
and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout on sys.path)
from common import ROOT  # noqa: E402

BENCHMARK = "compress"
DEFAULT_CONTEXT = ROOT / "examples" / "marrowick_island.txt"
QUICK_CONTEXT = ROOT / "examples" / "quillstore.txt"
QUICK_EXTRA = "--steps 2 --prompt-length 4 --max-new-tokens 4 --synthesis-temperature 3 --synthesis-top-p 1"
QUICK_SELF_STUDY = "--synthesize 4 --topic-queries 4"  # the as-written run's, quick
AS_WRITTEN, HAND_WRITTEN = "as written", "hand-written queries"
TARGET = {"config": AS_WRITTEN, "wall_seconds": 600.0, "what": "the README's first command, under 10 minutes"}
METRICS = ("gap_closed", "top1_agreement", "rouge_l", "kl_soft", "kl_none", "exact_match")
STAGES = ("synthesis", "teacher", "training")
FROM_REPORT = ("eval_source", "synthesis", "queries", "steps", "stop_reason", "context_tokens", "prompt_length")


def shown(path: Path) -> str:
    """A path as the JSON and the commands show it: relative to the checkout when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def command_for(config: str, args, out: Path) -> list[str]:
    cmd = ["compress", "--context", shown(args.context), "--eval-queries", shown(args.eval_queries)]
    cmd += ["--out", str(out), "--no-progress"]
    if config == HAND_WRITTEN:
        cmd += ["--queries", shown(args.queries)]
    elif args.quick:
        cmd += shlex.split(QUICK_SELF_STUDY)
    return [*cmd, *shlex.split(args.extra)]


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def run_config(config: str, args, runs: Path, job_id: str) -> dict:
    """``fastsoft compress`` for ``config`` in a fresh subprocess, timed around it; never raises for a failed run."""
    out = runs / config.replace(" ", "-")
    cmd = command_for(config, args, out)
    entry = {"command": shlex.join(["python", "-m", "fastsoft", *cmd]), "load_before": common.load_average()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"{config}: {entry['command']}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastsoft", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    entry.update(wall_seconds=time.perf_counter() - started, exit_code=proc.returncode)
    entry["load_after"] = common.load_average()
    report = read_json(out / job_id / "report.json") if proc.returncode == 0 else None
    summary = read_json(out / "summary.json")
    entry["compress_seconds"] = summary.get("seconds") if isinstance(summary, dict) else None
    if report is None:
        failed = read_json(out / job_id / "error.json")
        said = [line for line in proc.stderr.splitlines() if line.strip()]
        entry["error"] = (failed or {}).get("error") or (
            said[-1] if said else f"no report.json (exit {proc.returncode})"
        )
        entry["stderr_tail"] = proc.stderr[-3000:]
        print(f"  failed (exit {proc.returncode}) after {entry['wall_seconds']:.0f} s: {entry['error']}", flush=True)
        return entry
    for key in (*METRICS, *FROM_REPORT):
        entry[key] = report.get(key)
    entry["stage_seconds"] = {stage: (report.get("stage_seconds") or {}).get(stage, 0.0) for stage in STAGES}
    staged = sum(entry["stage_seconds"].values())
    compress, wall = entry["compress_seconds"], entry["wall_seconds"]
    entry["unstaged_seconds"] = (compress if compress is not None else wall) - staged  # evaluation, export
    entry["startup_seconds"] = wall - compress if compress is not None else None  # interpreter, imports, model
    if report.get("eval_source") != "eval_queries":
        entry["mismatch"] = f"held-out queries from {report.get('eval_source')!r}, not the --eval-queries file"
    print(
        f"  done in {wall:.0f} s: gap closed {entry['gap_closed']:.3f}, {entry['queries']['train']} training queries"
        + (f"; MISMATCH: {entry['mismatch']}" if "mismatch" in entry else ""),
        flush=True,
    )
    return entry


def _f(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def print_table(result: dict) -> None:
    print(
        f"\nfastsoft compress on {result['context']} ({result['eval_count']} held-out queries) on {result['device']}; "
        "seconds: synthesis / teacher / training / total (wall)"
    )
    print("| config | exit | train q | gap_closed | top-1 | ROUGE-L | synthesis | teacher | training | total |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, e in result["configs"].items():
        stages = e.get("stage_seconds") or {}
        print(
            f"| {name} | {e.get('exit_code')} | {_f((e.get('queries') or {}).get('train'), 'd')} "
            f"| {_f(e.get('gap_closed'), '.3f')} | {_f(e.get('top1_agreement'), '.3f')} | {_f(e.get('rouge_l'), '.3f')} | "
            + " | ".join(_f(stages.get(s), ".1f") for s in STAGES)
            + f" | {_f(e.get('wall_seconds'), '.1f')} |"
        )
    for name, e in result["configs"].items():
        for note in ("mismatch", "error"):
            if e.get(note):
                print(f"note: {name}: {e[note]}")
    if "within_target" in result:
        target = result["configs"][TARGET["config"]]["wall_seconds"]
        verdict = "within" if result["within_target"] else "OVER"
        print(f"\n{TARGET['config']}: {target:.0f} s wall, {verdict} the {TARGET['wall_seconds']:.0f} s target")


def rows_of(result: dict) -> list[dict]:
    """A case a context and configuration: seconds (wall and by stage), held-out quality and training queries."""
    rows, stem = [], Path(result["context"]).stem
    for name, e in result["configs"].items():
        if e.get("exit_code") != 0 or "gap_closed" not in e:
            continue
        case, who = f"{stem}: {name}", "fastsoft compress"
        stages = e["stage_seconds"]
        rows.append(common.row(case, who, "wall time", e["wall_seconds"], "s"))
        for stage in STAGES:
            rows.append(common.row(case, who, f"{stage} time", stages[stage], "s"))
        rows.append(common.row(case, who, "evaluation and export time", e["unstaged_seconds"], "s"))
        rows.append(common.row(case, who, "held-out gap_closed", e["gap_closed"], ""))
        rows.append(common.row(case, who, "held-out top-1 agreement", e["top1_agreement"], ""))
        rows.append(common.row(case, who, "training queries", (e.get("queries") or {}).get("train"), "queries"))
    return rows


def run(quick: bool = False, device: str = "cpu", results: Path | None = None) -> common.Outcome:
    """The entry point's call (``benchmarks/run.py``): on ``device`` (``--device`` of ``fastsoft compress``)."""
    extra = [f"--extra=--device {device}"] if device != "cpu" else []
    return bench([*(["--quick"] if quick else []), *extra, *(["--results", str(results)] if results else [])])


def parse_args(argv):
    parser = common.parser(__doc__)
    parser.add_argument("--context", type=Path, default=None, help="context file (default: the example)")
    parser.add_argument("--eval-queries", type=Path, help="held-out queries (default: <context>.eval.txt)")
    parser.add_argument("--queries", type=Path, help="the hand-written queries (default: <context>.queries.txt)")
    parser.add_argument("--configs", nargs="+", choices=(AS_WRITTEN, HAND_WRITTEN), help="run only these")
    parser.add_argument("--extra", default="", help='flags for every run, e.g. --extra="--steps 2 --model DIR"')
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder, removed)")
    parser.add_argument("--quick", action="store_true", help="the tests' chatty tiny model, 2 steps (seconds)")
    parser.add_argument("--label", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)
    args.context = (args.context or (QUICK_CONTEXT if args.quick else DEFAULT_CONTEXT)).resolve()
    base = args.context.with_suffix("")
    args.eval_queries = (args.eval_queries or Path(f"{base}.eval.txt")).resolve()
    if args.queries is None and not Path(f"{base}.queries.txt").is_file():
        args.queries = None  # a context without training queries: only the as-written run
    else:
        args.queries = (args.queries or Path(f"{base}.queries.txt")).resolve()
    for flag, path in (("--context", args.context), ("--eval-queries", args.eval_queries), ("--queries", args.queries)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    args.configs = args.configs or [AS_WRITTEN, *([HAND_WRITTEN] if args.queries else [])]
    if HAND_WRITTEN in args.configs and not args.queries:
        parser.error(f"{HAND_WRITTEN!r}: {args.context.name} has no queries file (pass --queries)")
    return args


def bench(argv=None) -> common.Outcome:
    args = parse_args(argv)
    extra = shlex.split(args.extra)
    device_type = extra[extra.index("--device") + 1] if "--device" in extra[:-1] else "cpu"
    device = common.device_name(device_type.split(":")[0])
    default = args.context == (QUICK_CONTEXT if args.quick else DEFAULT_CONTEXT).resolve()
    stem = "-".join(
        [
            BENCHMARK,
            common.file_tag(device, "" if default else args.context.stem, args.label, "quick" if args.quick else ""),
        ]
    )
    dirs = common.out_dirs(args.out, only_out=args.quick, results=args.results)
    result = {
        **common.run_info(device, "bench_compress.py", argv),
        "context": shown(args.context),
        "eval_queries": shown(args.eval_queries),
        "queries": shown(args.queries) if args.queries else None,
        "eval_count": sum(1 for line in args.eval_queries.read_text().splitlines() if line.strip()),
        "extra": args.extra,
        "target": TARGET,
        "configs": {},
    }
    print(f"fastsoft compress end to end on {device}: {', '.join(args.configs)}", flush=True)
    runs = args.runs.resolve() if args.runs else Path(tempfile.mkdtemp(prefix="fastsoft-compress-"))
    runs.mkdir(parents=True, exist_ok=True)

    def body():
        if args.quick and "--model" not in extra:
            args.extra = f"--model {common.tiny_model(runs / 'chatty-llama', chatty=True)} {QUICK_EXTRA} {args.extra}"
            result["extra"] = f"--model <the tests' chatty tiny model> {QUICK_EXTRA} (as written: {QUICK_SELF_STUDY})"
        for config in args.configs:
            result["configs"][config] = run_config(config, args, runs, args.context.stem)
            common.save(result, stem, dirs)  # a stopped run keeps every configuration measured so far
        target = result["configs"].get(TARGET["config"]) or {}
        if target.get("exit_code") == 0 and not args.quick:
            result["within_target"] = target["wall_seconds"] <= TARGET["wall_seconds"]

    try:
        status = common.run_keeping_partial(result, body)
    finally:
        if not args.runs:
            shutil.rmtree(runs, ignore_errors=True)
    print_table(result)
    print()
    failed = [n for n, e in result["configs"].items() if e.get("exit_code") != 0]
    return common.finish(BENCHMARK, result, stem, dirs, rows_of, args.quick, status or (1 if failed else 0))


def main(argv=None) -> int:
    return bench(argv).status


if __name__ == "__main__":
    sys.exit(main())
