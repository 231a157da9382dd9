"""What the benchmarks share: the checkout on ``sys.path``, the device's name, the versions and the checkout every
result names, timing (medians and quantiles, calls interleaved), peak memory, how a provider that did not run says
why, and where results go: each run's raw JSON, its rows in the one results table (``all.csv``) and the table's
figure (``plot.py``).

A benchmark script finds this module beside itself and imports it first::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # noqa: E402  (puts the checkout on sys.path: fastsoft from the tree)

and ends with ``common.finish(...)``, which writes its JSON, merges its rows into the table and draws the figure.
Every maintained benchmark is a module with ``run(quick, device, results) -> Outcome`` (``benchmarks/run.py`` lists
them) beside its own ``main(argv)``.

The table, ``<results>/all.csv``: one row per measured number, the columns ``FIELDS``; a row is known by ``KEY``, and
a benchmark's rows replace the rows of the same key, leaving every other row (other devices, cases, benchmarks).
``value`` is the median where ``q20`` / ``q80`` (the 20 / 80 % quantiles) are given; ``commit`` is the checkout's
HEAD (empty outside git) and ``uncommitted`` the number of library files changed since it; ``date`` is when the run
began; ``source`` names the raw JSON beside the table that holds everything else the run measured.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # fastsoft from the checkout, never an installed copy
    sys.path.insert(0, str(ROOT))

TABLE = "all.csv"
FIELDS = (
    "benchmark", "case", "provider", "metric", "value", "unit", "q20", "q80",
    "device", "quick", "commit", "uncommitted", "date", "source",
)  # fmt: skip
KEY = ("benchmark", "device", "quick", "case", "provider", "metric")

# Why a provider did not run: one of these, then ": <detail>" (see ``skip``).
NOT_INSTALLED = "not installed"
NOT_SUPPORTED = "not supported on this device"
ERRORED = "errored"


# ------------------------------------------------------------------------------------------------------
# device and versions
# ------------------------------------------------------------------------------------------------------


def device_name(device_type: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo with the core count (``AMD EPYC x2``)."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
        name = f"{model} x{os.cpu_count()}" if model else name
    except OSError:
        pass
    return name


def file_tag(name: str, *suffixes: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``, then ``-<suffix>`` for each non-empty suffix."""
    tag = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    return "-".join([tag, *(s for s in suffixes if s)])


def run_info(device: str, script: str, argv: list[str] | None) -> dict:
    """The fields every result JSON starts with: device, versions, the command that produced it, when, and the
    checkout it measured."""
    triton, _ = optional_import("triton")
    args = sys.argv[1:] if argv is None else argv
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "python": platform.python_version(),
        "command": " ".join(["python", f"benchmarks/{script}", *args]),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkout": checkout_state(),
    }


def checkout_state(root: Path = ROOT) -> dict:
    """The commit measured, and the library files changed in the working tree since (uncommitted work in progress);
    ``commit`` is None outside a git checkout (a copied tree on a lent GPU machine)."""

    def git(*args: str) -> str:  # not stripped: a porcelain line's status columns start with a space
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "fastsoft", "csrc", "kernels").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted_library_files": changed}


def load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


# ------------------------------------------------------------------------------------------------------
# providers that did not run
# ------------------------------------------------------------------------------------------------------


def optional_import(module: str, attr: str | None = None):
    """``(object, None)``, or ``(None, "not installed: <why>")`` when the module (or its attribute) is missing."""
    try:
        mod = importlib.import_module(module)
        return (getattr(mod, attr) if attr else mod), None
    except (ImportError, AttributeError) as error:
        return None, f"{NOT_INSTALLED}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else module}"


def skip(skipped: list[dict], provider: str, reason: str, **where) -> None:
    """Record that ``provider`` did not run and why; one entry per (provider, reason), ``where`` merged into lists."""
    for entry in skipped:
        if entry["provider"] == provider and entry["reason"] == reason:
            for key, value in where.items():
                if value not in entry.setdefault(key, []):
                    entry[key].append(value)
            return
    skipped.append({"provider": provider, "reason": reason, **{key: [value] for key, value in where.items()}})


def error_text(error: BaseException, limit: int = 300) -> str:
    return f"{type(error).__name__}: {str(error).strip()[:limit]}"


