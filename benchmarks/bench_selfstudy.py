"""Self-study against hand-written queries: held-out quality and seconds by stage of ``fastsoft compress`` on one
context, when the model writes its own training queries (16, 64, 256 of them), when fastsoft asks template questions
about the context's names, numbers and identifiers (topic queries, alone and with 64 model-written ones), when it
gets the user's queries, and with user and model-written queries both.

Every configuration is one ``fastsoft compress`` in a fresh subprocess, timed alone (wall seconds around the
subprocess: start-up, model load, self-study, teacher, training, evaluation, export), with the context's held-out
queries as the evaluation set (``--eval-queries``, never trained on: self-study drops a request that repeats one).
Every command passes both ``--synthesize`` and ``--topic-queries``, so no configuration depends on their defaults
(64 and 64 for a job without queries, 0 and 0 for one with queries). On the shipped example
(``examples/marrowick_island.txt``, 8 held-out queries, 32 user queries) the configurations and their commands are
(``<runs>`` a temporary folder; ``--extra`` flags go at the end of each)::

    synthetic 16              python -m fastsoft compress --context examples/marrowick_island.txt \\
                                  --eval-queries examples/marrowick_island.eval.txt --out <runs>/synthetic-16 \\
                                  --no-progress --synthesize 16 --topic-queries 0
    synthetic 64              ... --out <runs>/synthetic-64 --no-progress --synthesize 64 --topic-queries 0
    synthetic 256             ... --out <runs>/synthetic-256 --no-progress --synthesize 256 --topic-queries 0
    topics 64                 ... --out <runs>/topics-64 --no-progress --synthesize 0 --topic-queries 64
    topics 64 + synthetic 64  ... --out <runs>/topics-64-synthetic-64 --no-progress --synthesize 64 \\
                                  --topic-queries 64
    user 32                   ... --out <runs>/user-32 --no-progress --queries examples/marrowick_island.queries.txt \\
                                  --synthesize 0 --topic-queries 0
    user 32 + synthetic 64    ... --out <runs>/user-32-synthetic-64 --no-progress \\
                                  --queries examples/marrowick_island.queries.txt --synthesize 64 --topic-queries 0

``topics 64 + synthetic 64`` is what the README's first command does by default (no queries of its own). Topic
queries come two a topic, so ``--topic-queries 64`` asks at most 64: the example has 14 topics, 28 questions.

Each run's ``<runs>/<config>/<context stem>/report.json`` gives, per configuration: the held-out ``gap_closed``,
``top1_agreement``, ``rouge_l``, ``kl_soft``, ``kl_none`` (and ``exact_match``), ``eval_source``, the synthesis counts
(kept, dropped by reason; topic queries and model-written ones together), the train / eval query counts and
``stage_seconds`` (synthesis, teacher, training); beside them ``topic_queries`` (asked: how many the context gives for
the configuration's count, counted here without the model; kept: the ``"topic"`` lines of the run's
``synthetic_queries.jsonl``), the subprocess's wall seconds and exit status (a failed run is recorded with its error
and stderr tail; the benchmark goes on). The README's first command is meant to take under 10 minutes on this
project's 2-core CPU machine: that target is the ``topics 64 + synthetic 64`` configuration's wall seconds here.

    # the seven configurations above on SmolLM2-135M (2 CPU cores: about an hour, estimated)
    python benchmarks/bench_selfstudy.py
    # the second context (its queries: user 16): selfstudy-<device>-quillstore.json
    python benchmarks/bench_selfstudy.py --context examples/quillstore.txt \
        --eval-queries examples/quillstore.eval.txt --queries examples/quillstore.queries.txt
    # the topic configurations only, added to the file an earlier invocation left
    python benchmarks/bench_selfstudy.py --configs "topics 64" "topics 64 + synthetic 64"
    # one configuration, another taken from a finished run (the README's first command is "topics 64 + synthetic 64")
    python benchmarks/bench_selfstudy.py --configs "synthetic 64" \
        --reuse "topics 64 + synthetic 64=runs/marrowick/marrowick_island/report.json"

``--eval-queries`` and ``--queries`` default to ``<context>.eval.txt`` and ``<context>.queries.txt`` beside the
context; the user configurations are named from the number of query lines (a context with no queries file has
none). ``--counts`` sets the synthetic-only counts, ``--mixed N`` the synthetic count of both combinations
(``topics + synthetic``, ``user + synthetic``; default the middle count), ``--topics N`` the topic count of both
topic configurations (default 64, at least 2). ``--configs`` runs a subset; ``--reuse NAME=REPORT_JSON`` takes a
finished run's report for a configuration instead of running it
(recorded as reused, and from where; its wall seconds are unknown). ``--extra`` adds flags to every run
(``--extra="--steps 2 --model DIR"``; not ``--synthesize`` or ``--topic-queries``, which the configurations set).
Smoke run on a tiny model: ``--counts 4 --topics 4`` with ``--extra="--model DIR --steps 2 --prompt-length 4
--max-new-tokens 4 --synthesis-temperature 3 --synthesis-top-p 1"`` and ``--out /tmp/...``
(``tests/e2e/test_benchmarks.py``, on the tests' chatty tiny model).

Writes ``selfstudy-<device>[-<context stem>][-<label>].json`` into ``benchmarks/results/`` (or ``--out``) after every
configuration, merged with the configurations an earlier invocation left in that file (so they can be run in separate
invocations; a rerun replaces its own). An entry stored before topic queries existed has no ``topics`` field: it ran
without them and counts as topics 0 (its command has no ``--topic-queries``; the file still merges). Prints a table
(topic queries and model-written queries, kept / asked) and draws the ``.png``: left, held-out gap closed against the
number of synthetic queries (no user or topic queries), the other configurations as horizontal lines (no synthetic
queries) or markers at their synthetic count (stars with user queries, diamonds with topic queries); right, seconds by
stage per configuration (the report's three stages, then evaluation and export inside ``fastsoft compress``, then
start-up and model load around it). Without matplotlib the PNG is skipped (one line says so). A file holding runs of
another context or other ``--extra`` flags is never merged into (exit status 2: pass ``--label`` or ``--out``). Exit
status 1 when a configuration run here failed (it is in the JSON all the same).
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
DEFAULT_TOPICS = 64
TARGET = {
    "config": "topics 64 + synthetic 64",
    "wall_seconds": 600.0,
    "what": "the README's first command, under 10 minutes",
}
METRICS = ("gap_closed", "top1_agreement", "rouge_l", "kl_soft", "kl_none", "exact_match")
STAGES = ("synthesis", "teacher", "training")
FROM_REPORT = ("eval_source", "synthesis", "queries", "steps", "stop_reason", "context_tokens", "prompt_length")


# ------------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    """Non-empty lines, as ``fastsoft compress`` reads a query file."""
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def configurations(counts: list[int], mixed: int, users: int, topics: int) -> list[dict]:
    """Every configuration in table order: synthetic only (ascending), topics only, topics + synthetic, user only,
    user + synthetic (the user ones only when there are user queries)."""

    def config(name: str, synthetic: int = 0, topics: int = 0, user: int = 0) -> dict:
        slug = name.replace(" + ", "-").replace(" ", "-")
        return {"name": name, "slug": slug, "synthetic": synthetic, "topics": topics, "user": user}

    return [
        *(config(f"synthetic {n}", synthetic=n) for n in counts),
        config(f"topics {topics}", topics=topics),
        config(f"topics {topics} + synthetic {mixed}", synthetic=mixed, topics=topics),
        *(
            [
                config(f"user {users}", user=users),
                config(f"user {users} + synthetic {mixed}", synthetic=mixed, user=users),
            ]
            if users
            else []
        ),
    ]


def topics_asked(context: Path, topics: int) -> int:
    """How many topic queries ``--topic-queries topics`` asks about ``context`` (two a topic, at most ``topics``)."""
    from fastsoft.teacher.topics import topic_queries

    return len(topic_queries(context.read_text(encoding="utf-8"), topics)) if topics else 0


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
    cmd += ["--synthesize", str(config["synthetic"]), "--topic-queries", str(config["topics"])]
    return [*cmd, *shlex.split(args.extra)]


# ------------------------------------------------------------------------------------------------------
# one configuration: run it, or take a finished run's report
# ------------------------------------------------------------------------------------------------------


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def topics_kept(folder: Path) -> int | None:
    """The kept topic queries in a job folder's ``synthetic_queries.jsonl``, or None when it cannot be read."""
    try:
        lines = (Path(folder) / "synthetic_queries.jsonl").read_text().splitlines()
        return sum(json.loads(line).get("kind") == "topic" for line in lines if line.strip())
    except (OSError, ValueError, AttributeError):
        return None


