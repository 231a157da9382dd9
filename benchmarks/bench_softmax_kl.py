"""softmax_kl forward + backward (gradient for h only), every provider side by side in one run.

Measured against the 2-GEMM floor: ``z = h W^T`` then ``dz W`` with the vendor GEMM (cuBLAS on GPU),
the least any fused loss has to do. Each provider runs when it is installed:

- GPU (default): floor, torch eager, torch.compile (dense teacher), Liger ``LigerFusedLinearKLDivLoss``
  (bf16 and fp32 q), fastsoft (every backend that runs on CUDA); for hard targets also Apple
  cut-cross-entropy and Liger's fused linear cross-entropy. N = 8192 at the four (H, V) of
  SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B and Llama-3-8B (``--shapes small``: the first two, ``--shapes large``:
  the last two), bf16, every teacher: dense, sparse (K = 64 + tail), hard, compact, dense-rkl and dense-jsd (below).
  Median ms via ``triton.testing.do_bench`` (20 / 80 % quantiles;
  at least ``--reps`` runs and 100 ms of them), peak extra CUDA memory over the inputs. Before measuring,
  the compile-heavy providers are compiled in parallel subprocesses (Triton's and Inductor's on-disk
  caches; ``--no-prewarm`` to skip): every measurement still warms up and autotunes in this process.
- CPU (``--device cpu``): floor (torch matmuls), torch eager, fastsoft reference, fastsoft cpp; fp32;
  small shapes plus the C++ target shape N=2048, H=576, V=49152. Dense and sparse teachers by default
  (any teacher list but the default writes ``softmax_kl-<device>-<teachers>.json``). Each provider runs in a fresh
  subprocess and its peak extra memory is the rise of the process's peak RSS (VmHWM, reset before
  each measurement; glibc is told to return large blocks to the system so freed memory is not hidden).

Teachers (``--teachers``): ``dense`` (log-probs [N, V]), ``sparse``, ``hard`` (one id a token), ``compact``
(``CompactTarget``: ``wbar``, ``sum q log q``, hard targets' twin), and ``dense-rkl`` / ``dense-jsd``: the dense
teacher under ``divergence="reverse"`` / ``"jsd"`` (beta 0.5), run by the fastsoft backends and torch eager
(``reference.softmax_kl_naive(..., divergence=, beta=)``); the other providers compute the forward KL only.

``fastsoft <backend> +filter`` (compact teacher only): the same forward + backward with ``grad_filter=eps``
(``--filter-eps``, default 1e-3: every row's gradient within eps of exact). Its row also reports, measured once
outside the timed runs with ``filtered_rows`` on the same inputs, the share of the backward GEMM skipped, the rows
recomputed unfiltered and the largest relative error left (``filter_skipped`` / ``filter_recomputed`` /
``filter_bound``; the table's last column). Not run on the GPU for the reference backend (a host-side oracle).

``--distributions real``: instead of random inputs, SmolLM2-135M-Instruct's own (``benchmarks/real_inputs.py``):
the teacher hidden state of each token of ``examples/marrowick_island.txt`` and of the jobs' contexts in
``examples/jobs.jsonl`` is the model over its whole text up to it, the student's the model over only the 8 tokens
before it (then 32 when N needs more rows; beyond that the rows cycle, with a warning); W is the real lm_head.
Teachers from these: dense, compact, sparse (top-64 + tail), hard (argmax). H and V must be the model's (576,
49152); the model is loaded (from the local GGUF, nothing downloaded) on the CPU, also for ``--device cuda``, and
the rows are cached in ``~/.cache/fastsoft/bench/`` for the workers and later runs. The file name gets ``-real``.

Every provider that does not run is listed with its reason (not installed, not supported on this
device, not applicable to the teacher, errored with its message) under the table and in the JSON's
``skipped``. Writes ``benchmarks/results/softmax_kl-<device>[-small|-large][-<teachers>][-real].json`` after every
shape and teacher (a run stopped part-way keeps what it measured), at the end its rows into ``all.csv`` and the
figure ``softmax_kl-<device>.png`` (``plot.py``), with copies under ``--out``, and prints a table. ``--quick``: a
seconds-long CPU smoke run (one tiny shape, two repetitions; with ``--distributions real`` N = 64 at the model's
shape; with ``--device cuda``: N = 1024 at SmolLM2's (576, 49152), dense and compact teachers, the floor, torch
eager and fastsoft's backends, nothing compiled ahead), written as ``...-quick``; with ``--out`` and no ``--results`` it writes only there.

    python benchmarks/bench_softmax_kl.py --shapes small  # GPU, H 576 and 896 (gpu_run.sh bench-small)
    python benchmarks/bench_softmax_kl.py                 # GPU, all four shapes
    python benchmarks/bench_softmax_kl.py --shapes 576x49152 --teachers dense compact --distributions real  # GPU
    python benchmarks/bench_softmax_kl.py --device cpu    # CPU
    python benchmarks/bench_softmax_kl.py --device cpu --quick
    python benchmarks/bench_softmax_kl.py --device cpu --teachers compact --shapes 2048x576x49152
    python benchmarks/bench_softmax_kl.py --device cpu --teachers compact --shapes 2048x576x49152 \\
        --providers floor "fastsoft cpp" --distributions real   # floor, cpp and cpp +filter on SmolLM2's own rows
    python benchmarks/bench_softmax_kl.py --device cpu --teachers dense dense-rkl dense-jsd --shapes 2048x576x49152 \\
        --providers floor eager "fastsoft cpp"

GPU time, estimated for an H100 / H200 (no GPU run yet; benchmarks/gpu_run.sh has the arithmetic): about
4 minutes for ``--shapes small`` with cold compile caches, about 3.5 for ``--shapes large`` after it.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout on sys.path)
import real_inputs  # noqa: E402  (SmolLM2-135M's own rows for --distributions real; imports no model until used)
from common import ERRORED, NOT_SUPPORTED, ROOT, skip  # noqa: E402

# (H, V) of SmolLM2-135M, Qwen2.5-0.5B | Llama-3.2-1B, Llama-3-8B
GPU_SHAPES = {"small": [(576, 49152), (896, 151936)], "large": [(2048, 128256), (4096, 128256)]}
GPU_TOKENS = 8192
CPU_SHAPES = [(256, 64, 4096), (512, 256, 32000), (2048, 576, 49152)]  # (N, H, V); the last is the C++ target
QUICK_SHAPES = [(64, 32, 1001)]
REAL_H, REAL_V = real_inputs.H, real_inputs.V  # SmolLM2-135M-Instruct's (576, 49152): --distributions real's only shape
QUICK_SHAPES_REAL = [(64, REAL_H, REAL_V)]
SPARSE_K = 64
TEMPERATURE = 1.0
FLOOR = "floor (2 GEMMs)"
TEACHERS = ("dense", "sparse", "hard", "compact", "dense-rkl", "dense-jsd")
DIVERGENCE_OF = {"dense-rkl": "reverse", "dense-jsd": "jsd"}  # dense teachers under another divergence
JSD_BETA = 0.5
FILTER = " +filter"  # suffix of the providers that run softmax_kl(..., grad_filter=eps)
FILTER_EPS = 1e-3
# Compiled on first use, for minutes in a row on a cold cache: compiled ahead in parallel on the GPU.
COMPILE_HEAVY = ("fastsoft triton", "torch.compile", "liger", "cut-cross-entropy")


def _liger_kl(cls):
    return cls(reduction="batchmean", temperature=TEMPERATURE)


def _liger_flce(cls):
    loss = cls()
    return lambda h, W, t: loss(W, h, t)  # Liger's FLCE takes (W, h, targets)


# Providers of other libraries: (name, module, attribute, the one teacher it takes, provider from the attribute).
EXTERNAL = [
    ("liger (bf16 q)", "liger_kernel.transformers", "LigerFusedLinearKLDivLoss", "dense", _liger_kl),
    ("liger (fp32 q)", "liger_kernel.transformers", "LigerFusedLinearKLDivLoss", "dense", _liger_kl),
    ("cut-cross-entropy", "cut_cross_entropy", "linear_cross_entropy", "hard", lambda fn: fn),
    ("liger FLCE", "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss", "hard", _liger_flce),
]
TAKES = {"dense": "a dense [N, V] teacher", "hard": "hard targets (one id a token)"}


# ------------------------------------------------------------------------------------------------------
# inputs and providers
# ------------------------------------------------------------------------------------------------------


def base_teacher(teacher: str) -> str:
    """The teacher's kind: ``dense-rkl`` and ``dense-jsd`` are the dense teacher under another divergence."""
    return "dense" if teacher in DIVERGENCE_OF else teacher