def print_skipped(skipped: list[dict]) -> None:
    if not skipped:
        return
    print("\nproviders that did not run:")
    for entry in skipped:
        where = "; ".join(
            f"{key} {', '.join(map(str, values))}" for key, values in entry.items() if key not in ("provider", "reason")
        )
        print(f"  {entry['provider']}: {entry['reason']}" + (f" ({where})" if where else ""))


# ------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def repeat(fn: Callable, device, reps: int) -> tuple[list[float], object]:
    """Wall seconds of ``reps`` calls (the device synchronised around each), and the last result."""
    times, result = [], None
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def timed(fn: Callable, device, reps: int, warmup: Callable | None = None) -> tuple[float, object]:
    """Median seconds of ``reps`` calls after one warm-up call (``warmup`` if given, else ``fn``), and the last result."""
    (warmup or fn)()
    times, result = repeat(fn, device, reps)
    return statistics.median(times), result


def interleaved(fns: dict[str, Callable], device, reps: int, inner: int = 1) -> dict[str, list[float]]:
    """Seconds a call of each of ``fns``, ``reps`` samples each: a sample is ``inner`` calls in a row, and the
    providers take turns sample by sample (the order reversed every round), so drift in the machine's speed falls on
    all of them alike. Warm up first (one call each)."""
    names, times = list(fns), {name: [] for name in fns}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            fn = fns[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return times


def quantiles_ms(seconds: list[float]) -> dict:
    """Median and the 20 / 80 % quantiles in ms, linearly interpolated between samples (as ``torch.quantile`` and so
    ``triton.testing.do_bench``, which gives these fields on a GPU, compute them)."""
    ms = sorted(s * 1e3 for s in seconds)

    def at(p: float) -> float:
        pos = p * (len(ms) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (pos - lo)

    return {"median_ms": statistics.median(ms), "q20_ms": at(0.2), "q80_ms": at(0.8)}


# ------------------------------------------------------------------------------------------------------
# peak memory (CPU: the process's resident set; glibc told to hand large blocks back, so RSS shows them)
# ------------------------------------------------------------------------------------------------------


def rss_kib(field: str = "VmRSS:") -> int:
    """A ``/proc/self/status`` field in KiB: ``VmRSS:`` (resident now) or ``VmHWM:`` (its peak); 0 where unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Hand back to the system what glibc's heap still holds from earlier work."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD: blocks above it come from (and go back to) the system, so RSS shows them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)
    malloc_trim()


# ------------------------------------------------------------------------------------------------------
# small models for the quick runs (the tests' tiny Llama, built here without pytest)
# ------------------------------------------------------------------------------------------------------


def tiny_model(folder: Path, chatty: bool = False) -> Path:
    """The tests' tiny Llama (H = 64, 2 layers, ~400-token vocabulary, ``tests/conftest.py``) saved into ``folder``;
    ``chatty``: with five end tokens, so self-study keeps some of what it writes (the tests' ``chatty_model_dir``)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from conftest import build_model, build_tokenizer
    finally:
        sys.path.remove(str(ROOT / "tests"))
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    if chatty:
        ends = [tokenizer.convert_tokens_to_ids(t) for t in ["?", ".", "Ġthe", "s"]]
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *ends]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------------
# arguments and results
# ------------------------------------------------------------------------------------------------------


def run_keeping_partial(result: dict, body: Callable[[], None]) -> int:
    """Run ``body``, which fills ``result``; the exit status. An interrupt (gpu_run.sh's time limit sends SIGINT)
    or an error is said and noted in ``result`` (``interrupted`` / ``error``) instead of losing it: the caller
    then prints and saves what was measured. ``complete`` says whether ``body`` ran to its end."""
    result["complete"] = False
    try:
        body()
        result["complete"] = True
        return 0
    except KeyboardInterrupt:
        result["interrupted"] = "stopped by SIGINT before the end; what is here was measured"
        print(f"\ninterrupted: {result['interrupted']}", flush=True)
        return 130
    except Exception as error:  # noqa: BLE001 - said, and saved with what was measured before it
        traceback.print_exc()
        result["error"] = error_text(error, 2000)
        return 1


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the script's first docstring paragraph, with the shared ``--results`` and
    ``--out``."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="the results folder (JSON, all.csv, figures; default benchmarks/results/)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON, the table and the figure here")
    return parser


def out_dirs(out: Path | None, only_out: bool = False, results: Path | None = None) -> list[Path]:
    """The results folder (``results``, else ``benchmarks/results/``) and ``--out``; only ``--out`` for smoke runs
    that pass it without ``results``."""
    dirs = ([] if only_out and out and not results else [results or RESULTS]) + ([out] if out else [])
    return list({d.resolve(): d for d in dirs}.values())


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(result: dict, stem: str, dirs: list[Path]) -> str:
    """Write ``<stem>.json`` into every folder (call it as results come, so a stopped run keeps them); one line for
    the log."""
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_text(folder / f"{stem}.json", json.dumps(result, indent=1))
    wrote = f"wrote {dirs[0] / f'{stem}.json'}"
    return wrote + (f" (and in {', '.join(map(str, dirs[1:]))})" if dirs[1:] else "")


def atomic_text(path: Path, text: str) -> None:
    """``path`` replaced whole or not at all (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------
# the results table
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What a benchmark's ``run`` returns: its exit status and the rows it put in the table."""

    status: int
    rows: list[dict]


def row(case: str, provider: str, metric: str, value, unit: str, q20=None, q80=None) -> dict:
    """One measured number; ``finish`` adds the benchmark, device, commit, date and source."""
    return {"case": case, "provider": provider, "metric": metric, "value": value, "unit": unit, "q20": q20, "q80": q80}


def timing_row(case: str, provider: str, metric: str, seconds: list[float]) -> dict:
    """A row of ms: the median of ``seconds`` with its 20 / 80 % quantiles."""
    q = quantiles_ms(seconds)
    return row(case, provider, metric, q["median_ms"], "ms", q["q20_ms"], q["q80_ms"])


def key(r: dict) -> tuple:
    return tuple(str(r.get(k, "")) for k in KEY)


def read_table(path: Path) -> list[dict]:
    """The table's rows (numbers as floats, ``quick`` as a bool); [] when there is no table."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        return []
    for r in rows:
        for k in ("value", "q20", "q80"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
        r["quick"] = r.get("quick") == "true"
        r["uncommitted"] = int(r["uncommitted"]) if r.get("uncommitted") not in (None, "") else None
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each row of ``new``'s keys replaced in place, then ``new``'s other rows in their order."""
    fresh = {key(r): r for r in new}
    merged = [fresh.pop(key(r), r) for r in old]
    return merged + list(fresh.values())


def write_table(path: Path, rows: list[dict]) -> None:
    def cell(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:.6g}"
        return "" if value is None else value

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: cell(r.get(k)) for k in FIELDS} for r in rows)
    os.replace(tmp, path)


