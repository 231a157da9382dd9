"""Command line: ``fastsoft compress`` and ``fastsoft generate``.

A user's mistake ends with one sentence on stderr and exit status 2, never a traceback. A run stopped by Ctrl-C or
SIGTERM checkpoints at its next safe point (:mod:`fastsoft.signals`) and exits with 130 or 143; before the run starts
(while the model loads) SIGTERM ends the process at once and Ctrl-C exits with 130: nothing is written then.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from fastsoft.config import CompressConfig, GenerateOptions, ModelOptions, RunOptions, settings_of
from fastsoft.errors import FastsoftError
from fastsoft.signals import Interrupted


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error, like every other mistake (no usage block)."""

    def error(self, message):
        self.exit(2, f"fastsoft: error: {message} (see `{self.prog} --help`)\n")


def _add_settings(parser, cls, title: str) -> None:
    """One flag per field of the settings dataclass ``cls``, with the field's help text (``fastsoft/config.py``)."""
    group = parser.add_argument_group(title)
    for s in settings_of(cls):
        text = s.help.replace("%", "%%")
        if s.kind is bool:  # a switch; one that is on by default also gets its --no- form
            action = argparse.BooleanOptionalAction if s.default else "store_true"
            group.add_argument(s.flag, action=action, default=bool(s.default), help=text)
            continue
        if s.default is not None:
            text += f" (default: {s.default})"
        metavar = "{" + ",".join(s.choices) + "}" if s.choices else None
        group.add_argument(s.flag, type=s.kind, default=s.default, metavar=metavar, help=text)