def make_inputs(n, hd, v, teacher, dtype, device, seed=0, distributions="random"):
    """``(h [N, H], W [V, H], teacher)``: random (``seed``), or SmolLM2-135M's own (``distributions="real"``)."""
    teacher = base_teacher(teacher)
    if distributions == "real":
        return make_real_inputs(n, hd, v, teacher, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hd, device=device, generator=gen, dtype=torch.float32).to(dtype)
    W = (torch.randn(v, hd, device=device, generator=gen, dtype=torch.float32) / math.sqrt(hd) * 2).to(dtype)
    if teacher == "dense":  # cached dense log-probs in the model dtype, drawn 1024 rows at a time (no [N, V] fp32 copy)
        t = torch.empty(n, v, device=device, dtype=dtype)
        for i in range(0, n, 1024):
            rows = torch.randn(min(1024, n - i), v, device=device, generator=gen, dtype=torch.float32)
            t[i : i + 1024] = torch.log_softmax(rows.mul_(2), -1)
    elif teacher == "sparse":
        from fastsoft.ops import SparseTarget

        ids = torch.stack(
            [torch.randperm(v, device=device, generator=gen)[:SPARSE_K] for _ in range(min(n, 1))]
        ).expand(n, -1)
        ids = (ids + torch.arange(n, device=device)[:, None] * 7919) % v  # distinct ids per row, varied rows
        probs = torch.softmax(torch.randn(n, SPARSE_K, device=device, generator=gen), -1) * 0.9
        t = SparseTarget(ids.contiguous(), probs, 1 - probs.sum(-1))
    elif teacher == "compact":  # a hidden teacher as (wbar, sum q log q) in fp32, built outside the measurement
        from fastsoft.ops import CompactTarget

        h_t = torch.randn(n, hd, device=device, generator=gen, dtype=torch.float32) * 2
        t = CompactTarget.from_hidden(h_t, W.float(), TEMPERATURE)
    else:  # hard targets: one id per row
        t = torch.randint(0, v, (n,), device=device, generator=gen)
    return h, W, t


