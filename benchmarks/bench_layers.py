"""The decoder layer's fused ops ``rms_norm``, ``swiglu`` and ``rope`` (C++, ``csrc/layers.cpp``) against the
transformers formulas they replace, forward and forward + backward, on CPU, fp32.

The reference is transformers' own code: ``LlamaRMSNorm`` (its weight frozen), ``ACT2FN["silu"](gate) * up`` and
``apply_rotary_pos_emb``. The shapes are SmolLM2-135M's (H = 576, 9 query heads and 3 KV heads of 64, intermediate
1536) at ``--rows`` rows (172: a student step's packed row on the shipped example; 1024: a long row, as the teacher
pass runs):

- ``rms_norm``: ``x [rows, 576]``, frozen ``weight [576]``, eps 1e-5; the backward for ``x``;
- ``swiglu``: ``gate, up [rows, 1536]``; the backward for both;
- ``rope``: ``q [1, 9, rows, 64]`` and ``k [1, 3, rows, 64]`` in the projections' ``[B, L, heads, D]`` memory,
  frozen ``cos, sin [1, rows, 64]``; the backward for ``q`` and ``k``.

``fwd``: under ``no_grad`` (the teacher pass, evaluation, generation); ``fwd+bwd``: the inputs requiring grad, then
the backward of a fixed output gradient (the student step). Each pair's outputs and gradients are checked equal
(1e-5) before timing; the two sides take turns sample by sample, a sample being ``--inner`` calls in a row; the
median and the 20 / 80 % quantiles over ``--reps`` samples.

    python benchmarks/bench_layers.py              # about a minute on the 2-core CI machine
    python benchmarks/bench_layers.py --threads 1  # one thread (when other work holds a core: see RESULTS.md)
    python benchmarks/bench_layers.py --quick      # seconds: 16 rows, a few samples

Writes ``benchmarks/results/layers-<device>[-<n>thread(s)][-quick].json``, its rows into ``all.csv`` and the figure
``layers-<device>[-quick].png`` (``plot.py``), and prints a table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout on sys.path)

BENCHMARK = "layers"
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, EPS = 576, 9, 3, 64, 1536, 1e-5  # SmolLM2-135M
ROWS, QUICK_ROWS = (172, 1024), (16,)
FUSED, REFERENCE = "fused (C++)", "transformers formula"
OPS = ("rms_norm", "swiglu", "rope")


def inputs(op: str, rows: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """``(activations, frozen tensors, shape)`` of one op at ``rows`` rows."""
    if op == "rms_norm":
        return (
            [torch.randn(rows, HIDDEN, generator=gen) * 4],
            [torch.randn(HIDDEN, generator=gen)],
            f"{rows} x {HIDDEN}",
        )
    if op == "swiglu":
        gate, up = (torch.randn(rows, INTERMEDIATE, generator=gen) * s for s in (3, 1))
        return [gate, up], [], f"{rows} x {INTERMEDIATE}"
    q = torch.randn(1, rows, HEADS, HEAD_DIM, generator=gen).transpose(1, 2)  # [B, L, heads, D] memory
    k = torch.randn(1, rows, KV_HEADS, HEAD_DIM, generator=gen).transpose(1, 2)
    angle = torch.randn(1, rows, HEAD_DIM // 2, generator=gen).repeat(1, 1, 2)
    return [q, k], [angle.cos(), angle.sin()], f"{rows} rows, {HEADS} + {KV_HEADS} heads x {HEAD_DIM}"


def functions(op: str, frozen: list[torch.Tensor]) -> dict:
    """``{provider: fn(*activations) -> tuple of outputs}``: the fused op and transformers' formula."""
    from transformers.activations import ACT2FN
    from transformers.models.llama import modeling_llama

    from fastsoft.ops.layers import rms_norm, rope, swiglu

    if op == "rms_norm":
        (weight,) = frozen
        norm = modeling_llama.LlamaRMSNorm(HIDDEN, eps=EPS)
        with torch.no_grad():
            norm.weight.copy_(weight)
        norm.weight.requires_grad_(False)
        return {FUSED: lambda x: (rms_norm(x, weight, EPS),), REFERENCE: lambda x: (norm(x),)}
    if op == "swiglu":
        silu = ACT2FN["silu"]
        return {FUSED: lambda g, u: (swiglu(g, u),), REFERENCE: lambda g, u: (silu(g) * u,)}
    cos, sin = frozen
    return {
        FUSED: lambda q, k: rope(q, k, cos, sin),
        REFERENCE: lambda q, k: modeling_llama.apply_rotary_pos_emb(q, k, cos, sin),
    }


def caller(fn, activations: list[torch.Tensor], backward: bool, gen: torch.Generator):
    """One call of ``fn``: under no_grad, or forward then the backward of fixed output gradients; returns the outputs
    (and the input gradients) for the equality check."""
    with torch.no_grad():
        grads = [
            torch.randn(o.shape, generator=gen).to(memory_format=torch.contiguous_format) for o in fn(*activations)
        ]

    def call():
        if not backward:
            with torch.no_grad():
                return fn(*activations)
        xs = [a.detach().requires_grad_() for a in activations]
        outs = fn(*xs)
        torch.autograd.backward(outs, grads)
        return (*(o.detach() for o in outs), *(x.grad for x in xs))

    return call