def table_rows(benchmark: str, rows: list[dict], result: dict, quick: bool, source: str) -> list[dict]:
    """``rows`` completed with what every row names: the benchmark, the device, quick or not, the checkout, the date
    and the raw JSON's file name; rows without a finite value are left out."""
    checkout = result.get("checkout") or {}
    common = {
        "benchmark": benchmark,
        "device": result.get("device", ""),
        "quick": bool(quick),
        "commit": checkout.get("commit") or "",
        "uncommitted": len(checkout.get("uncommitted_library_files") or []),
        "date": result.get("time", time.strftime("%Y-%m-%d %H:%M:%S")),
        "source": source,
    }
    done = []
    for r in rows:
        value = r.get("value")
        if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            done.append({**r, **common, "value": float(value)})
    return done


def finish(
    benchmark: str, result: dict, stem: str, dirs: list[Path], rows_of: Callable, quick: bool, status: int = 0
) -> Outcome:
    """The end of a run: ``<stem>.json`` into every folder, then ``rows_of(result)`` merged into each folder's
    ``all.csv`` and the benchmark's figure drawn from it (``plot.py``; without matplotlib: skipped, one line says
    so). The JSON is written first, so a failing row or figure never costs the measured numbers. ``status``: the
    run's exit status, passed through."""
    print(save(result, stem, dirs))
    try:
        rows = table_rows(benchmark, rows_of(result), result, quick, f"{stem}.json")
    except Exception as error:  # noqa: BLE001 - the JSON is written; say why the table is not
        print(f"no table rows: {error_text(error)}")
        return Outcome(status, [])
    import plot  # beside this module

    for folder in dirs:
        table = folder / TABLE
        write_table(table, merge_rows(read_table(table), rows))
        figure = plot.draw(table, benchmark, result.get("device", ""), quick)
        print(f"{len(rows)} rows into {table}" + (f", figure {figure}" if figure else ""))
    return Outcome(status, rows)