def make_real_inputs(n, hd, v, teacher, dtype, device):
    """SmolLM2-135M-Instruct's student and teacher hidden states and lm_head (``real_inputs.rows``: built on the
    CPU once, then cached on disk), moved to ``device``; the teacher of kind ``teacher`` built from them in fp32
    (dense: log-probs in ``dtype``; sparse: top-64 + tail; hard: the teacher's argmax; compact: from_hidden)."""
    if (hd, v) != (real_inputs.H, real_inputs.V):
        raise ValueError(f"real distributions have H {real_inputs.H} and V {real_inputs.V}, not H {hd} V {v}")
    student, teacher_h, W32, _ = real_inputs.rows(n)
    h = student.to(device=device, dtype=dtype)
    W = W32.to(device=device, dtype=dtype)
    teacher_h, Wf = teacher_h.to(device), W.float()  # the teacher sees the weight the student sees
    if teacher == "compact":
        from fastsoft.ops import CompactTarget

        return h, W, CompactTarget.from_hidden(teacher_h, Wf, TEMPERATURE)
    chunks = []
    for i in range(0, n, 1024):  # one [1024, V] fp32 block of teacher log-probs at a time
        logp = torch.log_softmax(teacher_h[i : i + 1024] @ Wf.T / TEMPERATURE, -1)
        if teacher == "dense":
            chunks.append(logp.to(dtype))
        elif teacher == "sparse":
            values, ids = logp.topk(SPARSE_K, dim=-1)
            tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1).exp()
            chunks.append((ids, values.exp(), tail))
        else:  # hard: the teacher's most likely token
            chunks.append(logp.argmax(-1))
        del logp
    if teacher == "sparse":
        from fastsoft.ops import SparseTarget

        return h, W, SparseTarget(*(torch.cat(parts) for parts in zip(*chunks)))
    return h, W, torch.cat(chunks)


def eager_loss(h, W, t, divergence="forward"):
    """torch eager: the loss written plainly (``reference.softmax_kl_naive``, the tests' ground truth), fp32 softmax."""
    from fastsoft.ops import SparseTarget
    from fastsoft.ops.reference import softmax_kl_naive

    if isinstance(t, torch.Tensor) and t.dim() == 1:  # hard targets: one-hot cross-entropy
        t = SparseTarget.one_hot(t)
    return softmax_kl_naive(h, W, t, TEMPERATURE, divergence=divergence, beta=JSD_BETA).mean()


