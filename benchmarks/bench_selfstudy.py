"""Self-study against hand-written queries: held-out quality and seconds by stage of ``fastsoft compress`` on one
context, when the model writes its own training queries (16, 64, 256 of them), when it gets the user's queries, and
with both.

Every configuration is one ``fastsoft compress`` in a fresh subprocess, timed alone (wall seconds around the
subprocess: start-up, model load, self-study, teacher, training, evaluation, export), with the context's held-out
queries as the evaluation set (``--eval-queries``, never trained on: self-study drops a request that repeats one).
On the shipped example (``examples/marrowick_island.txt``, 8 held-out queries, 32 user queries) the configurations
and their commands are (``<runs>`` a temporary folder; ``--extra`` flags go at the end of each)::

    synthetic 16            python -m fastsoft compress --context examples/marrowick_island.txt \\
                                --eval-queries examples/marrowick_island.eval.txt --out <runs>/synthetic-16 \\
                                --no-progress --synthesize 16
    synthetic 64            ... --out <runs>/synthetic-64 --no-progress --synthesize 64
    synthetic 256           ... --out <runs>/synthetic-256 --no-progress --synthesize 256
    user 32                 ... --out <runs>/user-32 --no-progress --queries examples/marrowick_island.queries.txt \\
                                --synthesize 0
    user 32 + synthetic 64  ... --out <runs>/user-32-synthetic-64 --no-progress \\
                                --queries examples/marrowick_island.queries.txt --synthesize 64

Each run's ``<runs>/<config>/<context stem>/report.json`` gives, per configuration: the held-out ``gap_closed``,
``top1_agreement``, ``rouge_l``, ``kl_soft``, ``kl_none`` (and ``exact_match``), ``eval_source``, the synthesis counts
(kept, dropped by reason), the train / eval query counts and ``stage_seconds`` (synthesis, teacher, training); beside
them the subprocess's wall seconds and exit status (a failed run is recorded with its error and stderr tail; the
benchmark goes on). The README's first command is meant to take under 10 minutes on this project's 2-core CPU
machine once it writes its own queries: that target is the ``synthetic 64`` configuration's wall seconds here.

    # the five configurations above on SmolLM2-135M (2 CPU cores: about half an hour, estimated)
    python benchmarks/bench_selfstudy.py
    # the second context (its queries: user 16): selfstudy-<device>-quillstore.json
    python benchmarks/bench_selfstudy.py --context examples/quillstore.txt \
        --eval-queries examples/quillstore.eval.txt --queries examples/quillstore.queries.txt
    # one configuration, another taken from a finished run (the README's first command is "user 32" while
    # --synthesize defaults to 0 for a job with queries)
    python benchmarks/bench_selfstudy.py --configs "synthetic 64" \
        --reuse "user 32=runs/marrowick/marrowick_island/report.json"

``--eval-queries`` and ``--queries`` default to ``<context>.eval.txt`` and ``<context>.queries.txt`` beside the
context; the user configurations are named from the number of query lines. ``--configs`` runs a subset; ``--reuse
NAME=REPORT_JSON`` takes a finished run's report for a configuration instead of running it (recorded as reused, and
from where; its wall seconds are unknown). ``--extra`` adds flags to every run (``--extra="--steps 2 --model DIR"``).
Smoke run on a tiny model: ``--counts 4 8`` (the synthetic counts; the user + synthetic one takes the middle count,
or ``--mixed N``) with ``--extra="--model DIR --steps 2 --prompt-length 4 --max-new-tokens 4 --synthesis-temperature 3
--synthesis-top-p 1"`` and ``--out /tmp/...`` (``tests/e2e/test_benchmarks.py``, on the tests' chatty tiny model).

Writes ``selfstudy-<device>[-<context stem>][-<label>].json`` into ``benchmarks/results/`` (or ``--out``) after every
configuration, merged with the configurations an earlier invocation left in that file (so they can be run in separate
invocations; a rerun replaces its own), prints a table and draws the ``.png``: left, held-out gap closed against the
number of synthetic queries (no user queries), the user-only and user + synthetic configurations as lines and a
marker; right, seconds by stage per configuration (the report's three stages, then evaluation and export inside
``fastsoft compress``, then start-up and model load around it). Without matplotlib the PNG is skipped (one line says
so). A file holding runs of another context or other ``--extra`` flags is never merged into (exit status 2: pass
``--label`` or ``--out``). Exit status 1 when a configuration run here failed (it is in the JSON all the same).
"""

