"""`ifprune eval`: lm-eval tasks at several densities, compared with a dense reference."""

from __future__ import annotations

import importlib.util
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer

from .console import MODEL_ARGUMENT, PREFILL_OPTION, checked_prefill, fail, friendly_errors, load_with_progress, resolve_with_progress, stderr

EVAL_HELP = """Score a model on lm-eval tasks at several densities, against a dense reference.

Every condition (density x selector) answers each task's requests as `ifprune generate` does: the context as the user message through the chat template, channels selected per prompt, greedy decoding. Scores get bootstrap 95% intervals over the documents; each condition's difference with the reference (default: the same model at density 1.0; --reference: another model, run dense) gets a paired 95% interval on the same documents. Decode tok/s is measured while generating. Answers are cached on disk per model, density, selector and request, so a re-run only computes what is new.

Writes results.json, results.md and quality_vs_speed.png to --out. The tasks shipped with ifprune-mlx run offline; lm-eval's own (ifeval, arc_easy, gsm8k, ...) download their data once. Needs the `eval` extra: pip install 'ifprune-mlx\\[eval]'. See docs/EVAL.md."""


def parse_densities(text: str) -> list[float | None]:
    """"1.0,0.7,0.5" -> [None, 0.7, 0.5] (None: dense), in the order given, without repeats."""
    from .errors import SelectionError
    from .selectors import check_density

    out: list[float | None] = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = check_density(part.strip())
        except SelectionError as e:
            fail(f"--density: {e}")
        value = None if value >= 1.0 else value
        if value not in out:
            out.append(value)
    if not out:
        fail(f"--density takes numbers in (0, 1] separated by commas, got {text!r}")
    return out


@contextmanager
def progress_lines():
    """on_progress(stage, done, total): a bar per stage on a terminal, else a plain line every
    10% (and at least once a minute) on stderr."""
    from .console import staged_progress

    if stderr.is_terminal:
        with staged_progress() as on_progress:
            yield on_progress
        return
    last = {"stage": None, "step": -1, "time": 0.0}

    def on_progress(stage: str, done: int, total: int) -> None:
        step = 10 * done // max(total, 1)
        now = time.monotonic()
        if stage != last["stage"] or step != last["step"] or now - last["time"] > 60 or done == total:
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)
            last.update(stage=stage, step=step, time=now)

    yield on_progress


def _open(model: Optional[str], default_density_needed: bool):
    """The engine and its short name; a model only calibrates (once) if its default density is used."""
    from .console import open_model

    if default_density_needed:
        engine, found = open_model(model)
    else:
        found = resolve_with_progress(model)
        engine = load_with_progress(found.path)
    from .resolve import DEFAULT_NAME

    name = DEFAULT_NAME + " (default model)" if found.origin == "default" else Path(str(model)).name
    return engine, name


BUDGETS = {"uniform": False, "per-layer": True}


def parse_budgets(text: str | None) -> list[bool | None]:
    """"uniform,per-layer" -> [False, True]; None -> [None] (the model's own setting)."""
    if text is None:
        return [None]
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part not in BUDGETS:
            fail(f"--budgets takes uniform and/or per-layer, comma-separated; got {part!r}")
        if BUDGETS[part] not in out:
            out.append(BUDGETS[part])
    return out or [None]


def _conditions(engine, name: str, densities, selectors: list[str], reference: bool,
                budgets: list[bool | None] = (None,), prefill: str | None = None):
    from .eval_run import Condition

    selectors = selectors or [engine.selector.name]
    for s in selectors:
        engine.get_selector(s)  # an unknown selector, or "predictor" without one, fails here
    if True in budgets and engine.budgets is None:
        fail(f"--budgets per-layer: {name} has no per-layer budgets; `ifprune calibrate MODEL` measures them")
    out = []
    for d in densities:
        if d is None:
            out.append(Condition(name, None, reference=reference))
        else:
            out += [Condition(name, d, s, budgets=b,
                              prefill=None if s == "activations" else prefill or engine.prefill)
                    for s in selectors for b in budgets]
    return out