def _build(cls, args):
    """The settings ``cls`` from the parsed flags; refuses a bad one with one sentence (FastsoftError)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastsoft", description="Compress contexts into soft prompts for a frozen LLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="learn soft prompts for one context or a JSONL of jobs")
    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--context", help="text file holding one context")
    source.add_argument("--jobs", help="JSONL file of jobs {id, context, queries?, answers?, eval_queries?}")
    c.add_argument(
        "--queries", help="training queries, one per line (with --context; without any, the model writes them)"
    )
    c.add_argument("--eval-queries", help="held-out queries, one per line (with --context)")
    c.add_argument("--answers", help="ground-truth answers, one per line, aligned with --queries")
    c.add_argument("--job-id", help="id of the --context job (default: the context file's name)")
    c.add_argument("--out", required=True, help="output folder: one sub-folder per job")
    c.add_argument("--cache", help="teacher cache folder (default: OUT/cache)")
    c.add_argument(
        "--split-jobs",
        action="store_true",
        help="under torchrun: every rank shares every job (gradient all-reduce) instead of sharding jobs across ranks",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_settings(c, RunOptions, "run")
    _add_settings(c, ModelOptions, "model")
    _add_settings(c, CompressConfig, "settings (stored with every export and checkpoint)")
    g = sub.add_parser("generate", help="answer a query with a saved soft prompt")
    g.add_argument("--prompt", required=True, help="a folder written by `fastsoft compress` (OUT/<job id>)")
    g.add_argument("--query", required=True, help="the question")
    g.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # accepted as before; nothing to show
    _add_settings(g, GenerateOptions, "generation")
    _add_settings(g, ModelOptions, "model")
    return parser


def _load(options: ModelOptions, local_rank: int = 0):
    from fastsoft.frozen.loading import load_model

    device, dtype = options.resolve(local_rank)
    print(
        f"fastsoft: loading {options.model or 'the default model (SmolLM2-135M-Instruct)'} on {device} in {dtype}",
        file=sys.stderr,
    )
    return load_model(options.model, dtype=dtype, device=device)


def _compress(args) -> int:
    # Every setting first, the backend on the device it will run on included: all before any file is read or
    # the model loads (which takes about 40 s for the real one).
    config = _build(CompressConfig, args)
    options = _build(RunOptions, args)
    model = _build(ModelOptions, args)
    config.validate(device=model.resolve()[0])

    from fastsoft.api import compress
    from fastsoft.data.jobs import job_from_files, read_jobs
    from fastsoft.distributed import Dist, init_from_env, shutdown
    from fastsoft.io.atomic import write_json
    from fastsoft.io.outputs import check_run_folders
    from fastsoft.io.report import format_table
    from fastsoft.teacher.cache import cache_folder

    if args.context:
        jobs = [job_from_files(args.context, args.queries, args.eval_queries, args.answers, args.job_id)]
    else:
        if args.queries or args.eval_queries or args.answers:
            raise FastsoftError(
                "--queries, --eval-queries and --answers go with --context; put them inside the --jobs file instead"
            )
        jobs = read_jobs(args.jobs)
    for job in jobs:  # the engine drops training queries that are also held out; refuse here what that leaves empty
        cleaned, counts = job.deduplicated()
        if not cleaned.queries and not config.makes_queries(False):
            left = f" left once the {counts['held_out_overlap']} that are also --eval-queries are dropped"
            raise FastsoftError(
                f"job {job.id!r} has no queries{left if counts['held_out_overlap'] else ''} and --synthesize and "
                "--topic-queries are 0: give queries (--queries FILE, or in the jobs file), or let fastsoft make them "
                "(--synthesize N, --topic-queries N)"
            )
    dist = init_from_env()
    clean = False
    try:
        if dist.active:
            split = args.split_jobs or len(jobs) < dist.world
            dist = Dist(dist.rank, dist.world, dist.local_rank, split)
            mine = jobs if split else jobs[dist.rank :: dist.world]
        else:
            mine = jobs
        rank = dist.rank if dist.active else None
        check_run_folders(Path(args.out), cache_folder(Path(args.out), args.cache, rank), dist.rank)
        loaded = _load(model, dist.local_rank)
        started = time.perf_counter()
        reports = compress(
            mine,
            loaded,
            args.out,
            cache=args.cache,
            progress=not args.no_progress and dist.rank == 0,
            dist=dist,
            **asdict(options),
            **config.to_dict(),
        )
        gathered = dist.gather(reports)
        clean = True
    finally:
        shutdown(dist, clean)
    if gathered is None:  # not rank 0: rank 0 reports for everyone
        return 0
    parts = gathered[:1] if dist.split else gathered  # split: rank 0 holds the evaluated reports
    by_id = {r["job_id"]: r for part in parts for r in part}
    reports = [by_id[job.id] for job in jobs]
    done = [r for r in reports if "error" not in r]
    summary = {
        "seconds": time.perf_counter() - started,
        "jobs": len(reports),
        "done": len(done),
        "failed": len(reports) - len(done),
        "ranks": dist.world,
        "reports": [{k: v for k, v in r.items() if k not in ("losses", "samples")} for r in reports],
    }
    write_json(Path(args.out) / "summary.json", summary)
    if done:
        print(format_table(done))
    for r in reports:
        if "error" in r:
            print(f"fastsoft: job {r['job_id']!r} failed: {r['error']}", file=sys.stderr)
    print(
        f"fastsoft: {len(done)} of {len(reports)} jobs done in {summary['seconds']:.0f} s; outputs in {args.out}",
        file=sys.stderr,
    )
    return 0 if len(done) == len(reports) else 1


def _generate(args) -> int:
    options = _build(GenerateOptions, args)
    model = _build(ModelOptions, args)

    from fastsoft.data.templates import make_template
    from fastsoft.eval.generate import generate
    from fastsoft.io.export import load_prompt

    prompt, template, meta = load_prompt(args.prompt)
    loaded = _load(model)
    if meta and meta.get("model_fingerprint") != loaded.fingerprint:
        raise FastsoftError(
            f"the soft prompt in {args.prompt} was trained for another model; pass the same --model it was trained with"
        )
    if prompt.shape[1] != loaded.hidden_size:
        raise FastsoftError(f"the soft prompt has hidden size {prompt.shape[1]}, the model {loaded.hidden_size}")
    template = template or make_template(loaded.tokenizer, "first")
    print(generate(loaded, template, prompt, args.query, options.max_new_tokens))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _compress(args) if args.command == "compress" else _generate(args)
    except FastsoftError as error:
        print(f"fastsoft: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # outside a run's own handling (which checkpoints first): still one sentence
        print(
            f"fastsoft: error: {error.strerror or error}{f' ({error.filename})' if error.filename else ''}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as interrupt:  # Interrupted: the run stopped at a safe point and checkpointed
        stopped = isinstance(interrupt, Interrupted)
        what = "terminated (SIGTERM)" if stopped and interrupt.signum == signal.SIGTERM else "interrupted"
        resumable = stopped and args.command == "compress" and any(Path(args.out).glob("checkpoint*.safetensors"))
        print(
            f"fastsoft: {what}" + ("; checkpoint saved, continue with --resume" if resumable else ""), file=sys.stderr
        )
        return interrupt.exit_status if stopped else 130


if __name__ == "__main__":
    raise SystemExit(main())
