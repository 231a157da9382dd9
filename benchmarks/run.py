"""The maintained benchmarks from one command: each runs (in its own process), writes its raw JSON, merges its rows
into the one results table ``<results>/all.csv`` and draws its figure ``<results>/<benchmark>-<device>.png``.

    python benchmarks/run.py --list                   # the benchmarks, what each measures, where it runs
    python benchmarks/run.py --quick                  # every benchmark of this device at smoke size (what the tests run)
    python benchmarks/run.py layers softmax_kl        # these two, full size
    python benchmarks/run.py --device cuda            # the GPU's benchmarks (a GPU machine: benchmarks/gpu_run.sh)
    python benchmarks/run.py --quick --results DIR    # into DIR instead of benchmarks/results/
    python benchmarks/plot.py                         # the figures again, from the table

Each benchmark is a module ``bench_<name>.py`` beside this one with ``run(quick, device, results) -> Outcome``
(``common.Outcome``: the exit status and the rows it added) and its own command line for everything else it can
measure (``python benchmarks/bench_softmax_kl.py --help``): those runs write into the same table. The table's columns
and how a rerun replaces rows are in ``common.py``; ``--quick`` rows are kept apart from full-size ones (the column
``quick``, and their figures end in ``-quick.png``). Exit status: 0 when every benchmark run succeeded, else 1 (2 for
a name or device no benchmark takes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Benchmark:
    module: str
    kind: str  # "micro": one op or kernel; "system": a model, a training run, a command
    devices: tuple[str, ...]
    what: str


BENCHMARKS = {
    "softmax_kl": Benchmark(
        "bench_softmax_kl", "micro", ("cpu", "cuda"),
        "the fused loss, forward + backward, against the 2-GEMM floor, torch eager / compile, Liger and CCE (GPU)",
    ),
    "frozen_linear": Benchmark(
        "bench_frozen_linear", "micro", ("cpu",),
        "SmolLM2-135M's projections and lm_head through oneDNN with packed weights, against torch's linear (MKL)",
    ),
    "layers": Benchmark(
        "bench_layers", "micro", ("cpu",),
        "the fused rms_norm, swiglu and rope, forward and forward + backward, against the transformers formulas",
    ),
    "e2e": Benchmark(
        "bench_e2e", "system", ("cpu", "cuda"),
        "shared-context teacher against naive per-query forwards; packed multi-slot training against PEFT "
        "(CPU: its smoke size only)",
    ),
    "student": Benchmark(
        "bench_student", "system", ("cpu",),
        "the student step on SmolLM2-135M: fastsoft against PEFT prompt tuning, time, memory, held-out gap",
    ),
    "eval_memory": Benchmark(
        "bench_eval_memory", "system", ("cpu",),
        "peak memory of held-out evaluation at 100, 1,000 and 10,000 queries",
    ),
    "compress": Benchmark(
        "bench_compress", "system", ("cpu", "cuda"),
        "`fastsoft compress` end to end (the README's command 1, as written and with hand-written queries)",
    ),
}  # fmt: skip


def load(name: str):
    """The benchmark's module (imported on first use: nothing heavy is imported to list them)."""
    return importlib.import_module(BENCHMARKS[name].module)


def run_here(name: str, quick: bool, device: str, results: Path) -> int:
    """``name``'s run in this process; a combination it does not take (``ValueError``) is said and counts as done."""
    try:
        return load(name).run(quick=quick, device=device, results=results).status
    except ValueError as why:
        print(f"{name}: not run: {why}")
        return 0


def run_child(name: str, args) -> int:
    """``name`` in a fresh process (nothing of one benchmark's state — threads, packed weights, allocator, compiled
    kernels — reaches the next); an interrupt is passed on to it, so it saves what it measured."""
    cmd = [sys.executable, __file__, name, "--same-process", "--device", args.device, "--results", str(args.results)]
    proc = subprocess.Popen([*cmd, *(["--quick"] if args.quick else [])], cwd=common.ROOT)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: every one of --device)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--quick", action="store_true", help="smoke sizes: seconds to a minute each")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is one")
    parser.add_argument(
        "--results", type=Path, default=common.RESULTS, help="the results folder (default benchmarks/results/)"
    )
    parser.add_argument("--same-process", action="store_true", help="run them in this process, one after another")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in BENCHMARKS:
            parser.error(f"no benchmark {name!r}; the benchmarks: {', '.join(BENCHMARKS)} (--list)")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    wrong = [n for n in args.names if args.device not in BENCHMARKS[n].devices]
    if wrong:
        parser.error(f"{', '.join(wrong)} do(es) not run on {args.device}: see --list")
    args.names = args.names or [n for n, b in BENCHMARKS.items() if args.device in b.devices]
    args.results = args.results.resolve()
    return args


def print_list() -> None:
    width = max(map(len, BENCHMARKS))
    for name, b in BENCHMARKS.items():
        print(f"{name:{width}s}  {b.kind:6s}  {'/'.join(b.devices):8s}  {b.what}")
        print(f"{'':{width}s}  {'':6s}  {'':8s}  python benchmarks/{b.module}.py --help")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print_list()
        return 0
    child = args.same_process and len(args.names) == 1  # one benchmark's process: its parent says the rest
    size = "quick" if args.quick else "full-size"
    if not child:
        print(f"== benchmarks ({size}, {args.device}): {', '.join(args.names)}; results in {args.results}", flush=True)
    summary, failed = [], 0
    for name in args.names:
        if not child:
            print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        if args.same_process:
            status = run_here(name, args.quick, args.device, args.results)
        else:
            status = run_child(name, args)
        seconds = time.perf_counter() - start
        summary.append(f"{name}: exit {status}, {seconds:.0f} s")
        failed += status != 0
    if not child:
        print("\n== summary\n   " + "\n   ".join(summary), flush=True)
        print(f"table {args.results / common.TABLE}; figures: python benchmarks/plot.py --results {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