@friendly_errors
def eval_command(
    model: Optional[str] = MODEL_ARGUMENT,
    tasks: str = typer.Option(..., "--tasks", help="lm-eval task names, comma-separated (the shipped offline "
                              "tasks, lm-eval's own, or those under --include-path)."),
    density: Optional[str] = typer.Option(None, "--density", help="Densities to run, comma-separated, e.g. "
                                          "1.0,0.7,0.5 (1.0 = the full model; without --reference it always runs, "
                                          "as the reference). Default: 1.0 and the model's default."),
    selector: Optional[str] = typer.Option(None, "--selector", help="predictor and/or activations, comma-separated "
                                           "(default: the model's: the trained predictor where there is one)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Compare with this model run dense "
                                            "(e.g. the plain GGUF); default: MODEL at density 1.0."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N documents of each task."),
    out: Path = typer.Option(Path("eval-results"), "--out", help="Folder for results.json, results.md and the plot."),
    include_path: Optional[List[Path]] = typer.Option(None, "--include-path", help="A folder of lm-eval task "
                                                      "YAML files to add (repeatable)."),
    max_gen_toks: Optional[int] = typer.Option(None, "--max-gen-toks", help="Cap on tokens generated per "
                                               "request (default: each task's own)."),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="Send each context "
                                       "through the model's chat template as the user message (default, where "
                                       "the model has one) or as raw text."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Where answers are cached (default: the "
                                         "ifprune-mlx cache folder's eval/)."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="uniform and/or per-layer, comma-separated: "
                                          "run each pruned condition with the model's calibrated per-layer budgets "
                                          "off and/or on (default: as the model has them)."),
    prefill: Optional[str] = PREFILL_OPTION,
):
    if importlib.util.find_spec("lm_eval") is None:
        fail("ifprune eval runs on lm-eval, which is not installed: pip install 'ifprune-mlx[eval]' (or pip install lm-eval)")
    if limit is not None and limit < 1:
        fail(f"--limit must be at least 1, got {limit}")
    if max_gen_toks is not None and max_gen_toks < 1:
        fail(f"--max-gen-toks must be at least 1, got {max_gen_toks}")
    for folder in include_path or []:
        if not folder.is_dir():
            fail(f"--include-path {folder}: no such folder")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        fail("--tasks is empty; name at least one task")
    checked_prefill(prefill)
    densities = parse_densities(density) if density else None
    selectors = [s.strip() for s in (selector or "").split(",") if s.strip()]
    run(model, names, densities, selectors, reference, limit=limit, out=out, include_paths=include_path or [],
        max_gen_toks=max_gen_toks, chat_template=chat_template, cache=cache, budgets=parse_budgets(budgets),
        prefill=prefill)


eval_command.__doc__ = EVAL_HELP


def run(model, names, densities, selectors, reference, *, limit, out, include_paths, max_gen_toks,
        chat_template, cache, budgets=(None,), prefill=None) -> None:
    """Check the tasks, open the models, run every condition; the results are written after each."""
    from .eval_run import check_tasks, load_tasks, run_condition, task_manager
    from .disk_cache import cache_dir

    manager = task_manager(include_paths)
    names = check_tasks(names, manager)
    load_tasks(names, manager)
    cache_root = cache or cache_dir() / "eval"
    options = dict(limit=limit, chat_template=chat_template, max_gen_toks=max_gen_toks)
    meta = {"tasks": names, "limit": limit, "max_gen_toks": max_gen_toks, "chat_template": chat_template,
            "command": "ifprune eval " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "ifprune eval"}
    results = []
    with progress_lines() as on_progress:
        engine, name = _open(model, densities is None)
        meta["model"] = name
        if densities is None:
            densities = [None] + ([engine.default_density] if engine.default_density < 1.0 else [])
        if reference is None and None not in densities:
            densities = [None, *densities]  # the reference: the same model at density 1.0
        conditions = _conditions(engine, name, densities, selectors, reference is None, budgets, prefill)
        runs = []
        if reference is not None:
            ref_engine, ref_name = _open(reference, False)
            runs.append((ref_engine, _conditions(ref_engine, ref_name, [None], [], True)[0]))
            del ref_engine
        runs += [(engine, condition) for condition in conditions]
        for i, (model_engine, condition) in enumerate(runs):
            results.append(run_condition(model_engine, condition, names, manager, cache_root, **options,
                                         on_progress=_staged(on_progress, f"{condition.model} {condition.name}")))
            _log_condition(results[-1])
            plotted = _write(results, out, meta)
            runs[i] = None  # a reference model is freed once it has run
    from . import eval_report

    for line in eval_report.table(results):
        typer.echo(line)
    typer.echo(f"results: {out / 'results.json'}, {out / 'results.md'}"
               + (f", {out / 'quality_vs_speed.png'}" if plotted else " (plot skipped: pip install matplotlib)"),
               err=True)


def _write(results, out: Path, meta: dict) -> bool:
    """Compare with the reference and write JSON, Markdown and the plot (so far); whether it plotted."""
    from . import eval_report as report
    from .bench.machine import load_average
    from .eval_run import compare

    refs = [r for r in results if r.condition.reference]
    for r in results:
        if refs and r is not refs[0]:
            compare(r, refs[0])
    meta = {**meta, "reference": refs[0].condition.model if refs else None,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load": load_average()}
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, out / "results.json", meta)
    plotted = report.plot(results, out / "quality_vs_speed.png", f"{meta['model']}: quality vs decode speed")
    (out / "results.md").write_text(report.markdown(results, meta["command"], meta,
                                                    "quality_vs_speed.png" if plotted else None))
    return plotted


def _staged(on_progress, prefix: str):
    return lambda kind, done, total: on_progress(f"{prefix} {kind}", done, total)


def _log_condition(result) -> None:
    tps = "-" if result.decode_tps is None else f"{result.decode_tps:.1f}"
    print(f"{result.condition.model} {result.condition.name}: {result.requests} requests "
          f"({result.computed} computed now) in {result.seconds:.0f} s, decode {tps} tok/s",
          file=sys.stderr, flush=True)
