"""Per-job ``report.json`` and a PNG of the loss curve; a short metrics table for the terminal."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

TABLE_COLUMNS = ("kl_soft", "kl_none", "gap_closed", "top1_agreement", "exact_match", "rouge_l", "compression_ratio", "steps", "seconds")


def write_report(folder: Path, report: dict) -> None:
    """The loss PNG, then ``report.json`` atomically: a job whose report exists is finished and exported."""
    folder.mkdir(parents=True, exist_ok=True)
    plot_losses({report["job_id"]: report["losses"]}, folder / "loss.png", title=f"job {report['job_id']}")
    tmp = folder / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, folder / "report.json")


def plot_losses(curves: dict[str, list[float]], path: Path, title: str = "", ylabel: str = "training loss (nats / token)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if all(x > 0 for losses in curves.values() for x in losses):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
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
                cells.append("nan" if math.isnan(value) else f"{value:.1f}" if column in ("seconds", "compression_ratio") else f"{value:.3f}")
            else:
                cells.append("-" if value is None else str(value))
        rows.append(tuple(cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
