"""softmax_kl forward + backward (gradient for h only), every provider side by side in one run.

Measured against the 2-GEMM floor: ``z = h W^T`` then ``dz W`` with the vendor GEMM (cuBLAS on GPU),
the least any fused loss has to do. Each provider runs when it is installed:

- GPU (default): floor, torch eager, torch.compile, Liger ``LigerFusedLinearKLDivLoss`` (bf16 and fp32 q),
  fastsoft (every backend that runs on CUDA); for hard targets also Apple cut-cross-entropy and Liger's
  fused linear cross-entropy. N = 8192 at the four (H, V) of shared/ANCHORS.md, dense, sparse (K = 64 +
  tail) and hard teachers, bf16. Median ms via ``triton.testing.do_bench`` (20 / 80 % quantiles), peak
  extra CUDA memory over the inputs.
- CPU (``--device cpu``): floor (torch matmuls), torch eager, fastsoft reference, fastsoft cpp; fp32;
  small shapes plus the C++ target shape N=2048, H=576, V=49152. Each provider runs in a fresh
  subprocess and its peak extra memory is the rise of the process's peak RSS (VmHWM, reset before
  each measurement; glibc is told to return large blocks to the system so freed memory is not hidden).

Writes ``benchmarks/results/softmax_kl-<device>.json`` and ``.png`` (and a copy under ``--out``), and
prints a table. ``--quick``: a seconds-long CPU smoke run (one tiny shape, two repetitions); with
``--out`` it writes only there.

    python benchmarks/bench_softmax_kl.py                 # GPU, everything
    python benchmarks/bench_softmax_kl.py --device cpu    # CPU
    python benchmarks/bench_softmax_kl.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):  # fastsoft from the checkout; device.py beside this script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from device import device_name  # noqa: E402

GPU_SHAPES = [(576, 49152), (896, 151936), (2048, 128256), (4096, 128256)]  # (H, V) of ANCHORS.md
GPU_TOKENS = 8192
CPU_SHAPES = [(256, 64, 4096), (512, 256, 32000), (2048, 576, 49152)]  # (N, H, V); the last is the C++ target
QUICK_SHAPES = [(64, 32, 1001)]
SPARSE_K = 64
TEMPERATURE = 1.0


# ------------------------------------------------------------------------------------------------------
# inputs and providers
# ------------------------------------------------------------------------------------------------------

def make_inputs(n, hd, v, teacher, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hd, device=device, generator=gen, dtype=torch.float32).to(dtype)
    W = (torch.randn(v, hd, device=device, generator=gen, dtype=torch.float32) / math.sqrt(hd) * 2).to(dtype)
    if teacher == "dense":
        t = torch.randn(n, v, device=device, generator=gen, dtype=torch.float32)
        t = torch.log_softmax(t.mul_(2), -1).to(dtype)  # cached dense log-probs in the model dtype
    elif teacher == "sparse":
        from fastsoft.ops import SparseTarget

        ids = torch.stack([torch.randperm(v, device=device, generator=gen)[:SPARSE_K] for _ in range(min(n, 1))]).expand(n, -1)
        ids = (ids + torch.arange(n, device=device)[:, None] * 7919) % v  # distinct ids per row, varied rows
        probs = torch.softmax(torch.randn(n, SPARSE_K, device=device, generator=gen), -1) * 0.9
        t = SparseTarget(ids.contiguous(), probs, 1 - probs.sum(-1))
    else:  # hard targets: one id per row
        t = torch.randint(0, v, (n,), device=device, generator=gen)
    return h, W, t


def _eager_rows(h, W, t, temperature=TEMPERATURE):
    from fastsoft.ops import SparseTarget

    logp = torch.log_softmax((h @ W.T).float() / temperature, -1)
    if isinstance(t, SparseTarget):
        w = t.probs.float()
        loss = (torch.xlogy(w, w) - w * logp.gather(1, t.ids)).sum(-1)
        outside = torch.logsumexp(logp.scatter(1, t.ids, float("-inf")), -1)
        r = t.tail.float()
        return loss + torch.xlogy(r, r) - r * outside
    if t.dim() == 1:
        return -logp.gather(1, t[:, None])[:, 0]
    q = torch.log_softmax(t.float() / temperature, -1)
    return (q.exp() * (q - logp)).sum(-1)


def eager_loss(h, W, t):
    return _eager_rows(h, W, t).mean()


def provider_fns(device: str, teacher: str) -> dict:
    """name -> fn(h, W, t) returning a scalar to backprop (or None for the floor, which backprops itself)."""
    from fastsoft.ops import SparseTarget, softmax_kl
    from fastsoft.ops.softmax_kl import BackendUnavailable, resolve_backend

    fns = {}

    def floor(h, W, t):
        z = h.detach() @ W.T
        return z @ W  # dz W with dz the same size and dtype as the logits

    fns["floor (2 GEMMs)"] = floor
    fns["torch eager"] = eager_loss
    if device == "cuda" and teacher == "dense":  # compile time is minutes per shape: the dense anchor only
        fns["torch.compile"] = torch.compile(eager_loss, dynamic=False)
    for backend in ("triton", "cpp", "reference"):
        try:
            resolve_backend(backend, torch.device(device))
        except BackendUnavailable:
            continue

        def fast(h, W, t, backend=backend):
            if isinstance(t, torch.Tensor) and t.dim() == 1:  # hard targets
                t = SparseTarget.one_hot(t)
            return softmax_kl(h, W, t, temperature=TEMPERATURE, backend=backend)

        fns[f"fastsoft {backend}"] = fast
    if device == "cuda" and teacher == "dense":
        try:
            from liger_kernel.transformers import LigerFusedLinearKLDivLoss

            liger = LigerFusedLinearKLDivLoss(reduction="batchmean", temperature=TEMPERATURE)
            fns["liger (bf16 q)"] = lambda h, W, t: liger(h, W, t)
            fns["liger (fp32 q)"] = lambda h, W, t: liger(h, W, t)
        except ImportError:
            pass
    if device == "cuda" and teacher == "hard":
        try:
            from cut_cross_entropy import linear_cross_entropy

            fns["cut-cross-entropy"] = lambda h, W, t: linear_cross_entropy(h, W, t)
        except ImportError:
            pass
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            flce = LigerFusedLinearCrossEntropyLoss()
            fns["liger FLCE"] = lambda h, W, t: flce(W, h, t)
        except ImportError:
            pass
    return fns


def provider_teacher(name: str, t):
    """The teacher in the form each provider takes: Liger wants probabilities."""
    if name.startswith("liger (") and isinstance(t, torch.Tensor):
        q = t.float().exp()
        return q if "fp32" in name else q.to(t.dtype)
    return t


# ------------------------------------------------------------------------------------------------------
# GPU measurement (in process)
# ------------------------------------------------------------------------------------------------------

def bench_gpu(name, fn, h, W, t, reps):
    import triton

    x = h.detach().requires_grad_()
    tt = provider_teacher(name, t)

    def step():
        x.grad = None
        out = fn(x, W, tt)
        if out.requires_grad:
            out.backward()

    step()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    x.grad = None  # the measured step's peak includes its own input gradient (as Liger's anchor numbers do)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(step, rep=max(100, 25 * reps), quantiles=[0.5, 0.2, 0.8], grad_to_none=[x])
    del tt
    return {"median_ms": ms[0], "q20_ms": ms[1], "q80_ms": ms[2], "peak_extra_mib": peak / 2**20}


def run_gpu(args) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for hd, v in args.shapes or GPU_SHAPES:
        for teacher in args.teachers:
            h, W, t = make_inputs(args.tokens, hd, v, teacher, torch.bfloat16, "cuda")
            for name, fn in provider_fns("cuda", teacher).items():
                if args.providers and not any(p in name for p in args.providers):
                    continue
                row = {"n": args.tokens, "h": hd, "v": v, "teacher": teacher, "provider": name, "dtype": "bfloat16"}
                try:
                    row.update(bench_gpu(name, fn, h, W, t, args.reps))
                except Exception as error:  # an out-of-memory eager run must not end the table
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                    torch.cuda.empty_cache()
                rows.append(row)
                print(_fmt_row(row), flush=True)
            del h, W, t
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------------
# CPU measurement (a fresh subprocess per provider; peak RSS)
# ------------------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _mmap_threshold(nbytes: int) -> None:
    """glibc M_MMAP_THRESHOLD: blocks above it come from (and go back to) the OS, so RSS shows them."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)
        libc.malloc_trim(0)  # hand back what the heap still holds from earlier steps
    except (OSError, AttributeError):
        pass


