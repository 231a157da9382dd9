"""What the benchmarks share: the checkout on ``sys.path``, the device's name, where results go and how
they are written (JSON first, then a PNG when matplotlib is there), timing, the versions every result
names, and how a provider that did not run says why.

A benchmark script finds this module beside itself and imports it first::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # noqa: E402  (puts the checkout on sys.path: fastsoft from the tree)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
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


def quantiles_ms(seconds: list[float]) -> dict:
    """Median and the 20 / 80 % quantiles in ms (the fields ``triton.testing.do_bench`` gives on a GPU)."""
    ms = sorted(s * 1e3 for s in seconds)
    return {
        "median_ms": statistics.median(ms),
        "q20_ms": ms[int(0.2 * (len(ms) - 1))],
        "q80_ms": ms[int(0.8 * (len(ms) - 1))],
    }


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
    """An argument parser described by the script's first docstring paragraph, with the shared ``--out``."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON and PNG here")
    return parser


def out_dirs(out: Path | None, only_out: bool = False) -> list[Path]:
    """``benchmarks/results/`` and ``--out`` (only ``--out`` for smoke runs that pass it)."""
    dirs = ([] if only_out and out else [RESULTS]) + ([out] if out else [])
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


def save(result: dict, stem: str, dirs: list[Path], plot: Callable | None = None) -> str:
    """Write ``<stem>.json`` into every folder; with ``plot(result, plt, path)``, then ``<stem>.png`` too.

    The JSON is written first, so a missing matplotlib or a failing plot costs only the PNG (one line says
    so). Call it without ``plot`` to save partial results as they come. Returns what it wrote in the first
    folder, as one line for the log.
    """
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(result, indent=1))
    first = dirs[0] / f"{stem}.json"
    wrote = f"wrote {first}" + (f" (and in {', '.join(map(str, dirs[1:]))})" if dirs[1:] else "")
    if plot is None:
        return wrote
    plt = pyplot()
    if plt is None:
        print(f"matplotlib is not installed: {stem}.png skipped (table and JSON written)")
        return wrote
    png = first.with_suffix(".png")
    try:
        plot(result, plt, png)
    except Exception as error:  # noqa: BLE001 - a plot must never cost the measured numbers
        print(f"plot failed, {stem}.png skipped: {error_text(error)}")
        return wrote
    finally:
        plt.close("all")
    if not png.exists():  # the plot found nothing to draw (and said so)
        return wrote
    for folder in dirs[1:]:
        shutil.copyfile(png, folder / png.name)
    return wrote.replace(".json", ".json and .png", 1)