def provider_fns(device: str, teacher: str, wanted=lambda name: True, filter_eps=FILTER_EPS) -> tuple[dict, dict]:
    """The providers for ``device`` and ``teacher``: ``{name: fn(h, W, t)}`` and ``{name: why it does not run}``.

    ``fn`` returns a scalar to backprop (the floor returns its second GEMM's output: it does its own work).
    Providers ``wanted`` rejects are in neither (nothing is imported or built for them). ``dense-rkl`` and
    ``dense-jsd`` run the dense teacher with ``divergence="reverse"`` / ``"jsd"`` (beta ``JSD_BETA``);
    ``fastsoft <backend> +filter`` runs ``grad_filter=filter_eps`` (compact teacher only).
    """
    from fastsoft.ops import SparseTarget, softmax_kl
    from fastsoft.ops.softmax_kl import BackendUnavailable, resolve_backend

    divergence = DIVERGENCE_OF.get(teacher, "forward")

    def floor(h, W, t):
        z = h.detach() @ W.T
        return z @ W  # dz W with dz the same size and dtype as the logits

    def fastsoft(backend, eps=0.0):
        def fn(h, W, t):
            if isinstance(t, torch.Tensor) and t.dim() == 1:  # hard targets
                t = SparseTarget.one_hot(t)
            return softmax_kl(
                h, W, t, temperature=TEMPERATURE, backend=backend, divergence=divergence, beta=JSD_BETA, grad_filter=eps
            )

        return fn

    eager = eager_loss if divergence == "forward" else functools.partial(eager_loss, divergence=divergence)
    fns, skipped = {FLOOR: floor, "torch eager": eager}, {}
    if device != "cuda":
        skipped["torch.compile"] = "not run on CPU by this benchmark (compile time)"
    elif teacher != "dense":
        skipped["torch.compile"] = "run for the dense teacher only (compile time per shape)"
    else:
        fns["torch.compile"] = torch.compile(eager_loss, dynamic=False)
    for backend in ("triton", "cpp", "reference"):
        name, filtered = f"fastsoft {backend}", f"fastsoft {backend}{FILTER}"
        if not (wanted(name) or wanted(filtered)):
            continue
        try:
            resolve_backend(backend, torch.device(device))
        except BackendUnavailable as error:
            skipped[name] = skipped[filtered] = f"{NOT_SUPPORTED}: {error}"
            continue
        fns[name] = fastsoft(backend)
        if teacher != "compact":
            skipped[filtered] = "not applicable: grad_filter bounds the compact teacher's gradient (forward KL) only"
        elif backend == "reference" and device == "cuda":
            skipped[filtered] = (
                "not run on the GPU: the reference filter decides each 256-column tile on the host (one "
                "synchronisation a tile and chunk: ~2 x 10^4 a step at V 49152, ~2 x 10^5 at V 151936) and still "
                "runs the whole GEMM: a correctness oracle, not a fast path"
            )
        else:
            fns[filtered] = fastsoft(backend, filter_eps)
    for name, module, attr, takes, make in EXTERNAL:
        if not wanted(name):
            continue
        if teacher in DIVERGENCE_OF:
            skipped[name] = f"not applicable: computes the forward KL / cross-entropy, not the {divergence} divergence"
        elif teacher != takes:
            skipped[name] = f"not applicable: takes {TAKES[takes]} only"
        elif device != "cuda":
            skipped[name] = f"{NOT_SUPPORTED}: CUDA (Triton GPU kernels) only"
        else:
            obj, why = common.optional_import(module, attr)
            if obj is None:
                skipped[name] = why
            else:
                fns[name] = make(obj)
    return {k: f for k, f in fns.items() if wanted(k)}, {k: why for k, why in skipped.items() if wanted(k)}


def provider_teacher(name: str, t):
    """The teacher in the form each provider takes: Liger wants probabilities."""
    if name.startswith("liger (") and isinstance(t, torch.Tensor):
        q = t.float().exp()
        return q if "fp32" in name else q.to(t.dtype)
    return t


def make_step(name, fn, h, W, t):
    """One forward + backward of provider ``name``, and the input whose gradient it fills."""
    x = h.detach().requires_grad_()
    tt = provider_teacher(name, t)

    def step():
        x.grad = None
        out = fn(x, W, tt)
        if out.requires_grad:
            out.backward()

    return step, x


def filter_report(provider: str, h, W, t, eps: float) -> dict:
    """What ``+filter`` did on these inputs, measured once outside the timed runs with ``filtered_rows``: the share of
    the backward GEMM skipped, the rows recomputed unfiltered, and the largest relative gradient error left (<= eps)."""
    from fastsoft.ops.softmax_kl import filtered_rows, resolve_backend

    _, rows_fn = resolve_backend(provider.split()[1], h.device)
    with torch.no_grad():
        _, _, report = filtered_rows(rows_fn, h.detach(), W, t, TEMPERATURE, None, eps)
    return {
        "filter_eps": eps,
        "filter_skipped": report.skipped,
        "filter_recomputed": report.recomputed,
        "filter_bound": report.bound,
    }


def wanted_by(providers: list[str] | None):
    return lambda name: not providers or any(p in name for p in providers)


def compile_family(name: str) -> str:
    """A provider's compile family: ``liger (bf16 q)`` and ``liger (fp32 q)`` are one; ``+filter`` is its own."""
    return name.split(" (")[0]


def prepare_real(args) -> dict:
    """Build (or find in the cache) the real-model rows for every N measured, before any worker needs them: the
    model is loaded once, here, on the CPU (also for ``--device cuda``: the tensors move to the GPU afterwards).
    Returns ``{N: info}`` for the JSON; says when rows repeat."""
    infos = {}
    for n in dict.fromkeys(shape[0] if args.device == "cpu" else args.tokens for shape in args.shapes):
        start = time.perf_counter()
        *_, info = real_inputs.rows(n, log=lambda line: print(line, flush=True))
        infos[str(n)] = info
        stats = ", ".join(f"{key} {info[key]}" for key in ("teacher_top1_mean", "student_top1_mean", "kl_mean"))
        print(
            f"real distributions, N {n}: {info['rows_distinct']} distinct rows ({stats}; {time.perf_counter() - start:.1f} s)"
        )
        if info["note"]:
            print(f"warning: {info['note']}", flush=True)
    return infos