def cpu_worker(provider: str, shapes, teachers, reps: int) -> list[dict]:
    rows = []
    for n, hd, v in shapes:
        for teacher in teachers:
            fns = provider_fns("cpu", teacher)
            if provider not in fns:
                continue
            fn = fns[provider]
            h, W, t = make_inputs(n, hd, v, teacher, torch.float32, "cpu")
            row = {"n": n, "h": hd, "v": v, "teacher": teacher, "provider": provider, "dtype": "float32"}
            try:
                x = h.detach().requires_grad_()

                def step():
                    x.grad = None
                    out = fn(x, W, t)
                    if out.requires_grad:
                        out.backward()

                _mmap_threshold(64 * 1024)  # memory: no freed buffer may hide in the heap for the next step
                step()  # warm-up (JIT build, thread pools)
                x.grad = None
                gc.collect()
                _mmap_threshold(64 * 1024)
                exact = _reset_peak_rss()
                base = _rss_kib("VmRSS:")
                step()
                peak = _rss_kib("VmHWM:")
                _mmap_threshold(32 * 2**20)  # timing steps: glibc's usual large-block behaviour
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - start) * 1e3)
                times.sort()
                row.update(median_ms=statistics.median(times), q20_ms=times[int(0.2 * (len(times) - 1))],
                           q80_ms=times[int(0.8 * (len(times) - 1))], peak_extra_mib=max(0, peak - base) / 1024,
                           peak_exact=exact)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            del h, W, t
            gc.collect()
    return rows