from __future__ import annotations

import argparse
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
from common import RESULTS, ROOT  # noqa: E402

DEFAULT_CONTEXT = ROOT / "examples" / "marrowick_island.txt"
DEFAULT_COUNTS = (16, 64, 256)
TARGET = {"config": "synthetic 64", "wall_seconds": 600.0, "what": "the README's first command, under 10 minutes"}
METRICS = ("gap_closed", "top1_agreement", "rouge_l", "kl_soft", "kl_none", "exact_match")
STAGES = ("synthesis", "teacher", "training")
FROM_REPORT = ("eval_source", "synthesis", "queries", "steps", "stop_reason", "context_tokens", "prompt_length")


# ------------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    """Non-empty lines, as ``fastsoft compress`` reads a query file."""
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def configurations(counts: list[int], mixed: int, users: int) -> list[dict]:
    """Every configuration in table order: synthetic only (ascending), user only, user + synthetic."""
    configs = [{"name": f"synthetic {n}", "slug": f"synthetic-{n}", "synthetic": n, "user": 0} for n in counts]
    configs.append({"name": f"user {users}", "slug": f"user-{users}", "synthetic": 0, "user": users})
    configs.append(
        {
            "name": f"user {users} + synthetic {mixed}",
            "slug": f"user-{users}-synthetic-{mixed}",
            "synthetic": mixed,
            "user": users,
        }
    )
    return configs


def shown(path: Path) -> str:
    """A path as the JSON and the commands show it: relative to the checkout when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def command_for(config: dict, args, out: Path) -> list[str]:
    cmd = ["compress", "--context", shown(args.context), "--eval-queries", shown(args.eval_queries)]
    cmd += ["--out", str(out), "--no-progress"]
    if config["user"]:
        cmd += ["--queries", shown(args.queries)]
    return [*cmd, "--synthesize", str(config["synthetic"]), *shlex.split(args.extra)]


# ------------------------------------------------------------------------------------------------------
# one configuration: run it, or take a finished run's report
# ------------------------------------------------------------------------------------------------------


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def from_report(entry: dict, report: dict, config: dict, job_id: str) -> None:
    """Copy the report's numbers into ``entry`` and note anything that does not match the configuration."""
    for key in (*METRICS, *FROM_REPORT):
        entry[key] = report.get(key)
    entry["stage_seconds"] = {stage: (report.get("stage_seconds") or {}).get(stage, 0.0) for stage in STAGES}
    checks = []
    if report.get("job_id") != job_id:
        checks.append(f"job id {report.get('job_id')!r}, not {job_id!r}")
    if report.get("eval_source") != "eval_queries":
        checks.append(f"held-out queries from {report.get('eval_source')!r}, not the --eval-queries file")
    synthesis = report.get("synthesis")
    written = synthesis["kept"] + sum(synthesis["dropped"].values()) if synthesis else 0
    if written != config["synthetic"]:
        checks.append(f"{written} synthetic queries written, not {config['synthetic']}")
    if config["user"] and (report.get("queries") or {}).get("train", 0) < config["user"]:
        checks.append(f"{(report.get('queries') or {}).get('train')} training queries, fewer than {config['user']}")
    if checks:
        entry["mismatch"] = "; ".join(checks)


def split_seconds(entry: dict) -> None:
    """The seconds outside the report's stages: ``unstaged_seconds`` inside ``fastsoft compress`` (evaluation, export,
    cache writes) and ``startup_seconds`` around it (interpreter, imports, model load, the closing table)."""
    staged, compress, wall = sum(entry["stage_seconds"].values()), entry["compress_seconds"], entry["wall_seconds"]
    entry["unstaged_seconds"] = compress - staged if compress is not None else None
    if wall is not None and compress is None:  # no summary.json: everything outside the stages in one number
        entry["unstaged_seconds"] = wall - staged
    entry["startup_seconds"] = wall - compress if wall is not None and compress is not None else None


