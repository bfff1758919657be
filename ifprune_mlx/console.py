"""What every CLI command shares: one-line errors, progress bars (the commands open models
through opener.py; this module only draws their progress)."""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import IFPruneError
from .resolve import MODEL_HELP

stderr = Console(stderr=True)

# Arguments and options several commands take, declared once.
MODEL_ARGUMENT = typer.Argument(None, help=MODEL_HELP, show_default=False)
DENSITY_OPTION = typer.Option(None, help="Fraction of FFN channels to keep, in (0, 1]. "
                              "Default: the model's (calibrated or trained; `ifprune info` shows it).")
TEMP_OPTION = typer.Option(0.0, help="Sampling temperature (0: greedy).")
TOP_P_OPTION = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold.")
SEED_OPTION = typer.Option(None, help="Random seed, for reproducible sampling.")
RESIDENT_OPTION = typer.Option(None, "--resident", help="kept: hold only the FFN rows a selection may keep "
                               "(up to --max-density) and read the rows that enter from the bundle when the "
                               "selection changes (bundles only; docs/ARCHITECTURE.md). Default: the whole model.")
MAX_DENSITY_OPTION = typer.Option(None, "--max-density", help="With --resident kept: the highest density it can "
                                  "apply, which sets the FFN rows held per layer (default: the model's default density).")

PREFILL_OPTION = typer.Option(None, "--prefill", help="What the trained predictor's requests prefill the prompt "
                              "with: pruned (the kept channels, the paper's setting) or dense (every channel; the "
                              "answer still runs pruned). Default: the model's (`ifprune info`). The training-free "
                              "selector always prefills dense.")


def checked_prefill(prefill: str | None) -> str | None:
    """--prefill's value, checked (one red line if it is not one the engine takes)."""
    from .bundle import PREFILLS

    if prefill is not None and prefill not in PREFILLS:
        fail(f"--prefill takes {' or '.join(PREFILLS)}, got {prefill!r}")
    return prefill


def resident_options(resident: str | None, max_density: float | None) -> dict:
    """load()'s resident options from --resident/--max-density (one red line if they do not fit)."""
    from .resident import MODES
    from .selectors import check_density

    if resident is None:
        if max_density is not None:
            fail("--max-density sets the capacity of --resident kept; pass --resident kept with it")
        return {}
    if resident not in MODES:
        fail(f"--resident takes {', '.join(MODES)}, got {resident!r}")
    return {"resident": resident, "max_density": None if max_density is None else check_density(max_density)}


def error_line(message: str) -> None:
    """Print `error: message` as one red line on stderr."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def quiet_rank() -> None:
    """Silence this process's output but for errors: the ranks but 0 of a sharded run."""
    import os
    import sys

    sys.stdout = open(os.devnull, "w")
    stderr.quiet = True


def fail(message: str) -> None:
    """Print one red line and exit 1 (user mistakes never show a traceback)."""
    error_line(message)
    raise typer.Exit(1)


def friendly_errors(command):
    """Turn IFPruneError (and a missing file) into one red line and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except IFPruneError as e:
            fail(str(e))
        except FileNotFoundError as e:
            fail(f"{e.filename}: no such file or folder")

    return wrapper


def _progress() -> Progress:
    """The transient progress display every command draws on stderr (nothing off a terminal)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=stderr, transient=True, disable=not stderr.is_terminal)


def stage_line(description: str) -> None:
    """Off a terminal (piped, logged) the bars are not drawn: say what starts, one line on stderr
    (without the bar's unit)."""
    if not stderr.is_terminal:
        stderr.print(f"{re.sub(r' [(](MB|prompts|layers)[)]$', '', description)} ...", highlight=False, markup=False)


@contextmanager
def progress_bar(description: str, total: float | None = None):
    """A transient progress bar on stderr (off a terminal: a stage line); yields update(done, total=None)."""
    stage_line(description)
    with _progress() as progress:
        task = progress.add_task(description, total=total)
        progress.refresh()  # drawn at least once, however quickly the work ends

        def update(done: float, new_total: float | None = None) -> None:
            progress.update(task, completed=done, **({"total": new_total} if new_total else {}))

        yield update


def in_megabytes(update):
    """Adapt a progress bar's update(done, total) to callbacks that count bytes."""
    return lambda done, total: update(done // 1_000_000, max(1, total // 1_000_000))


@contextmanager
def staged_progress():
    """A transient progress display on stderr; yields on_progress(stage, done, total), which
    starts a new bar whenever the stage changes. Stages counted in bytes (their name ends
    with "(MB)") are shown in megabytes."""
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: float, total: float) -> None:
            if stage.endswith("(MB)"):
                done, total = done // 1_000_000, max(1, total // 1_000_000)
            if stage not in tasks:
                stage_line(stage)
                tasks[stage] = progress.add_task(stage, total=total)
                progress.refresh()  # drawn at least once, however quickly the stage ends
            progress.update(tasks[stage], completed=done, total=total)

        yield on_progress


def load_with_progress(path: Path, **options):
    """engine.load(path, **options) with a progress bar over the layers."""
    from .engine import load

    with progress_bar(f"loading {path}") as update:
        return load(path, on_progress=update, **options)


def calibrate_with_progress(engine, **options):
    """calibrate.calibrate(engine, ...) with a progress bar over the prompts."""
    from .calibrate import calibrate

    with progress_bar("calibrating the default density (prompts)") as update:
        return calibrate(engine, on_progress=update, **options)


def open_model(model: str | None, group=None, **options):
    """opener.open_model(MODEL, group=group) with progress bars; returns (engine, Resolved),
    the latter for commands that say where the model came from."""
    found = resolve_with_progress(model, group)
    return load_resolved(found, group, **options), found


def resolve_with_progress(model: str | None, group=None):
    """opener.find_model(model) with progress bars (conversion, download)."""
    from .opener import find_model

    with staged_progress() as on_progress:
        return find_model(model, group=group, on_progress=on_progress)


def load_resolved(found, group=None, **options):
    """opener.open_found(found) with progress bars (loading, a first calibration)."""
    from .opener import open_found

    with staged_progress() as on_progress:
        return open_found(found, group=group, on_progress=on_progress, **options)


def density_origin(engine) -> str:
    """Where the engine's default density comes from, in a few words."""
    if engine.calibration is not None:
        return engine.calibration.summary()
    if engine.has_predictor:
        return "set by training, not calibrated: `ifprune calibrate MODEL` chooses it by the measured rule"
    return "not calibrated: `ifprune calibrate MODEL` measures which density to trust"
