"""Command line: ``fastsoft compress`` and ``fastsoft generate``.

A user's mistake ends with one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from fastsoft.config import CompressConfig
from fastsoft.errors import FastsoftError
from fastsoft.io.checkpoint import CHECKPOINT

HELP = {
    "prompt_length": "soft prompt length P (virtual tokens)",
    "steps": "step budget per job",
    "lr": "Adam learning rate",
    "warmup": "warmup steps",
    "batch_queries": "training queries of a job per step",
    "tol": "convergence tolerance on the mean loss",
    "patience": "steps averaged for the convergence test",
    "objective": "kl | answer | supervised, or a mixture like kl:0.7,answer:0.3",
    "teacher": "teacher cache kind: dense | topk | sampled | hidden",
    "top_k": "ids kept by the topk teacher",
    "samples": "draws of the sampled teacher",
    "cache_dtype": "bf16 | fp32 storage of dense/hidden caches",
    "temperature": "loss temperature",
    "init": "context (evenly spaced context tokens) | pooled | vocab | text | random",
    "init_text": "text for --init text",
    "placement": "template (σ where the context was) | first (σ at position 0, identical under PEFT)",
    "template": "auto | chat | plain",
    "max_new_tokens": "longest teacher/student answer",
    "eval_fraction": "share of queries held out when no eval queries are given",
    "slots": "prompt slots trained at once",
    "token_budget": "packed tokens per step",
    "seed": "random seed",
    "backend": "softmax_kl backend: auto | triton | cpp | reference",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsoft", description="Compress contexts into soft prompts for a frozen LLM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="learn soft prompts for one context or a JSONL of jobs")
    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--context", help="text file holding one context")
    source.add_argument("--jobs", help="JSONL file of jobs {id, context, queries, answers?, eval_queries?}")
    c.add_argument("--queries", help="training queries, one per line (with --context)")
    c.add_argument("--eval-queries", help="held-out queries, one per line (with --context)")
    c.add_argument("--answers", help="ground-truth answers, one per line, aligned with --queries")
    c.add_argument("--job-id", help="id of the --context job (default: the context file's name)")
    c.add_argument("--out", required=True, help="output folder: one sub-folder per job")
    c.add_argument("--cache", help="teacher cache folder (default: OUT/cache)")
    c.add_argument("--overwrite", action="store_true", help="replace finished jobs' exports in OUT")
    c.add_argument(
        "--resume", action="store_true", help="continue the run checkpointed in OUT (same jobs and settings)"
    )
    c.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (default: 10)")
    c.add_argument(
        "--rebuild-cache",
        action="store_true",
        help="rebuild a mismatched or corrupted teacher cache instead of refusing it",
    )
    c.add_argument(
        "--split-jobs",
        action="store_true",
        help="under torchrun: every rank shares every job (gradient all-reduce) instead of sharding jobs across ranks",
    )
    _model_args(c)
    for f in fields(CompressConfig):
        c.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default) if f.default is not None else str,
            default=f.default,
            help=f"{HELP[f.name]} (default: {f.default})",
        )
    g = sub.add_parser("generate", help="answer a query with a saved soft prompt")
    g.add_argument("--prompt", required=True, help="a folder written by `fastsoft compress` (OUT/<job id>)")
    g.add_argument("--query", required=True, help="the question")
    g.add_argument("--max-new-tokens", type=int, default=64)
    _model_args(g)
    return parser


def _model_args(parser) -> None:
    parser.add_argument(
        "--model", help="Hugging Face model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(args, local_rank: int = 0):
    import torch

    from fastsoft.models import load_model

    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FastsoftError("--device cuda was asked for but no CUDA device is available")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    print(
        f"fastsoft: loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} on {device} in {dtype}",
        file=sys.stderr,
    )
    return load_model(args.model, dtype=dtype, device=device)


def _compress(args) -> int:
    from fastsoft.api import compress
    from fastsoft.data.jobs import job_from_files, read_jobs
    from fastsoft.distributed import Dist, init_from_env, shutdown
    from fastsoft.io.report import format_table

    if args.context:
        if not args.queries:
            raise FastsoftError("--context needs --queries FILE (one query per line)")
        jobs = [job_from_files(args.context, args.queries, args.eval_queries, args.answers, args.job_id)]
    else:
        if args.queries or args.eval_queries or args.answers:
            raise FastsoftError(
                "--queries, --eval-queries and --answers go with --context; put them inside the --jobs file instead"
            )
        jobs = read_jobs(args.jobs)
    config = {f.name: getattr(args, f.name) for f in fields(CompressConfig)}
    CompressConfig(**config).validate()
    if args.checkpoint_every < 1:
        raise FastsoftError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    dist = init_from_env()
    try:
        if dist.active:
            split = args.split_jobs or len(jobs) < dist.world
            dist = Dist(dist.rank, dist.world, dist.local_rank, split)
            mine = jobs if split else jobs[dist.rank :: dist.world]
        else:
            mine = jobs
        loaded = _load(args, dist.local_rank)
        started = time.perf_counter()
        reports = compress(
            mine,
            loaded,
            args.out,
            cache=args.cache,
            overwrite=args.overwrite,
            progress=not args.no_progress and dist.rank == 0,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            rebuild_cache=args.rebuild_cache,
            dist=dist,
            **config,
        )
        gathered = dist.gather(reports)
    finally:
        shutdown(dist)
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
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
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
    from fastsoft.data.templates import make_template
    from fastsoft.eval.generate import generate
    from fastsoft.io.export import load_prompt

    prompt, template, meta = load_prompt(args.prompt)
    loaded = _load(args)
    if meta and meta.get("model_fingerprint") != loaded.fingerprint:
        raise FastsoftError(
            f"the soft prompt in {args.prompt} was trained for another model; pass the same --model it was trained with"
        )
    if prompt.shape[1] != loaded.hidden_size:
        raise FastsoftError(f"the soft prompt has hidden size {prompt.shape[1]}, the model {loaded.hidden_size}")
    template = template or make_template(loaded.tokenizer, "first")
    print(generate(loaded, template, prompt, args.query, args.max_new_tokens))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _compress(args) if args.command == "compress" else _generate(args)
    except FastsoftError as error:
        print(f"fastsoft: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = args.command == "compress" and (Path(args.out) / CHECKPOINT).exists()
        print(
            "fastsoft: interrupted" + ("; checkpoint saved, continue with --resume" if resumable else ""),
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
