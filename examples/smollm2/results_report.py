"""RESULTS.md, results.json and results.png of examples/smollm2/results.py, from its figures."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(entry: dict | None, key: str = "score") -> str:
    if not entry or entry.get(key) is None:
        return "-"
    low, high = entry["ci" if key == "score" else "diff_ci"]
    sign = "+" if key == "diff" else ""
    return f"{100 * entry[key]:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


def verdict(entry: dict | None) -> str:
    """What a paired difference with the reference supports, by its 95% interval alone."""
    if not entry or entry.get("diff") is None:
        return ""
    low, high = entry["diff_ci"]
    if high < 0:
        return "lower"
    if low > 0:
        return "higher"
    return "no difference shown"


def _kl(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['kl']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"


def _measured(cells: list[dict], figures: dict):
    """(cell, its figures) for the cells that have some, in the report's order."""
    return [(cell, figures[cell["id"]]) for cell in cells if cell["id"] in figures]


def _density(cell: dict) -> str:
    return "1.0" if cell["density"] is None else f"{cell['density']:g}"


def task_lines(figures: dict) -> list[str]:
    """The task table: every cell's scores, differences with the original dense model and verdicts."""
    tasks = figures["tasks"]
    if_task, exact_task = tasks["names"]
    lines = ["## Task scores", "",
             f"`{if_task}` (instruction following, IFEval's checkers) and `{exact_task}` (exact answers), "
             f"{tasks['documents'].get(if_task, 0)} and {tasks['documents'].get(exact_task, 0)} documents, greedy. "
             "Points (0-100) with bootstrap 95% intervals over the documents; *vs original*: the paired difference "
             "with the original dense model on the same documents, and what its interval alone supports "
             "(*lower* / *higher*: the interval excludes 0; *no difference shown*: it includes 0, which is not "
             "evidence of no difference). Decode tok/s was measured while answering, under the load noted above: "
             "not a speed figure (`ifprune bench` is).", "",
             "| density | condition | IF prompt-level strict | vs original | IF instruction-level strict | vs original "
             "| exact answers | vs original | decode tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for cell, t in _measured(figures["cells"], tasks["cells"]):
        p, i, e = (t["metrics"].get(k) for k in ("prompt", "inst", "exact"))
        tps = "-" if t["decode_tps"] is None else f"{t['decode_tps']:.1f}"
        lines.append(f"| {_density(cell)} | {cell['label']} | {_pct(p)} | {_pct(p, 'diff')} {verdict(p)} | {_pct(i)} "
                     f"| {_pct(i, 'diff')} {verdict(i)} | {_pct(e)} | {_pct(e, 'diff')} {verdict(e)} | {tps} |")
    return lines + [""]


def kinds_lines(figures: dict) -> list[str]:
    """The IF task on instruction kinds never trained and trained, apart."""
    tasks = figures["tasks"]
    trained = tasks["trained_kinds"]
    lines = ["## Instruction kinds never trained vs trained", "",
             f"Trained kinds (the training data's headers, {', '.join(tasks['train_data']) or 'none'}): "
             f"{', '.join(sorted(trained)) if trained else 'none'}. Prompt-level: the prompts whose every instruction "
             "is of the group's kinds; instruction-level: the group's instructions. Paired with the original dense "
             "model on the same prompts.", "",
             "| density | condition | kinds | prompts | prompt-level strict | vs original | instruction-level strict "
             "| vs original |", "|---|---|---|---|---|---|---|---|"]
    for cell, t in _measured(figures["cells"], tasks["cells"]):
        for group, g in t["kinds"].items():
            p, i = g.get("prompt_level_strict_acc"), g.get("inst_level_strict_acc")
            if p is None and i is None:
                lines.append(f"| {_density(cell)} | {cell['label']} | {group} | 0 | - | - | - | - |")
                continue
            lines.append(f"| {_density(cell)} | {cell['label']} | {group} | {g['prompts']} | {_pct(p)} | "
                         f"{_pct(p, 'diff')} {verdict(p)} | {_pct(i)} | {_pct(i, 'diff')} {verdict(i)} |")
    return lines + [""]


def kl_lines(figures: dict) -> list[str]:
    kl = figures["kl"]
    lines = ["## KL to the original dense model", "",
             f"`examples/smollm2/evaluate.py`'s measure (cached per prompt in eval_cache.json): mean next-token KL "
             f"(nats, teacher-forced on the original's own answer) on {kl['prompts']} held-out prompts of data.jsonl; "
             f"*never-trained families*: those held out whole from training ({', '.join(kl['held_out_families'])}; "
             f"{kl['unseen_prompts']} of the prompts). 95% bootstrap intervals over prompts.", "",
             "| density | condition | KL, all | KL, never-trained families | KL, trained families | first 16 tokens match |",
             "|---|---|---|---|---|---|"]
    for cell, k in _measured(figures["cells"], kl["conditions"]):
        match = "-" if "match16" not in k else f"{k['match16']:.2f} [{k['match16_ci'][0]:.2f}, {k['match16_ci'][1]:.2f}]"
        lines.append(f"| {_density(cell)} | {cell['label']} | {_kl(k.get('all'))} | "
                     f"{_kl(k.get('never-trained families'))} | {_kl(k.get('trained families'))} | {match} |")
    if kl["ratios"]:
        lines += ["", "IFPruning's KL over the training-free selector's, same budgets, on the never-trained families "
                  "(paired ratio of means, 95% interval; issue 22's goal: <= 0.5 at 0.5):", "",
                  "| density | budgets | ratio | prompts |", "|---|---|---|---|"]
        for cell_id, r in kl["ratios"].items():
            density = cell_id.partition("@")[2]
            budgets = "per-layer" if "layers" in cell_id else "uniform"
            lines.append(f"| {density} | {budgets} | {r['value']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | "
                         f"{r['prompts']} |")
    return lines + [""]


def markdown(figures: dict) -> str:
    meta = figures["meta"]
    lines = ["# IFPruning on SmolLM2-135M-Instruct: results", "",
             f"Generated by `{meta['command']}` on {meta['date']} (load average {meta['load_start']} -> "
             f"{meta['load_end']} on this shared machine; {meta['seconds']:.0f} s, answers and KL values already in "
             f"the caches not computed again). Split: **{meta['split']}**"
             + (" (the held-out test split: the final figure, looked at once)" if meta["split"] == "test" else
                " (for choosing settings; the test split is run once, at the end)")
             + (f"; **--limit {meta['limit']}: a smoke run, not figures**" if meta["limit"] else "") + ".", "",
             f"Models: original = `{meta['original']}`; adapted = `{meta['adapted']}` (the default model: the LLM "
             "its predictor ships with, an adapter merged where it has one; "
             f"IFPruning's predictor from `{meta['artifacts']}`). Per-layer budgets: each model's calibrated ones, on "
             "or off per condition. Claims below rest on the intervals, no further.", ""]
    lines += [f"- {note}" for note in meta["notes"]] + ([""] if meta["notes"] else [])
    if figures.get("tasks"):
        lines += task_lines(figures) + kinds_lines(figures)
    if figures.get("kl"):
        lines += kl_lines(figures)
    if meta.get("plot"):
        lines += [f"![scores and KL per density]({meta['plot']})", ""]
    return "\n".join(lines)


def write_json(figures: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(figures, indent=1) + "\n")


def plot(figures: dict, path: Path) -> bool:
    """IF prompt-level score, exact answers and KL per density, a line per condition, with intervals
    (the conditions side by side around each density); False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = (_score_point, _exact_point, _kl_point)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = sorted({c["label"] for c in figures["cells"] if c["density"] is not None})
    for i, label in enumerate(labels):
        cells = [c for c in figures["cells"] if c["label"] == label]
        dodge = (i - (len(labels) - 1) / 2) * 0.008
        for ax, value in zip(axes, values):
            points = [(c["density"] + dodge, *value(figures, c["id"])) for c in cells]
            points = [p for p in points if p[1] is not None]
            if points:
                x, y, low, high = zip(*points)
                ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, low)], [b - a for a, b in zip(y, high)]],
                            marker="o", capsize=3, label=label)
    for ax, value in zip(axes, values):
        for key, style in (("original", "k--"), ("adapted", "g:")):
            y = value(figures, key)[0]
            if y is not None:
                ax.axhline(y, color=style[0], ls=style[1:], label=f"{key} dense")
        ax.set_xlabel("density (share of FFN channels kept)")
    axes[0].set_ylabel("IF prompt-level strict accuracy (points)")
    axes[1].set_ylabel("exact answers, accuracy (points)")
    axes[2].set_ylabel("mean KL to the original dense model (nats)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, {figures['meta']['split']} split, 95% bootstrap intervals")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _task_point(figures: dict, cell_id: str, metric: str):
    t = (figures.get("tasks") or {}).get("cells", {}).get(cell_id)
    m = t and t["metrics"].get(metric)
    if not m:
        return None, None, None
    return 100 * m["score"], 100 * m["ci"][0], 100 * m["ci"][1]


def _score_point(figures: dict, cell_id: str):
    return _task_point(figures, cell_id, "prompt")


def _exact_point(figures: dict, cell_id: str):
    return _task_point(figures, cell_id, "exact")


def _kl_point(figures: dict, cell_id: str):
    k = (figures.get("kl") or {}).get("conditions", {}).get(cell_id, {}).get("all")
    if not k:
        return None, None, None
    return k["kl"], k["ci"][0], k["ci"][1]