# ------------------------------------------------------------------------------------------------------
# GPU measurement (in process)
# ------------------------------------------------------------------------------------------------------


def bench_gpu(name, fn, h, W, t, reps):
    import triton

    step, x = make_step(name, fn, h, W, t)
    step()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    x.grad = None  # the measured step's peak includes its own input gradient (as Liger's anchor numbers do)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    peak = torch.cuda.max_memory_allocated() - base
    # at least ``reps`` timed runs, and at least 100 ms of them
    ms = triton.testing.do_bench(step, rep=max(100.0, reps * once_ms), quantiles=[0.5, 0.2, 0.8], grad_to_none=[x])
    return {"median_ms": ms[0], "q20_ms": ms[1], "q80_ms": ms[2], "peak_extra_mib": peak / 2**20}


def prewarm(args) -> None:
    """Compile ahead, in parallel: one subprocess per compile-heavy provider and teacher (per shape for
    torch.compile, which compiles each shape anew) runs one step at every shape, filling Triton's and
    Inductor's on-disk caches. Serially that is ~40 Triton configs at a few seconds each plus tens of
    seconds per torch.compile shape. Only caches are shared: this process still warms up and autotunes."""
    jobs = []
    for teacher in args.teachers:
        fns, _ = provider_fns("cuda", teacher, args.wanted, args.filter_eps)
        families = dict.fromkeys(compile_family(name) for name in fns if name.startswith(COMPILE_HEAVY))
        for family in families:
            groups = [[shape] for shape in args.shapes] if family == "torch.compile" else [args.shapes]
            for shapes in groups:
                label = f"{teacher} / {family}" + (f" {shapes[0][0]}x{shapes[0][1]}" if len(groups) > 1 else "")
                cmd = [sys.executable, __file__, "--warm", "--device", "cuda", "--tokens", str(args.tokens)]
                cmd += ["--teachers", teacher, "--providers", family, "--shapes", *[f"{hd}x{v}" for hd, v in shapes]]
                jobs.append((label, cmd))
    if not jobs:
        return
    print(f"compiling ahead: {len(jobs)} subprocesses in parallel (at most {args.prewarm_seconds} s)", flush=True)
    start, running = time.perf_counter(), []
    try:
        for label, cmd in jobs:
            log = tempfile.TemporaryFile()
            running.append((label, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log), log))
        for label, proc, log in running:
            try:
                rc = proc.wait(timeout=max(1.0, args.prewarm_seconds - (time.perf_counter() - start)))
            except subprocess.TimeoutExpired:
                rc = "stopped at the time limit"
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            note = "" if rc == 0 else f" ({rc}: {lines[-1][:160] if lines else 'no message'})"
            print(f"  {label}: done after {time.perf_counter() - start:.0f} s{note}", flush=True)
    finally:
        for _, proc, log in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def warm(args) -> int:
    """``--warm``: one step of every provider of the families ``--providers`` names exactly, at every shape and
    teacher (a ``prewarm`` subprocess; random inputs: what is compiled depends on the shapes and dtypes only)."""
    exact = lambda name: compile_family(name) in (args.providers or [])
    for hd, v in args.shapes:
        for teacher in args.teachers:
            h, W, t = make_inputs(args.tokens, hd, v, teacher, torch.bfloat16, "cuda")
            for name, fn in provider_fns("cuda", teacher, exact, args.filter_eps)[0].items():
                make_step(name, fn, h, W, t)[0]()
            del h, W, t
            torch.cuda.empty_cache()
    return 0


def run_gpu(args, rows: list, skipped: list, checkpoint) -> None:
    if args.prewarm:
        prewarm(args)
    for hd, v in args.shapes:
        for teacher in args.teachers:
            h, W, t = make_inputs(args.tokens, hd, v, teacher, torch.bfloat16, "cuda", distributions=args.distributions)
            fns, why = provider_fns("cuda", teacher, args.wanted, args.filter_eps)
            for name, reason in why.items():
                skip(skipped, name, reason, teacher=teacher)
            for name, fn in fns.items():
                row = {"n": args.tokens, "h": hd, "v": v, "teacher": teacher, "provider": name, "dtype": "bfloat16"}
                try:
                    row.update(bench_gpu(name, fn, h, W, t, args.reps))
                    if name.endswith(FILTER):
                        row.update(filter_report(name, h, W, t, args.filter_eps))
                except Exception as error:  # an out-of-memory eager run must not end the table
                    row["error"] = common.error_text(error, 200)
                    skip(skipped, name, f"{ERRORED}: {row['error']}", teacher=teacher, shape=f"H {hd} V {v}")
                    torch.cuda.empty_cache()
                rows.append(row)
                print(_fmt_row(row), flush=True)
            del h, W, t
            torch.cuda.empty_cache()
            checkpoint()