def run_config(config: dict, args, runs: Path, job_id: str) -> dict:
    """``fastsoft compress`` for ``config`` in a fresh subprocess, timed around it; never raises for a failed run."""
    out = runs / config["slug"]
    for i in range(2, 1000):  # a kept --runs folder may hold an earlier run of this configuration
        if not out.exists():
            break
        out = runs / f"{config['slug']}-{i}"
    cmd = command_for(config, args, out)
    entry = {
        "command": shlex.join(["python", "-m", "fastsoft", *cmd]),
        "extra": args.extra,
        "reused_from": None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_before": common.load_average(),
    }
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"{config['name']}: {entry['command']}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastsoft", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    entry["wall_seconds"] = time.perf_counter() - started
    entry["exit_code"] = proc.returncode
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
    from_report(entry, report, config, job_id)
    split_seconds(entry)
    print(
        f"  done in {entry['wall_seconds']:.0f} s: gap closed {entry['gap_closed']:.3f}, "
        f"{entry['queries']['train']} training queries"
        + (f"; MISMATCH: {entry['mismatch']}" if "mismatch" in entry else ""),
        flush=True,
    )
    return entry


def reuse_config(config: dict, path: Path, job_id: str) -> dict:
    """A finished run's report for ``config``: its numbers, where it came from, the settings it ran with."""
    path = Path(path)
    report = read_json(path)
    if not isinstance(report, dict):
        raise SystemExit(f"--reuse {config['name']}={path}: not a readable report.json")
    meta = read_json(path.parent / "fastsoft.json") or {}
    summary = read_json(path.parent.parent / "summary.json")
    settings = (meta.get("config") or {}) if isinstance(meta, dict) else {}
    entry = {
        "command": None,
        "extra": None,
        "reused_from": shown(path),
        "reused_settings": {
            k: settings.get(k) for k in ("synthesize", "steps", "prompt_length", "lr", "seed", "teacher")
        },
        "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)),
        "wall_seconds": None,  # not timed here; compress_seconds (without start-up and model load) when known
        "compress_seconds": summary.get("seconds") if isinstance(summary, dict) else None,
        "exit_code": 0,
    }
    from_report(entry, report, config, job_id)
    split_seconds(entry)
    print(f"{config['name']}: reused {entry['reused_from']} (gap closed {entry['gap_closed']:.3f})", flush=True)
    if "mismatch" in entry:
        print(f"  MISMATCH: {entry['mismatch']}", flush=True)
    return entry


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------