def from_report(entry: dict, report: dict, config: dict, job_id: str, folder: Path) -> None:
    """Copy the report's numbers into ``entry`` (with the topic queries kept in the job ``folder``) and note anything
    that does not match the configuration."""
    for key in (*METRICS, *FROM_REPORT):
        entry[key] = report.get(key)
    entry["stage_seconds"] = {stage: (report.get("stage_seconds") or {}).get(stage, 0.0) for stage in STAGES}
    asked = config["topics_asked"]
    kept = topics_kept(folder) if report.get("synthesis") else 0  # no synthesis: nothing made, no file
    entry["topic_queries"] = {"asked": asked, "kept": 0 if kept is None and not asked else kept}
    checks = []
    if report.get("job_id") != job_id:
        checks.append(f"job id {report.get('job_id')!r}, not {job_id!r}")
    if report.get("eval_source") != "eval_queries":
        checks.append(f"held-out queries from {report.get('eval_source')!r}, not the --eval-queries file")
    synthesis = report.get("synthesis")
    written = synthesis["kept"] + sum(synthesis["dropped"].values()) if synthesis else 0
    if written != config["synthetic"] + asked:  # the report counts topic queries and model-written ones together
        checks.append(
            f"{written} synthetic and topic queries made, not {config['synthetic']} written + {asked} topic queries"
        )
    if config["user"] and (report.get("queries") or {}).get("train", 0) < config["user"]:
        checks.append(f"{(report.get('queries') or {}).get('train')} training queries, fewer than {config['user']}")
    if checks:
        entry["mismatch"] = "; ".join(checks)


