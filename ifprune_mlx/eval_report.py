"""What `ifprune eval` writes: a JSON file, a Markdown table, a plot of quality vs speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .eval_run import ConditionResult, MetricResult


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _interval(low: float | None, high: float | None) -> str:
    return "" if low is None else f" [{_pct(low)}, {_pct(high)}]"


def _diff(m: MetricResult) -> str:
    if m.diff is None:
        return "-"
    return f"{100 * m.diff:+.1f} [{100 * m.diff_low:+.1f}, {100 * m.diff_high:+.1f}]"


def _label(r: ConditionResult) -> str:
    c = r.condition
    what = "dense" if c.density is None else f"{c.density:.2f} {c.selector}"
    what += " dense-prefill" if c.density is not None and c.prefill == "dense" else ""
    what += {None: "", True: " per-layer", False: " uniform"}[None if c.density is None else c.budgets]
    return f"{c.model} {what}" + (" (reference)" if c.reference else "")


def table(results: Sequence[ConditionResult], metrics: Sequence[str] | None = None) -> list[str]:
    """Markdown lines: one row per condition, task and metric (scores in points, 0-100)."""
    lines = ["| condition | task | metric | score [95% CI] | vs reference [paired 95% CI] | docs "
             "| decode tok/s | time |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        tps = "-" if r.decode_tps is None else f"{r.decode_tps:.1f}"
        minutes = f"{r.seconds / 60:.1f} min" + ("" if r.computed == r.requests else f" ({r.computed} new)")
        for task, by_label in r.metrics.items():
            for label, m in by_label.items():
                if metrics and label.split(",")[0] not in metrics:
                    continue
                lines.append(f"| {_label(r)} | {task} | {label} | {_pct(m.score)}{_interval(m.low, m.high)} "
                             f"| {_diff(m)} | {m.docs} | {tps} | {minutes} |")
    return lines


def write_json(results: Sequence[ConditionResult], path: Path, meta: dict) -> None:
    """Everything measured, per-document values included (for later paired comparisons)."""
    path.write_text(json.dumps({**meta, "conditions": [r.to_json() for r in results]}, indent=1) + "\n")


def primary_metrics(results: Sequence[ConditionResult]) -> dict[str, str]:
    """task -> the metric plotted: its first one that has an interval (else its first)."""
    chosen: dict[str, str] = {}
    for r in results:
        for task, by_label in r.metrics.items():
            if task in chosen or not by_label:
                continue
            labels = list(by_label)
            chosen[task] = next((l for l in labels if by_label[l].low is not None), labels[0])
    return chosen


def plot(results: Sequence[ConditionResult], path: Path, title: str) -> bool:
    """Each task's primary metric vs decode tok/s (one panel per task); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = primary_metrics(results)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.4 * max(1, len(tasks)), 4.4), squeeze=False)
    for ax, (task, label) in zip(axes[0], tasks.items()):
        for r in results:
            m = r.metrics.get(task, {}).get(label)
            if m is None or r.decode_tps is None:
                continue
            c = r.condition
            yerr = None if m.low is None else [[100 * (m.score - m.low)], [100 * (m.high - m.score)]]
            color = "black" if c.reference else ("tab:blue" if c.selector in (None, "predictor") else "tab:orange")
            marker = "s" if c.density is None else "o"
            ax.errorbar([r.decode_tps], [100 * m.score], yerr=yerr, fmt=marker, color=color, capsize=3)
            short = "dense" if c.density is None else f"{c.density:.2f} {c.selector}"
            ax.annotate(f"{short} (reference)" if c.reference else short, (r.decode_tps, 100 * m.score),
                        textcoords="offset points", xytext=(5, -3), fontsize=7)
        ax.set_xlabel("decode tokens/s (measured during the run)")
        ax.set_ylabel(f"{label.split(',')[0]} (%)")
        ax.set_title(task, fontsize=9)
        ax.margins(x=0.25)
        ax.grid(alpha=0.3)
    references = sorted({r.condition.model for r in results if r.condition.reference})
    others = {r.condition.model for r in results if not r.condition.reference}
    separate = [m for m in references if m not in others]  # --reference: another model
    fig.suptitle(title + (f"\nreference (black): {', '.join(separate)}, dense" if separate else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def markdown(results: Sequence[ConditionResult], command: str, meta: dict, plot_name: str | None) -> str:
    """A Markdown page: how it was run, the table, what the numbers mean, the plot."""
    lines = [f"# ifprune eval: {meta['model']}", "", f"Written by `{command}` ({meta['date']}, "
             f"load average {meta['load']}).", "", *table(results), "",
             "Scores in points (0-100) with bootstrap 95% intervals over the documents; \"vs reference\" is "
             "the score minus the reference's on the same documents with a paired bootstrap 95% interval. "
             "Decode tok/s: generated tokens over decode time, measured while the answers were generated "
             "(on a shared machine: compare within a run). Time: wall time of the condition in this run "
             "(\"new\": requests computed now, the rest from the cache)."]
    if plot_name:
        lines += ["", f"![quality vs speed]({plot_name})"]
    return "\n".join(lines) + "\n"