def _f(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def print_table(result: dict) -> None:
    print(
        f"\nself-study on {result['context']} ({result['user_queries']} user queries, {result['eval_count']} held out) "
        f"on {result['device']}; seconds: synthesis / teacher / training / total (wall)"
    )
    print("| config | exit | kept | train q | gap_closed | top-1 | ROUGE-L | synthesis | teacher | training | total |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, e in result["configs"].items():
        stages = e.get("stage_seconds") or {}
        kept = (e.get("synthesis") or {}).get("kept")  # "-" where nothing was synthesised or the run failed
        total = _f(e.get("wall_seconds"), ".1f") if e.get("reused_from") is None else "reused"
        print(
            f"| {name} | {e.get('exit_code')} | {_f(kept, 'd')} | {_f((e.get('queries') or {}).get('train'), 'd')} "
            f"| {_f(e.get('gap_closed'), '.3f')} | {_f(e.get('top1_agreement'), '.3f')} | {_f(e.get('rouge_l'), '.3f')} | "
            + " | ".join(_f(stages.get(s), ".1f") for s in STAGES)
            + f" | {total} |"
        )
    for name, e in result["configs"].items():
        if "mismatch" in e:
            print(f"note: {name}: {e['mismatch']}")
        if e.get("error"):
            print(f"note: {name} failed: {e['error']}")
    target = result["configs"].get(TARGET["config"])
    if target and target.get("wall_seconds") is not None:
        verdict = "within" if target["wall_seconds"] <= TARGET["wall_seconds"] else "OVER"
        print(
            f"\n{TARGET['config']}: {target['wall_seconds']:.0f} s wall, {verdict} the {TARGET['wall_seconds']:.0f} s "
            f"target ({TARGET['what']})"
        )


def plot(result: dict, plt, path: Path) -> None:
    configs = {n: e for n, e in result["configs"].items() if isinstance(e.get("gap_closed"), (int, float))}
    if not configs:
        print("no configuration finished: PNG skipped")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    only = sorted((e["synthetic"], e) for e in configs.values() if not e["user"])
    if only:
        xs, ys = [n for n, _ in only], [e["gap_closed"] for _, e in only]
        left.plot(xs, ys, "o-", color="C0", label="synthetic only")
        for (n, e), y in zip(only, ys):
            left.annotate(
                f"{e['queries']['train']} train", (n, y), textcoords="offset points", xytext=(4, -12), fontsize=8
            )
    for i, e in enumerate(e for e in configs.values() if e["user"]):
        color = f"C{1 + i}"
        label = f"{e['name']} ({e['gap_closed']:.3f})"
        if e["synthetic"]:
            left.axhline(e["gap_closed"], color=color, ls=":", lw=1)
            left.plot([e["synthetic"]], [e["gap_closed"]], "*", ms=12, color=color, label=label)
        else:
            left.axhline(e["gap_closed"], color=color, ls="--", lw=1.2, label=label)
    xs = sorted({e["synthetic"] for e in configs.values() if e["synthetic"]})
    if xs:
        left.set_xscale("log", base=2)
        left.set_xticks(xs, [str(x) for x in xs])
        left.minorticks_off()
    left.set_xlabel("synthetic queries written (N)")
    left.set_ylabel("held-out gap closed")
    left.set_title(f"held-out gap closed ({result['eval_count']} queries of {Path(result['eval_queries']).name})")
    left.legend(fontsize=8)
    names = list(result["configs"])
    bottom = [0.0] * len(names)
    parts = {
        **{stage: lambda e, stage=stage: (e.get("stage_seconds") or {}).get(stage) for stage in STAGES},
        "evaluation, export": lambda e: e.get("unstaged_seconds"),
        "start-up, model load": lambda e: e.get("startup_seconds"),
    }
    for i, (part, seconds) in enumerate(parts.items()):
        heights = [max(0.0, seconds(result["configs"][name]) or 0.0) for name in names]
        right.bar(names, heights, bottom=bottom, color=f"C{i}", label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, name in enumerate(names):
        e = result["configs"][name]
        text = (
            "reused" if e.get("reused_from") else ("failed" if e.get("exit_code") else _f(e.get("wall_seconds"), ".0f"))
        )
        right.annotate(text, (x, bottom[x]), ha="center", va="bottom", fontsize=8)
    if TARGET["config"] in result["configs"]:
        right.axhline(
            TARGET["wall_seconds"], color="grey", ls=":", lw=1, label=f"target {TARGET['wall_seconds']:.0f} s"
        )
    right.set_ylim(0, max([*bottom, TARGET["wall_seconds"] if TARGET["config"] in result["configs"] else 0]) * 1.3)
    right.set_ylabel("seconds")
    right.set_title("seconds by stage (bar label: wall seconds)")
    right.tick_params(axis="x", labelrotation=20, labelsize=8)
    right.legend(fontsize=8, ncol=3, loc="upper center")
    fig.suptitle(f"fastsoft self-study on {Path(result['context']).name} — {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--context", type=Path, default=DEFAULT_CONTEXT, help="context file (default: the example)")
    parser.add_argument("--eval-queries", type=Path, help="held-out queries (default: <context>.eval.txt)")
    parser.add_argument("--queries", type=Path, help="the user's queries (default: <context>.queries.txt)")
    parser.add_argument("--counts", type=int, nargs="+", default=list(DEFAULT_COUNTS), help="synthetic-only counts")
    parser.add_argument(
        "--mixed", type=int, help="synthetic count of the user + synthetic config (default: middle count)"
    )
    parser.add_argument("--configs", nargs="+", metavar="NAME", help='configurations to run, e.g. "synthetic 64"')
    parser.add_argument(
        "--reuse", action="append", default=[], metavar="NAME=REPORT_JSON", help="take this report instead of running"
    )
    parser.add_argument("--extra", default="", help='flags for every run, e.g. --extra="--steps 2 --model DIR"')
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, help="where the JSON and PNG go (default: benchmarks/results/)")
    parser.add_argument("--label", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)
    args.context = args.context.resolve()
    base = args.context.with_suffix("")
    args.eval_queries = (args.eval_queries or Path(f"{base}.eval.txt")).resolve()
    args.queries = (args.queries or Path(f"{base}.queries.txt")).resolve()
    for flag, path in (("--context", args.context), ("--eval-queries", args.eval_queries), ("--queries", args.queries)):
        if not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    args.counts = sorted(set(args.counts))
    if args.mixed is None:
        args.mixed = args.counts[len(args.counts) // 2]
    if min(args.counts) < 1 or args.mixed < 1:
        parser.error("--counts and --mixed must be at least 1")
    return parser, args


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    users = count_lines(args.queries)
    configs = configurations(args.counts, args.mixed, users)
    by_name = {c["name"]: c for c in configs}
    chosen = args.configs or list(by_name)
    reuse = {}
    for item in args.reuse:
        name, sep, path = item.partition("=")
        if not sep or not path:
            parser.error(f"--reuse {item!r}: expected NAME=REPORT_JSON")
        reuse[name.strip()] = Path(path)
    for name in [*chosen, *reuse]:
        if name not in by_name:
            parser.error(f"unknown configuration {name!r}; the configurations are: {', '.join(map(repr, by_name))}")
    chosen += [name for name in reuse if name not in chosen]
    extra = shlex.split(args.extra)
    device_type = extra[extra.index("--device") + 1] if "--device" in extra[:-1] else None
    import torch

    device_type = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    device = common.device_name(device_type)
    job_id = args.context.stem
    stem = "selfstudy-" + common.file_tag(
        device, "" if args.context == DEFAULT_CONTEXT.resolve() else args.context.stem, args.label
    )
    dirs = [args.out or RESULTS]
    setting = {
        "context": shown(args.context),
        "eval_queries": shown(args.eval_queries),
        "queries": shown(args.queries),
        "context_words": len(args.context.read_text(encoding="utf-8").split()),
        "user_queries": users,
        "eval_count": count_lines(args.eval_queries),
        "extra": args.extra,  # a smoke run (other model, fewer steps) never merges into a real run's file
    }
    previous = read_json(dirs[0] / f"{stem}.json")
    if isinstance(previous, dict):
        differs = [k for k, v in setting.items() if previous.get(k) != v]
        if differs:
            print(
                f"{dirs[0] / stem}.json holds runs of another setting ({', '.join(differs)} differ): "
                "pass --label or --out to keep both",
                file=sys.stderr,
            )
            return 2
    else:
        previous = {}
    invocation = common.run_info(device, "bench_selfstudy.py", argv)
    try:
        invocation["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        invocation["commit"] = None
    result = {
        **invocation,
        **setting,
        "target": TARGET,
        "configs": dict(previous.get("configs", {})),
        "invocations": [*previous.get("invocations", []), invocation],
    }
    order = [c["name"] for c in configs]

    def ordered(entries: dict) -> dict:  # this invocation's configurations in table order, then any others kept
        return {
            **{n: entries[n] for n in order if n in entries},
            **{n: e for n, e in entries.items() if n not in order},
        }

    result["configs"] = ordered(result["configs"])
    print(f"self-study benchmark on {device}: {', '.join(chosen)}; results in {dirs[0] / stem}.json", flush=True)
    runs = args.runs.resolve() if args.runs else Path(tempfile.mkdtemp(prefix="fastsoft-selfstudy-"))
    runs.mkdir(parents=True, exist_ok=True)

    def body():
        for name in [n for n in order if n in chosen]:
            config = by_name[name]
            if name in reuse:
                entry = reuse_config(config, reuse[name], job_id)
            else:
                entry = run_config(config, args, runs, job_id)
            result["configs"][name] = {"name": name, "synthetic": config["synthetic"], "user": config["user"], **entry}
            result["configs"] = ordered(result["configs"])
            common.save(result, stem, dirs)  # a stopped run keeps every configuration measured so far

    try:
        status = common.run_keeping_partial(result, body)
    finally:
        if not args.runs:
            shutil.rmtree(runs, ignore_errors=True)
    print_table(result)
    print()
    print(common.save(result, stem, dirs, plot))
    failed = [n for n in chosen if (result["configs"].get(n) or {}).get("exit_code") not in (0, None)]
    return status or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
