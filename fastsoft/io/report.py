"""Per-job ``report.json`` and a PNG of the loss curve; a short metrics table for the terminal.

``report.json`` is written last and records the sha256 of every file of the export (``files``), so a later run can
tell a finished job from one whose export was deleted or changed since (:func:`finished_problem`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fastsoft.io.atomic import atomic_write, sha256_file, write_json

REPORT = "report.json"
EXPORT_FILES = ("adapter_model.safetensors", "adapter_config.json", "fastsoft.json", "loss.png")

TABLE_COLUMNS = (
    "kl_soft",
    "kl_none",
    "gap_closed",
    "top1_agreement",
    "exact_match",
    "rouge_l",
    "compression_ratio",
    "eval_source",  # where the held-out queries come from: eval_queries, synthetic, queries or none
    "steps",
    "seconds",
)


def write_report(folder: Path, report: dict) -> None:
    """The loss PNG, then ``report.json`` atomically: a job whose report exists is finished and exported.

    Adds ``report["files"]``: the sha256 of each of :data:`EXPORT_FILES` in ``folder``, as written."""
    folder.mkdir(parents=True, exist_ok=True)
    levels = {
        name: report[key]
        for key, name in (("kl_none", "held-out KL, no context"), ("kl_soft", "held-out KL with the soft prompt"))
        if isinstance(report.get(key), float) and math.isfinite(report[key])
    }
    plot_losses(
        {"training loss": report["losses"]}, folder / "loss.png", title=f"job {report['job_id']}", levels=levels
    )
    report["files"] = {name: sha256_file(folder / name) for name in EXPORT_FILES if (folder / name).is_file()}
    write_json(folder / REPORT, report)


def finished_problem(folder: Path, origin: dict | None = None) -> str | None:
    """Why ``folder`` does not hold a verified finished job, in a few words; None when it does.

    Verified: ``report.json`` reads, every file it recorded at export is there with the same sha256, and (``origin``
    given) the report's ``origin`` (the job's digest and the settings it ran with) equals it. A report without
    recorded files (written before they were recorded) is reported as such.
    """
    path = folder / REPORT
    if not path.is_file():
        return f"{REPORT} is missing"
    try:
        report = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{REPORT} is damaged"
    files = report.get("files") if isinstance(report, dict) else None
    if not isinstance(files, dict) or "adapter_model.safetensors" not in files:
        return f"{REPORT} records no digests of its export (written by an older fastsoft)"
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != digest:
            return f"{name} changed since it was exported"
    if origin is not None and report.get("origin") != origin:
        return "it was made from another job or other settings"
    return None


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_losses(
    curves: dict[str, list[float]],
    path: Path,
    title: str = "",
    ylabel: str = "loss (nats / token)",
    levels: dict[str, float] | None = None,
) -> None:
    """Each curve raw (faint) and as a trailing mean over a twentieth of its steps; ``levels`` as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, losses in curves.items():
        steps = range(1, len(losses) + 1)
        window = max(1, len(losses) // 20)
        (line,) = ax.plot(
            steps,
            moving_average(losses, window),
            label=name if window == 1 else f"{name} (mean of {window} steps)",
            linewidth=1.6,
        )
        if window > 1:
            ax.plot(steps, losses, color=line.get_color(), linewidth=0.8, alpha=0.3)
    for (name, value), style in zip((levels or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="black", linestyle=style, linewidth=1.0, label=f"{name} ({value:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if all(x > 0 for losses in curves.values() for x in losses) and all(v > 0 for v in (levels or {}).values()):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def format_table(reports: list[dict]) -> str:
    """A plain-text table: one row per job, the metrics of TABLE_COLUMNS."""
    header = ("job",) + TABLE_COLUMNS
    rows = [header]
    for report in reports:
        cells = [str(report.get("job_id"))]
        for column in TABLE_COLUMNS:
            value = report.get(column)
            if isinstance(value, float):
                cells.append(
                    "nan"
                    if math.isnan(value)
                    else f"{value:.1f}"
                    if column in ("seconds", "compression_ratio")
                    else f"{value:.3f}"
                )
            else:
                cells.append("-" if value is None else str(value))
        rows.append(tuple(cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