def split_seconds(entry: dict) -> None:
    """The seconds outside the report's stages: ``unstaged_seconds`` inside ``fastsoft compress`` (evaluation, export,
    cache writes) and ``startup_seconds`` around it (interpreter, imports, model load, the closing table)."""
    staged, compress, wall = sum(entry["stage_seconds"].values()), entry["compress_seconds"], entry["wall_seconds"]
    # a report with no stage seconds (older code) cannot say what was outside the stages: unknown, not all of it
    entry["unstaged_seconds"] = compress - staged if compress is not None and staged > 0 else None
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
    from_report(entry, report, config, job_id, out / job_id)
    split_seconds(entry)
    print(
        f"  done in {entry['wall_seconds']:.0f} s: gap closed {entry['gap_closed']:.3f}, "
        f"{entry['queries']['train']} training queries"
        + (f"; MISMATCH: {entry['mismatch']}" if "mismatch" in entry else ""),
        flush=True,
    )
    return entry


REUSE_KEYS = ("steps", "prompt_length", "lr", "seed", "teacher")  # settings a reused run must share with the others


def run_settings(extra: list[str]) -> dict:
    """The ``REUSE_KEYS`` settings this invocation's runs train with: the defaults, ``--extra``'s flags over them."""
    from fastsoft.config import CompressConfig

    defaults = CompressConfig()
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for key in REUSE_KEYS:
        value = getattr(defaults, key)
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    return vars(parser.parse_known_args(extra)[0])


def reused_settings(path: Path, keys: tuple[str, ...] = REUSE_KEYS) -> dict:
    """The ``keys`` settings a finished run's report ran with (its job folder's ``fastsoft.json``); a key its
    (older) export does not record is left out."""
    meta = read_json(Path(path).parent / "fastsoft.json")
    settings = (meta.get("config") or {}) if isinstance(meta, dict) else {}
    return {k: settings[k] for k in keys if settings.get(k) is not None}


def reuse_config(config: dict, path: Path, job_id: str) -> dict:
    """A finished run's report for ``config``: its numbers, where it came from, the settings it ran with."""
    path = Path(path)
    report = read_json(path)
    if not isinstance(report, dict):
        raise SystemExit(f"--reuse {config['name']}={path}: not a readable report.json")
    summary = read_json(path.parent.parent / "summary.json")
    entry = {
        "command": None,
        "extra": None,
        "reused_from": shown(path),
        "reused_settings": reused_settings(path, ("synthesize", "topic_queries", *REUSE_KEYS)),
        "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)),
        "wall_seconds": None,  # not timed here; compress_seconds (without start-up and model load) when known
        "compress_seconds": summary.get("seconds") if isinstance(summary, dict) else None,
        "exit_code": 0,
    }
    from_report(entry, report, config, job_id, path.parent)
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


def kept_of(e: dict) -> tuple[str, str]:
    """The table's topic queries (kept / asked) and model-written queries (kept / written) of an entry: "-" where
    the configuration has none or the run failed, "?" for a kept count that is unknown."""
    kept = (e.get("synthesis") or {}).get("kept")  # topic queries and model-written ones together
    if kept is None:
        return "-", "-"
    topic = e.get("topic_queries") or {"asked": 0, "kept": 0}  # an entry from before topic queries: none
    model = None if topic["kept"] is None else kept - topic["kept"]
    known = lambda n: "?" if n is None else str(n)
    return (
        f"{known(topic['kept'])}/{topic['asked']}" if e.get("topics") else "-",
        f"{known(model)}/{e['synthetic']}" if e.get("synthetic") else "-",
    )


