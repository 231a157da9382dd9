"""frozen_linear (oneDNN's GEMM, the weight packed once) against torch's linear (``mm``: MKL) on CPU, fp32.

The shapes are SmolLM2-135M's: its 7 decoder projections at a student step's packed row (``--rows``, 172 on the
shipped example: σ once, 4 queries and their answers), forward + backward for the input only (the student step), and
its tied lm_head (V = 49152) forward only at a few rows (what greedy decoding and evaluation take: the teacher decodes
its 40 queries at once, ``generate`` 8). Random weights and inputs; each pair of results checked equal to 1e-4. The
calls of the two sides alternate; each shape's weight stays warm in cache between its calls (in a model's pass the
next layer's would not). The first call, which packs the weight (and the first of all generates oneDNN's kernels),
is reported apart.

    python benchmarks/bench_frozen_linear.py            # ~1 minute on the 2-core CI machine
    python benchmarks/bench_frozen_linear.py --rows 344 --reps 30
    python benchmarks/bench_frozen_linear.py --quick    # seconds: 8 rows, the lm_head at 8 rows, 3 calls a side

Writes ``benchmarks/results/frozen_linear-<device>[-quick].json``, its rows into ``all.csv`` and the figure
``frozen_linear-<device>[-quick].png`` (``plot.py``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout on sys.path)

import fastsoft.ops.layers as layer_ops  # noqa: E402
from fastsoft.ops.layers import frozen_linear, frozen_linear_reference, packed_linears_available  # noqa: E402

HIDDEN, INTERMEDIATE, KV, VOCAB = 576, 1536, 192, 49152  # SmolLM2-135M
PROJECTIONS = {  # name: (out, in), one decoder layer's
    "q": (HIDDEN, HIDDEN),
    "k": (KV, HIDDEN),
    "v": (KV, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate": (INTERMEDIATE, HIDDEN),
    "up": (INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
}
HEAD_ROWS = (8, 40, 172)


def caller(linear, x, weight, backward: bool):
    """``linear(x, weight)``, and the backward of a fixed output gradient when ``backward``: what one call runs."""
    grad = torch.randn(x.shape[0], weight.shape[0], generator=torch.Generator().manual_seed(1))

    def call():
        if not backward:
            with torch.no_grad():
                return linear(x, weight)
        xg = x.detach().requires_grad_()
        out = linear(xg, weight)
        out.backward(grad)
        return out.detach(), xg.grad

    return call


def compare(name: str, out_in: tuple[int, int], rows: int, backward: bool, reps: int, gen) -> dict:
    """torch's linear and frozen_linear on one shape, their calls alternated (drift in the machine's speed falls on
    both alike); medians."""
    out_features, in_features = out_in
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    x = torch.randn(rows, in_features, generator=gen)
    theirs, ours = (caller(f, x, weight, backward) for f in (frozen_linear_reference, frozen_linear))
    started = time.perf_counter()
    first = ours()  # packs the weight (once a weight)
    pack_s = time.perf_counter() - started
    torch.testing.assert_close(first, theirs(), rtol=1e-4, atol=1e-4)  # also the warm-up of both
    entry = layer_ops._PACKS.table.get(id(weight))
    if entry is None or (backward and entry[3] is None):
        raise RuntimeError(f"{name}: frozen_linear did not pack its weight (over the memory budget?): nothing measured")
    times = common.interleaved({"torch": theirs, "frozen_linear": ours}, "cpu", reps)
    torch_q, ours_q = common.quantiles_ms(times["torch"]), common.quantiles_ms(times["frozen_linear"])
    torch_s, ours_s = torch_q["median_ms"] / 1e3, ours_q["median_ms"] / 1e3
    flops = 2 * rows * in_features * out_features * (2 if backward else 1)
    return {
        "name": name,
        "out_in": list(out_in),
        "rows": rows,
        "backward": backward,
        "first_call_with_packing_ms": pack_s * 1e3,
        "torch_ms": torch_s * 1e3,
        "frozen_linear_ms": ours_s * 1e3,
        "torch_q20_q80_ms": [torch_q["q20_ms"], torch_q["q80_ms"]],
        "frozen_linear_q20_q80_ms": [ours_q["q20_ms"], ours_q["q80_ms"]],
        "speedup": torch_s / ours_s,
        "torch_gflops": flops / torch_s / 1e9,
        "frozen_linear_gflops": flops / ours_s / 1e9,
    }


def print_table(result: dict) -> None:
    print(f"{'shape':<28} {'torch ms':>9} {'frozen_linear ms':>17} {'speedup':>8} {'GFLOP/s':>14} {'1st call ms':>12}")
    for r in result["shapes"]:
        what = f"{r['name']} {r['out_in'][0]}x{r['out_in'][1]}, {r['rows']} rows{' +bwd' if r['backward'] else ''}"
        print(
            f"{what:<28} {r['torch_ms']:>9.2f} {r['frozen_linear_ms']:>17.2f} {r['speedup']:>7.2f}x "
            f"{r['torch_gflops']:>6.0f} / {r['frozen_linear_gflops']:<5.0f} {r['first_call_with_packing_ms']:>12.1f}"
        )
    if "layer" in result:
        layer = result["layer"]
        print(
            f"one decoder layer's 7 projections, {result['rows']} rows, fwd+bwd: torch {layer['torch_ms']:.1f} ms, "
            f"frozen_linear {layer['frozen_linear_ms']:.1f} ms ({layer['speedup']:.2f}x)"
        )


TORCH, OURS = "torch linear (MKL)", "frozen_linear (oneDNN, packed)"


def rows_of(result: dict) -> list[dict]:
    """A case a shape: both sides' time (median, 20 / 80 % quantiles), the speed-up, and the first call's time."""
    rows = []
    for r in result["shapes"]:
        metric = "fwd+bwd time" if r["backward"] else "fwd time"
        case = f"{r['name']} {r['out_in'][0]}x{r['out_in'][1]}, {r['rows']} rows"
        for provider, ms, q in (
            (TORCH, "torch_ms", "torch_q20_q80_ms"),
            (OURS, "frozen_linear_ms", "frozen_linear_q20_q80_ms"),
        ):
            rows.append(common.row(case, provider, metric, r[ms], "ms", *(r.get(q) or (None, None))))
        rows.append(common.row(case, "frozen_linear over torch", "speed-up", r["speedup"], "x"))
        rows.append(common.row(case, OURS, "first call, packing the weight", r["first_call_with_packing_ms"], "ms"))
    if "layer" in result:
        case = f"one decoder layer's 7 projections, {result['rows']} rows"
        rows.append(common.row(case, TORCH, "fwd+bwd time", result["layer"]["torch_ms"], "ms"))
        rows.append(common.row(case, OURS, "fwd+bwd time", result["layer"]["frozen_linear_ms"], "ms"))
        rows.append(common.row(case, "frozen_linear over torch", "speed-up", result["layer"]["speedup"], "x"))
    return rows


def run(quick: bool = False, device: str = "cpu", results: Path | None = None) -> common.Outcome:
    """The entry point's call (``benchmarks/run.py``): CPU only (oneDNN's CPU GEMM)."""
    if device != "cpu":
        raise ValueError("frozen_linear is a CPU op")
    return bench([*(["--quick"] if quick else []), *(["--results", str(results)] if results else [])])


def main(argv=None) -> int:
    return bench(argv).status


def bench(argv=None) -> common.Outcome:
    parser = common.parser(__doc__)
    parser.add_argument("--rows", type=int, default=None, help="the projections' rows (172: a student step's row)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls a shape and side (median; 40)")
    parser.add_argument("--quick", action="store_true", help="seconds: 8 rows, the lm_head at 8 rows, 3 calls")
    parser.add_argument("--label", default="", help="appended to the results' file name")
    args = parser.parse_args(argv)
    args.rows = args.rows or (8 if args.quick else 172)
    args.reps = args.reps or (3 if args.quick else 40)
    if args.rows < 1 or args.reps < 1:
        parser.error("--rows and --reps must be positive")
    if not packed_linears_available():
        print("oneDNN's packed linear is not available here (or FASTSOFT_PACKED_LINEARS=0): nothing to compare")
        return common.Outcome(1, [])
    name = common.device_name("cpu")
    result = {**common.run_info(name, "bench_frozen_linear.py", argv), "threads": torch.get_num_threads()}
    result.update(rows=args.rows, reps=args.reps, quick=args.quick, shapes=[])
    print(f"frozen_linear against torch's linear on {name}, {result['threads']} threads", flush=True)

    def body():
        gen = torch.Generator().manual_seed(0)
        frozen_linear(torch.zeros(1, 8, requires_grad=True), torch.zeros(8, 8)).sum().backward()  # loads the extension
        for proj, out_in in PROJECTIONS.items():
            result["shapes"].append(compare(proj, out_in, args.rows, True, args.reps, gen))
        for rows in HEAD_ROWS[:1] if args.quick else HEAD_ROWS:
            reps = args.reps if args.quick else max(5, args.reps // 4)
            result["shapes"].append(compare("lm_head", (VOCAB, HIDDEN), rows, False, reps, gen))
        layer = [r for r in result["shapes"] if r["backward"]]
        torch_ms, ours_ms = sum(r["torch_ms"] for r in layer), sum(r["frozen_linear_ms"] for r in layer)
        result["layer"] = {"torch_ms": torch_ms, "frozen_linear_ms": ours_ms, "speedup": torch_ms / ours_ms}

    status = common.run_keeping_partial(result, body)
    print_table(result)
    stem = f"frozen_linear-{common.file_tag(name, args.label, 'quick' if args.quick else '')}"
    dirs = common.out_dirs(args.out, only_out=args.quick, results=args.results)
    return common.finish("frozen_linear", result, stem, dirs, rows_of, args.quick, status)


if __name__ == "__main__":
    sys.exit(main())