# ------------------------------------------------------------------------------------------------------
# CPU measurement (a fresh subprocess per provider; peak RSS)
# ------------------------------------------------------------------------------------------------------


def cpu_worker(provider: str, shapes, teachers, reps: int, distributions="random", filter_eps=FILTER_EPS) -> list[dict]:
    rows = []
    for n, hd, v in shapes:
        for teacher in teachers:
            fns, _ = provider_fns("cpu", teacher, lambda name: name == provider, filter_eps)
            if provider not in fns:
                continue  # the parent lists it as skipped for this teacher
            h, W, t = make_inputs(n, hd, v, teacher, torch.float32, "cpu", distributions=distributions)
            row = {"n": n, "h": hd, "v": v, "teacher": teacher, "provider": provider, "dtype": "float32"}
            try:
                step, x = make_step(provider, fns[provider], h, W, t)
                common.mmap_threshold(64 * 1024)  # memory: no freed buffer may hide in the heap for the next step
                step()  # warm-up (JIT build, thread pools)
                x.grad = None
                gc.collect()
                common.mmap_threshold(64 * 1024)
                exact = common.reset_peak_rss()
                base = common.rss_kib("VmRSS:")
                step()
                peak = common.rss_kib("VmHWM:")
                common.mmap_threshold(32 * 2**20)  # timing steps: glibc's usual large-block behaviour
                times, _ = common.repeat(step, "cpu", reps)
                row.update(common.quantiles_ms(times), peak_extra_mib=max(0, peak - base) / 1024, peak_exact=exact)
                if provider.endswith(FILTER):  # after the timing and the memory measurement
                    row.update(filter_report(provider, h, W, t, filter_eps))
            except Exception as error:
                row["error"] = common.error_text(error, 200)
            rows.append(row)
            del h, W, t
            gc.collect()
    return rows