def measure(op: str, rows: int, backward: bool, reps: int, inner: int) -> dict:
    gen = torch.Generator().manual_seed(rows)
    activations, frozen, shape = inputs(op, rows, gen)
    fns = functions(op, frozen)
    calls = {name: caller(fn, activations, backward, torch.Generator().manual_seed(1)) for name, fn in fns.items()}
    for ours, theirs in zip(calls[FUSED](), calls[REFERENCE]()):  # also the warm-up of both
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    times = common.interleaved(calls, "cpu", reps, inner)
    entry = {"op": op, "rows": rows, "shape": shape, "mode": "fwd+bwd" if backward else "fwd"}
    for name, seconds in times.items():
        entry[name] = {**common.quantiles_ms(seconds), "samples_ms": [s * 1e3 for s in seconds]}
    entry["speedup"] = entry[REFERENCE]["median_ms"] / entry[FUSED]["median_ms"]
    return entry


def rows_of(result: dict) -> list[dict]:
    n = result["threads"]
    rows, threads = [], f", {n} thread{'s' if n > 1 else ''}" if result.get("threads_named") else ""
    for e in result["cases"]:
        case = f"{e['op']}: {e['shape']}, {e['mode']}{threads}"
        for provider in (FUSED, REFERENCE):
            rows.append(common.timing_row(case, provider, "time", [s / 1e3 for s in e[provider]["samples_ms"]]))
        rows.append(common.row(case, "fused over the formula", "speed-up", e["speedup"], "x"))
    return rows


def print_table(result: dict) -> None:
    print(f"\n| op | shape | mode | {FUSED} ms | {REFERENCE} ms | speed-up |\n|---|---|---|---|---|---|")
    for e in result["cases"]:
        ours, theirs = e[FUSED], e[REFERENCE]
        print(
            f"| {e['op']} | {e['shape']} | {e['mode']} | {ours['median_ms']:.4f} [{ours['q20_ms']:.4f}, "
            f"{ours['q80_ms']:.4f}] | {theirs['median_ms']:.4f} [{theirs['q20_ms']:.4f}, {theirs['q80_ms']:.4f}] "
            f"| {e['speedup']:.2f}x |"
        )


def run(quick: bool = False, device: str = "cpu", results: Path | None = None) -> common.Outcome:
    """The entry point's call (``benchmarks/run.py``): CPU only (on a GPU the ops are the formulas themselves)."""
    if device != "cpu":
        raise ValueError("the fused layer ops run on CPU only")
    return bench([*(["--quick"] if quick else []), *(["--results", str(results)] if results else [])])


def bench(argv=None) -> common.Outcome:
    parser = common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="seconds: 16 rows, a few samples")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help=f"rows of each op (default {ROWS})")
    parser.add_argument("--reps", type=int, default=None, help="timed samples a case and side (30; --quick 5)")
    parser.add_argument("--inner", type=int, default=None, help="calls a sample (10; --quick 2)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch's threads (default: its own, one a core); named in the cases"
    )
    args = parser.parse_args(argv)
    args.rows = args.rows or list(QUICK_ROWS if args.quick else ROWS)
    args.reps = args.reps or (5 if args.quick else 30)
    args.inner = args.inner or (2 if args.quick else 10)
    if min(args.rows) < 1 or args.reps < 1 or args.inner < 1:
        parser.error("--rows, --reps and --inner must be positive")
    from fastsoft.ops import cpp
    from fastsoft.ops.layers import fused_applies

    ok, why = cpp.is_available()
    probe = torch.zeros(1, 8)
    if not ok or not fused_applies(probe, frozen=(probe,)):
        print(f"the fused layer ops do not run here ({why or 'FASTSOFT_FUSED_LAYERS=0?'}): nothing to compare")
        return common.Outcome(1, [])
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = common.device_name("cpu")
    result = {**common.run_info(name, "bench_layers.py", argv), "threads": torch.get_num_threads()}
    result["threads_named"] = result["threads"] != default_threads  # the cases say a thread count not the default
    result.update(rows=args.rows, reps=args.reps, inner=args.inner, cases=[])
    load_before = common.load_average()
    if load_before and load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other work shares this CPU")
    print(f"fused layer ops against the transformers formulas on {name}, {result['threads']} threads", flush=True)

    def body():
        for op in args.ops:
            for rows in args.rows:
                for backward in (False, True):
                    e = measure(op, rows, backward, args.reps, args.inner)
                    result["cases"].append(e)
                    print(
                        f"  {op:8s} {e['shape']:32s} {e['mode']:7s} fused {e[FUSED]['median_ms']:8.4f} ms, "
                        f"formula {e[REFERENCE]['median_ms']:8.4f} ms: {e['speedup']:.2f}x",
                        flush=True,
                    )

    status = common.run_keeping_partial(result, body)
    result["load_average_before_after"] = [load_before, common.load_average()]
    print_table(result)
    n = result["threads"]
    label = f"{n}thread{'s' if n > 1 else ''}" if result["threads_named"] else ""
    stem = f"{BENCHMARK}-{common.file_tag(name, label, 'quick' if args.quick else '')}"
    dirs = common.out_dirs(args.out, only_out=args.quick, results=args.results)
    return common.finish(BENCHMARK, result, stem, dirs, rows_of, args.quick, status)


def main(argv=None) -> int:
    return bench(argv).status


if __name__ == "__main__":
    sys.exit(main())
