"""The results table's figures: one a benchmark and device, drawn from ``benchmarks/results/all.csv``.

    python benchmarks/plot.py                       # every benchmark and device in the table
    python benchmarks/plot.py layers softmax_kl     # these benchmarks only
    python benchmarks/plot.py --results DIR         # the table of another results folder

Each benchmark's run draws its own figure when it ends (``common.finish``); this script draws them again from the
table. The figure is ``<results>/<benchmark>-<device>.png`` for the full-size rows and ``...-quick.png`` for the
quick (smoke-size) ones: a panel per metric (and per group: the part of a case before ``": "``, e.g. a teacher or an
op), the cases down the side and a bar per provider (the median; whiskers at the 20 / 80 % quantiles where the row
has them), the unit on the axis, a log axis where the values span more than 30x, and the device, the commits and
the dates in the title. Curves the table does not hold (the student's held-out gap against training seconds, the
end-to-end run's loss by step) are drawn from the raw JSON the rows name (``source``) when it lies beside the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def figure_path(folder: Path, benchmark: str, device: str, quick: bool) -> Path:
    return folder / f"{benchmark}-{common.file_tag(device, 'quick' if quick else '')}.png"


def group_of(case: str) -> tuple[str, str]:
    """``"dense: N 2048 ..."`` -> ``("dense", "N 2048 ...")``; a case without ``": "`` has no group."""
    head, sep, rest = case.partition(": ")
    return (head, rest) if sep else ("", case)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"


def _bars(ax, rows: list[dict], colors: dict) -> None:
    """One panel: the cases down the side, a bar per provider, whiskers at the quantiles, the value at the bar's end."""
    cases = list(dict.fromkeys(group_of(r["case"])[1] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    height = 0.8 / len(providers)
    values = [r["value"] for r in rows]
    positive = [v for v in values if v > 0]
    log = len(positive) == len(values) and max(positive) / min(positive) > 30
    for j, provider in enumerate(providers):
        ys, xs, lo, hi = [], [], [], []
        for i, case in enumerate(cases):
            r = next((r for r in rows if r["provider"] == provider and group_of(r["case"])[1] == case), None)
            if r is None:
                continue
            ys.append(i - 0.4 + height * (j + 0.5))
            xs.append(r["value"])
            lo.append(max(0.0, r["value"] - r["q20"]) if r["q20"] is not None else 0.0)
            hi.append(max(0.0, r["q80"] - r["value"]) if r["q80"] is not None else 0.0)
        err = [lo, hi] if any(lo) or any(hi) else None
        ax.barh(ys, xs, height, xerr=err, color=colors[provider], capsize=2, label=provider)
        for y, x, h in zip(ys, xs, hi):
            ax.text(x + h if not log else (x + h) * 1.05, y, " " + _fmt(x), va="center", fontsize=7)
    ax.set_yticks(range(len(cases)), cases, fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(positive) / 2, max(positive) * 4)
    else:
        top = max([0.0, *(r["q80"] or r["value"] for r in rows)])
        ax.set_xlim(min(0.0, min(values) * 1.2), top * 1.25 if top > 0 else 1.0)
    ax.grid(axis="x", alpha=0.3)


def _student_curves(ax, result: dict) -> bool:
    curves = result.get("curves") or {}
    for method, curve in curves.items():
        ax.plot([p["seconds"] for p in curve], [p["gap_closed"] for p in curve], "o-", ms=3, label=method)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("held-out gap_closed")
    ax.set_title("held-out gap closed against training time", fontsize=9)
    ax.legend(fontsize=7)
    return bool(curves)


def _e2e_curves(ax, result: dict) -> bool:
    curves = (result.get("training") or {}).get("curves") or {}
    for method, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, lw=1.5, ls="--" if "peft" in method else "-", label=method)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL (mean over answer tokens)")
    ax.set_title("training loss by step (same batches, same init)", fontsize=9)
    ax.legend(fontsize=7)
    return bool(curves)


CURVES = {"student": _student_curves, "e2e": _e2e_curves}  # from the raw JSON beside the table


def _title(benchmark: str, device: str, quick: bool, rows: list[dict]) -> str:
    commits = []
    for r in rows:
        commit = (r["commit"] or "no git")[:9] + (f" +{r['uncommitted']} uncommitted" if r["uncommitted"] else "")
        if commit not in commits:
            commits.append(commit)
    dates = sorted({r["date"][:10] for r in rows if r["date"]})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else ""
    size = ", quick (smoke) sizes" if quick else ""
    return f"{benchmark} on {device}{size}\ncommit {', '.join(commits[:3])}{' ...' if len(commits) > 3 else ''}; {when}"


def draw(table: Path, benchmark: str, device: str, quick: bool) -> Path | None:
    """Draw ``benchmark``'s figure for ``device`` (its quick rows or its full ones) from ``table``; the figure's path,
    or None when there is nothing to draw or no matplotlib."""
    table = Path(table)
    rows = [
        r
        for r in common.read_table(table)
        if r["benchmark"] == benchmark and r["device"] == device and r["quick"] == quick
    ]
    if not rows:
        return None
    plt = common.pyplot()
    if plt is None:
        print(f"matplotlib is not installed: the {benchmark} figure is skipped (the table is written)")
        return None
    groups = list(dict.fromkeys(group_of(r["case"])[0] for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    panels = [
        (metric, group, sub)
        for metric in metrics
        for group in groups
        if (sub := [r for r in rows if r["metric"] == metric and group_of(r["case"])[0] == group])
    ]
    curves = None
    if benchmark in CURVES:
        sources = [table.parent / s for s in dict.fromkeys(r["source"] for r in rows) if s]
        path = next((p for p in sources if p.is_file()), None)
        curves = json.loads(path.read_text()) if path else None
    count = len(panels) + (curves is not None)
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    heights = []
    for r0 in range(nrows):
        bars = [len(sub) for _, _, sub in panels[r0 * ncols : (r0 + 1) * ncols]] or [8]
        heights.append(max(2.4, 0.24 * max(bars) + 1.2))
    top = 0.45  # inches above the panels: the title and the providers' legend
    total = sum(heights) + top
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(6.2 * ncols, total), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    flat = list(axes.flat)
    for ax, (metric, group, sub) in zip(flat, panels):
        _bars(ax, sub, colors)
        if len(cases) == 1:  # said once, in the title
            ax.set_yticks([])
        unit = sub[0]["unit"]
        ax.set_xlabel(f"{metric} ({unit})" if unit else metric, fontsize=9)
        ax.set_title(f"{group}: {metric}" if group else metric, fontsize=9)
        if unit == "x":
            ax.axvline(1.0, color="grey", lw=0.8)
    if curves is not None and not CURVES[benchmark](flat[len(panels)], curves):
        flat[len(panels)].set_visible(False)
    for ax in flat[count:]:
        ax.set_visible(False)
    title = _title(benchmark, device, quick, rows)
    if len(cases) == 1:
        title = title.replace("\n", f": {cases[0]}\n", 1)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / total)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in providers]
    fig.legend(
        handles, providers, loc="upper center", ncol=min(len(providers), 5), fontsize=8,
        bbox_to_anchor=(0.5, 1 - 0.5 / total), frameon=False,
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - top / total))
    path = figure_path(table.parent, benchmark, device, quick)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("names", nargs="*", help="benchmarks to draw (default: every one in the table)")
    parser.add_argument("--results", type=Path, default=common.RESULTS, help="the folder of all.csv")
    args = parser.parse_args(argv)
    table = args.results / common.TABLE
    rows = common.read_table(table)
    if not rows:
        print(f"{table}: no rows (run python benchmarks/run.py first)", file=sys.stderr)
        return 1
    known = {r["benchmark"] for r in rows}
    for name in args.names:
        if name not in known:
            parser.error(f"no rows of {name!r} in {table}; the table has: {', '.join(sorted(known))}")
    for benchmark, device, quick in dict.fromkeys((r["benchmark"], r["device"], r["quick"]) for r in rows):
        if not args.names or benchmark in args.names:
            path = draw(table, benchmark, device, quick)
            if path:
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