def run_cpu(args, rows: list, skipped: list, checkpoint) -> None:
    shapes = args.shapes
    providers = []
    for teacher in args.teachers:
        fns, why = provider_fns("cpu", teacher, args.wanted, args.filter_eps)
        for name, reason in why.items():
            skip(skipped, name, reason, teacher=teacher)
        providers += [name for name in fns if name not in providers]
    for provider in providers:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            provider,
            "--device",
            "cpu",
            "--reps",
            str(args.reps),
            "--teachers",
            *args.teachers,
            "--shapes",
            *[f"{n}x{h}x{v}" for n, h, v in shapes],
            "--distributions",
            args.distributions,
            "--filter-eps",
            repr(args.filter_eps),
        ]
        env = dict(
            os.environ,
            MALLOC_MMAP_THRESHOLD_="65536",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            rows.append({"provider": provider, "error": proc.stderr[-500:]})
            skip(skipped, provider, f"{ERRORED}: its worker exited with status {proc.returncode}: {last[:200]}")
            print(f"{provider}: worker failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        for row in json.loads(proc.stdout.strip().splitlines()[-1]):
            rows.append(row)
            if "error" in row:
                shape = f"N {row['n']} H {row['h']} V {row['v']}"
                skip(skipped, provider, f"{ERRORED}: {row['error']}", teacher=row["teacher"], shape=shape)
            print(_fmt_row(row), flush=True)
        checkpoint()


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------


def _fmt_filter(row) -> str:
    """``skipped / recomputed / bound`` of a ``+filter`` row: ``93.1% / 4 / 8.2e-04``."""
    return f"{row['filter_skipped']:.1%} / {row['filter_recomputed']} / {row['filter_bound']:.1e}"


def _fmt_row(row) -> str:
    shape = f"N={row.get('n')} H={row.get('h')} V={row.get('v')} {row.get('teacher', '')}"
    if "error" in row:
        return f"  {shape:44s} {row['provider']:25s} error: {row['error'][:120]}"
    line = (
        f"  {shape:44s} {row['provider']:25s} {row['median_ms']:9.3f} ms  [{row['q20_ms']:.3f}, {row['q80_ms']:.3f}]"
        f"  peak extra {row['peak_extra_mib']:9.1f} MiB"
    )
    if "filter_skipped" in row:
        line += f"  filter (eps {row['filter_eps']:g}): skipped / recomputed / bound {_fmt_filter(row)}"
    return line


def add_ratios(rows):
    floors = {
        (r["n"], r["h"], r["v"], r["teacher"]): r["median_ms"]
        for r in rows
        if r.get("provider") == FLOOR and "median_ms" in r
    }
    for r in rows:
        key = (r.get("n"), r.get("h"), r.get("v"), r.get("teacher"))
        if key in floors and "median_ms" in r:
            r["x_floor"] = r["median_ms"] / floors[key]


def print_table(rows, skipped, device_name):
    groups = {}
    for r in rows:
        if "n" in r:
            groups.setdefault((r["teacher"], r["n"], r["h"], r["v"]), []).append(r)
    providers = list(dict.fromkeys(r["provider"] for r in rows if "n" in r))
    if not providers:
        print("\nno provider was measured")
        common.print_skipped(skipped)
        return
    filtered = [p for p in providers if p.endswith(FILTER)]
    print(
        f"\nsoftmax_kl fwd+bwd on {device_name}: median ms (x the 2-GEMM floor) / peak extra MiB; '-': did not run (below)"
    )
    eps = next((r["filter_eps"] for r in rows if "filter_eps" in r), None)
    if eps is not None:
        print(
            f"filter (eps {eps:g}, measured once outside the timing): share of the backward GEMM skipped / rows "
            "recomputed unfiltered / largest relative gradient error left"
        )
    filter_head = " | filter: skipped / recomputed / bound" if filtered else ""
    print(f"| {'teacher':9s} | {'N, H, V':22s} | " + " | ".join(f"{p:>25s}" for p in providers) + f"{filter_head} |")
    print("|" + "---|" * (2 + len(providers) + bool(filtered)))
    for (teacher, n, hd, v), group in groups.items():
        cells = []
        by = {r["provider"]: r for r in group}
        for p in providers:
            r = by.get(p)
            if r is None:
                cells.append(f"{'-':>25s}")
            elif "error" in r:
                cells.append(f"{'error':>25s}")
            else:
                ratio = f" ({r['x_floor']:.2f}x)" if "x_floor" in r else ""
                cells.append(f"{r['median_ms']:.2f}{ratio} / {r['peak_extra_mib']:.0f}".rjust(25))
        if filtered:
            reports = [(p, by[p]) for p in filtered if "filter_skipped" in by.get(p, {})]
            named = len(filtered) > 1  # the backend's name only when more than one filtered provider is measured
            text = ", ".join((p.split()[1] + " " if named else "") + _fmt_filter(r) for p, r in reports)
            cells.append(text or "-")
        print(f"| {teacher:9s} | {f'{n}, {hd}, {v}':22s} | " + " | ".join(cells) + " |")
    common.print_skipped(skipped)


def rows_of(result: dict) -> list[dict]:
    """The table's rows: each measured provider's fwd+bwd time (median, 20 / 80 % quantiles) and peak extra memory,
    a case a teacher and shape (``: SmolLM2's rows`` with ``--distributions real``)."""
    real = ", SmolLM2's rows" if result.get("distributions") == "real" else ""
    rows = []
    for r in result["rows"]:
        if "median_ms" not in r:
            continue
        dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(r["dtype"], r["dtype"])
        case = f"{r['teacher']}: N {r['n']}, H {r['h']}, V {r['v']}, {dtype}{real}"
        rows.append(common.row(case, r["provider"], "fwd+bwd time", r["median_ms"], "ms", r["q20_ms"], r["q80_ms"]))
        rows.append(common.row(case, r["provider"], "peak extra memory", r["peak_extra_mib"], "MiB"))
    return rows


def parse_args(argv):
    parser = common.parser(__doc__)
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is one (--quick: cpu)"
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (CPU unless --device cuda)")
    parser.add_argument("--tokens", type=int, default=GPU_TOKENS, help="N on the GPU")
    parser.add_argument(
        "--teachers",
        nargs="+",
        default=None,
        choices=TEACHERS,
        help="teachers to measure (a run restricted to teachers other than the default writes its own file); "
        "dense-rkl / dense-jsd: the dense teacher under the reverse KL / the JSD (beta 0.5)",
    )
    parser.add_argument(
        "--distributions",
        choices=["random", "real"],
        default="random",
        help="random inputs, or SmolLM2-135M-Instruct's own hidden states and lm_head (H 576, V 49152; built on the "
        "CPU once and cached in ~/.cache/fastsoft/bench/); the file name gets -real",
    )
    parser.add_argument(
        "--filter-eps",
        type=float,
        default=FILTER_EPS,
        help=f"grad_filter of the '+filter' providers (compact teacher; default {FILTER_EPS:g})",
    )
    parser.add_argument("--providers", nargs="+", default=None, help="substrings of provider names to run")
    parser.add_argument("--shapes", nargs="+", default=None, help="GPU: small, large or HxV; CPU: NxHxV")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (GPU: at least this many, and 100 ms)")
    parser.add_argument(
        "--no-prewarm", dest="prewarm", action="store_false", help="GPU: do not compile ahead in parallel"
    )
    parser.add_argument("--prewarm-seconds", type=float, default=150.0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick and args.device == "cuda":  # a GPU smoke run: one shape, fewer rows, nothing compiled ahead
        args.shapes = args.shapes or [f"{REAL_H}x{REAL_V}"]
        args.tokens = min(args.tokens, 1024)
        args.teachers = args.teachers or ["dense", "compact"]
        args.providers = args.providers or ["floor", "eager", "fastsoft"]  # nothing that compiles for minutes
        args.prewarm = False
    if not 0 < args.filter_eps < 1:
        parser.error(f"--filter-eps must be strictly between 0 and 1, got {args.filter_eps}")
    real = args.distributions == "real"
    args.label = None
    if args.shapes:
        named = [s for s in args.shapes if s in GPU_SHAPES]
        if named and args.device != "cuda":
            parser.error(f"--shapes {' '.join(named)} names GPU shapes; on the CPU give NxHxV")
        args.label = "-".join(named) or None
        args.shapes = [
            shape for s in args.shapes for shape in (GPU_SHAPES.get(s) or [tuple(int(x) for x in s.split("x"))])
        ]
        for shape in args.shapes if real else []:
            if tuple(shape[-2:]) != (REAL_H, REAL_V):
                parser.error(
                    f"--distributions real measures SmolLM2-135M-Instruct's own hidden states and lm_head, H {REAL_H} "
                    f"and V {REAL_V}: the shape {'x'.join(map(str, shape))} has H {shape[-2]} and V {shape[-1]}"
                )
    elif args.device == "cuda":
        args.shapes = [shape for shapes in GPU_SHAPES.values() for shape in shapes]
    else:
        args.shapes = QUICK_SHAPES_REAL if real and args.quick else QUICK_SHAPES if args.quick else CPU_SHAPES
    if real:  # the default shapes: those of the model (a named GPU group was checked above)
        args.shapes = [shape for shape in args.shapes if tuple(shape[-2:]) == (REAL_H, REAL_V)]
    default_teachers = ["dense", "sparse"] if args.device == "cpu" else list(TEACHERS)
    if args.teachers is None:
        args.teachers = default_teachers
    elif args.teachers != default_teachers and not (args.worker or args.warm or args.quick):
        args.label = "-".join([args.label or "", *args.teachers]).strip("-")  # never overwrites the full table
    if real and not (args.worker or args.warm):
        args.label = "-".join([args.label or "", "real"]).strip("-")
    if args.reps is None:
        args.reps = (2 if args.device == "cpu" else 5) if args.quick else (5 if args.device == "cpu" else 20)
    args.wanted = wanted_by(args.providers)
    return args


def run(quick: bool = False, device: str = "cpu", results: Path | None = None) -> common.Outcome:
    """The entry point's call (``benchmarks/run.py``): the default measurement of ``device``, or its quick one."""
    argv = ["--device", device, *(["--quick"] if quick else []), *(["--results", str(results)] if results else [])]
    return bench(argv)


def main(argv=None) -> int:
    return bench(argv).status


def bench(argv=None) -> common.Outcome:
    args = parse_args(argv)
    if args.worker:
        rows = cpu_worker(args.worker, args.shapes, args.teachers, args.reps, args.distributions, args.filter_eps)
        print(json.dumps(rows))
        return common.Outcome(0, [])
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # here and in the --warm subprocesses (one compile-cache key)
    if args.warm:
        return common.Outcome(warm(args), [])

    name = common.device_name(args.device)
    gemm = "cuBLAS" if args.device == "cuda" else "torch CPU matmul"
    print(f"softmax_kl fwd+bwd, measured against the 2-GEMM floor (h W^T then dz W, {gemm}) on {name}")
    load_before = common.load_average()
    if args.device == "cpu" and load_before and load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"note: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other work shares this CPU, timings are inflated"
        )
    rows, skipped = [], []
    result = {
        **common.run_info(name, "bench_softmax_kl.py", argv),
        "floor": "2 GEMMs: z = h W^T, then dz W",
        "providers_filter": args.providers,
        "distributions": args.distributions,
        "filter_eps": args.filter_eps,
        "jsd_beta": JSD_BETA,
        "rows": rows,
        "skipped": skipped,
    }
    stem = f"softmax_kl-{common.file_tag(name, args.label, 'quick' if args.quick else '')}"
    dirs = common.out_dirs(args.out, only_out=args.quick, results=args.results)

    def checkpoint():
        add_ratios(rows)
        result["load_average_before_after"] = [load_before, common.load_average()]
        common.save(result, stem, dirs)

    def body():
        if args.distributions == "real":
            result["real_inputs"] = prepare_real(args)
        (run_gpu if args.device == "cuda" else run_cpu)(args, rows, skipped, checkpoint)

    status = common.run_keeping_partial(result, body)
    checkpoint()
    print_table(rows, skipped, name)
    print()
    return common.finish("softmax_kl", result, stem, dirs, rows_of, args.quick, status)


if __name__ == "__main__":
    sys.exit(main())