def run_cpu(args) -> list[dict]:
    shapes = args.shapes or (QUICK_SHAPES if args.quick else CPU_SHAPES)
    providers = [p for p in ("floor (2 GEMMs)", "torch eager", "fastsoft cpp", "fastsoft reference")
                 if not args.providers or any(q in p for q in args.providers)]
    rows = []
    for provider in providers:
        cmd = [sys.executable, __file__, "--worker", provider, "--device", "cpu", "--reps", str(args.reps),
               "--teachers", *args.teachers, "--shapes", *[f"{n}x{h}x{v}" for n, h, v in shapes]]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"provider": provider, "error": proc.stderr[-500:]})
            print(f"{provider}: worker failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        for row in json.loads(proc.stdout.strip().splitlines()[-1]):
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------

def _fmt_row(row) -> str:
    shape = f"N={row.get('n')} H={row.get('h')} V={row.get('v')} {row.get('teacher', '')}"
    if "error" in row:
        return f"  {shape:42s} {row['provider']:22s} error: {row['error'][:120]}"
    return (f"  {shape:42s} {row['provider']:22s} {row['median_ms']:9.3f} ms  [{row['q20_ms']:.3f}, {row['q80_ms']:.3f}]"
            f"  peak extra {row['peak_extra_mib']:9.1f} MiB")


def add_ratios(rows):
    floors = {(r["n"], r["h"], r["v"], r["teacher"]): r["median_ms"] for r in rows if r.get("provider") == "floor (2 GEMMs)" and "median_ms" in r}
    for r in rows:
        key = (r.get("n"), r.get("h"), r.get("v"), r.get("teacher"))
        if key in floors and "median_ms" in r:
            r["x_floor"] = r["median_ms"] / floors[key]


def print_table(rows, device_name):
    groups = {}
    for r in rows:
        if "n" in r:
            groups.setdefault((r["teacher"], r["n"], r["h"], r["v"]), []).append(r)
    providers = list(dict.fromkeys(r["provider"] for r in rows if "n" in r))
    print(f"\nsoftmax_kl fwd+bwd on {device_name}: median ms (x the 2-GEMM floor) / peak extra MiB")
    header = f"| {'teacher':7s} | {'N, H, V':22s} | " + " | ".join(f"{p:>24s}" for p in providers) + " |"
    print(header)
    print("|" + "---|" * (2 + len(providers)))
    for (teacher, n, hd, v), group in groups.items():
        cells = []
        by = {r["provider"]: r for r in group}
        for p in providers:
            r = by.get(p)
            if r is None:
                cells.append(f"{'-':>24s}")
            elif "error" in r:
                cells.append(f"{'error':>24s}")
            else:
                ratio = f" ({r['x_floor']:.2f}x)" if "x_floor" in r else ""
                cells.append(f"{r['median_ms']:.2f}{ratio} / {r['peak_extra_mib']:.0f}".rjust(24))
        print(f"| {teacher:7s} | {f'{n}, {hd}, {v}':22s} | " + " | ".join(cells) + " |")


def plot(rows, path: Path, device_name: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    teachers = list(dict.fromkeys(r["teacher"] for r in rows if "median_ms" in r))
    if not teachers:
        return None
    fig, axes = plt.subplots(1, len(teachers), figsize=(6 * len(teachers), 4.5), squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        sub = [r for r in rows if r.get("teacher") == teacher and "median_ms" in r]
        shapes = list(dict.fromkeys((r["n"], r["h"], r["v"]) for r in sub))
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            ys = [next((r["median_ms"] for r in sub if r["provider"] == p and (r["n"], r["h"], r["v"]) == s), float("nan")) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"N{n}\nH{h} V{v}" for n, h, v in shapes], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd median ms (log)")
        ax.set_title(f"{teacher} teacher")
        ax.legend(fontsize=7)
    fig.suptitle(f"softmax_kl on {device_name} (floor = 2 GEMMs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="seconds-long CPU smoke run")
    parser.add_argument("--tokens", type=int, default=GPU_TOKENS, help="N on the GPU")
    parser.add_argument("--teachers", nargs="+", default=None, choices=["dense", "sparse", "hard"])
    parser.add_argument("--providers", nargs="+", default=None, help="substrings of provider names to run")
    parser.add_argument("--shapes", nargs="+", default=None, help="GPU: HxV; CPU: NxHxV")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also copy the JSON and PNG here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shapes:
        args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    if args.teachers is None:
        args.teachers = ["dense", "sparse"] if args.device == "cpu" else ["dense", "sparse", "hard"]
    if args.reps is None:
        args.reps = 2 if args.quick else (5 if args.device == "cpu" else 20)
    if args.worker:
        print(json.dumps(cpu_worker(args.worker, args.shapes, args.teachers, args.reps)))
        return 0
    if args.quick:
        args.device = "cpu"

    name = device_name(args.device)
    print(f"softmax_kl fwd+bwd, measured against the 2-GEMM floor (h W^T then dz W, {'cuBLAS' if args.device == 'cuda' else 'torch CPU matmul'}) on {name}")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.device == "cpu" and load_before and load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other work shares this CPU, timings are inflated")
    rows = run_gpu(args) if args.device == "cuda" else run_cpu(args)
    add_ratios(rows)
    print_table(rows, name)

    import triton

    tag = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    tag = f"{tag}{'-quick' if args.quick else ''}"
    result = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "floor": "2 GEMMs: z = h W^T, then dz W",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows,
        "load_average_before_after": [load_before, os.getloadavg() if hasattr(os, "getloadavg") else None],
    }
    outdirs = ([] if args.quick and args.out else [ROOT / "benchmarks" / "results"]) + ([args.out] if args.out else [])
    for outdir in outdirs:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / f"softmax_kl-{tag}.json").write_text(json.dumps(result, indent=1))
        plot(rows, outdir / f"softmax_kl-{tag}.png", name)
    print(f"\nwrote {outdirs[0] / f'softmax_kl-{tag}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