def print_table(result: dict) -> None:
    print(
        f"\nself-study on {result['context']} ({result['user_queries']} user queries, {result['eval_count']} held out) "
        f"on {result['device']}; queries kept / asked; seconds: synthesis / teacher / training / total (wall)"
    )
    print(
        "| config | exit | topic q | model q | train q | gap_closed | top-1 | ROUGE-L | synthesis | teacher | training "
        "| total |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, e in result["configs"].items():
        stages = e.get("stage_seconds") or {}
        topics, model = kept_of(e)
        total = _f(e.get("wall_seconds"), ".1f") if e.get("reused_from") is None else "reused"
        print(
            f"| {name} | {e.get('exit_code')} | {topics} | {model} | {_f((e.get('queries') or {}).get('train'), 'd')} "
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    only = sorted((e["synthetic"], e) for e in configs.values() if not e["user"] and not e.get("topics"))
    if only:
        xs, ys = [n for n, _ in only], [e["gap_closed"] for _, e in only]
        left.plot(xs, ys, "o-", color="C0", label="synthetic only")
        for (n, e), y in zip(only, ys):
            left.annotate(
                f"{e['queries']['train']} train", (n, y), textcoords="offset points", xytext=(4, -12), fontsize=8
            )
    # the others: a line at their gap closed, and a marker at their synthetic count (diamond: with topic queries)
    for i, e in enumerate(e for e in configs.values() if e["user"] or e.get("topics")):
        color = f"C{1 + i}"
        label = f"{e['name']} ({e['gap_closed']:.3f})"
        if e["synthetic"]:
            left.axhline(e["gap_closed"], color=color, ls=":", lw=1)
            marker, size = ("D", 8) if e.get("topics") else ("*", 12)
            left.plot([e["synthetic"]], [e["gap_closed"]], marker, ms=size, color=color, label=label)
        else:
            left.axhline(e["gap_closed"], color=color, ls="-." if e.get("topics") else "--", lw=1.2, label=label)
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
    right.tick_params(axis="x", labelrotation=30, labelsize=8)
    plt.setp(right.get_xticklabels(), ha="right", rotation_mode="anchor")
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
        "--mixed", type=int, help="synthetic count of the topics / user + synthetic configs (default: middle count)"
    )
    parser.add_argument(
        "--topics", type=int, default=DEFAULT_TOPICS, help="--topic-queries of the topics configs (default 64)"
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
    if args.queries is None and not Path(f"{base}.queries.txt").is_file():
        args.queries = None  # a context without training queries: no user configurations
    else:
        args.queries = (args.queries or Path(f"{base}.queries.txt")).resolve()
    for flag, path in (("--context", args.context), ("--eval-queries", args.eval_queries), ("--queries", args.queries)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    args.counts = sorted(set(args.counts))
    if args.mixed is None:
        args.mixed = args.counts[len(args.counts) // 2]
    if min(args.counts) < 1 or args.mixed < 1:
        parser.error("--counts and --mixed must be at least 1")
    if args.topics < 2:
        parser.error("--topics must be at least 2 (topic queries come two a topic)")
    for flag in ("--synthesize", "--topic-queries"):
        if any(word == flag or word.startswith(f"{flag}=") for word in shlex.split(args.extra)):
            parser.error(f"--extra must not set {flag}: the configurations set it")
    return parser, args


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    users = count_lines(args.queries) if args.queries else 0
    configs = configurations(args.counts, args.mixed, users, args.topics)
    for config in configs:
        config["topics_asked"] = topics_asked(args.context, config["topics"])
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
    runs_with = run_settings(extra)
    for name, path in reuse.items():  # a reused run of another prompt length (say) would not be comparable
        differs = [
            f"{k} {v} (these runs: {runs_with[k]})" for k, v in reused_settings(path).items() if v != runs_with[k]
        ]
        if differs:
            parser.error(f"--reuse {name}={path} ran with {', '.join(differs)}: pass the same settings in --extra")
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
        "queries": shown(args.queries) if args.queries else None,
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
    invocation = common.run_info(device, "bench_selfstudy.py", argv)  # its checkout names the commit
    result = {
        **invocation,
        **setting,
        "target": TARGET,
        # an entry stored before topic queries existed ran without them (and its command has no --topic-queries)
        "configs": {name: {"topics": 0, **entry} for name, entry in previous.get("configs", {}).items()},
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
            counts = {k: config[k] for k in ("synthetic", "topics", "user")}
            result["configs"][name] = {"name": name, **counts, **entry}
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
