"""What every CLI command shares: one-line errors, progress bars."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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
    """Off a terminal (piped, logged) the bars are not drawn: say what starts, one line on stderr."""
    if not stderr.is_terminal:
        stderr.print(f"{description.replace(' (MB)', '').replace(' (prompts)', '').replace(' (layers)', '')} ...",
                     highlight=False, markup=False)


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
    """ifprune_mlx.load(path, **options) with a progress bar over the layers."""
    import ifprune_mlx

    with progress_bar(f"loading {path}") as update:
        return ifprune_mlx.load(path, on_progress=update, **options)


def calibrate_with_progress(engine, **options):
    """ifprune_mlx.calibrate.calibrate(engine, ...) with a progress bar over the prompts."""
    from .calibrate import calibrate

    with progress_bar("calibrating the default density (prompts)") as update:
        return calibrate(engine, on_progress=update, **options)


def open_model(model: str | None, group=None, **options):
    """Resolve MODEL (a folder, GGUF file, repo id, or None for the default; resolve.py), load
    it and give it its calibrated default density, with progress bars. Returns (engine, Resolved).

    group: the mlx.distributed group of a sharded run (docs/DISTRIBUTED.md): rank 0 resolves
    first (a conversion into a shared cache happens once), the ranks calibrate together or
    not at all, and all keep rank 0's default density. options: more of load()'s (split).
    """
    from . import resolve
    from .distributed import rank0_first, rank0_values

    found = rank0_first(group, lambda: resolve_with_progress(model), "find the model")
    if group is None:
        return load_resolved(found, **options), found
    engine = load_with_progress(found.path, group=group, **options)
    if bool(rank0_values(group, resolve.needs_calibration(engine, found))):
        calibration = calibrate_with_progress(engine)
        if group.rank() == 0:
            resolve.save_calibration(engine, calibration)
        engine.use_calibration(calibration)
    engine.default_density = float(rank0_values(group, engine.default_density, np.float64))
    return engine, found


def resolve_with_progress(model: str | None):
    """resolve.resolve(model) with progress bars (conversion, download)."""
    from . import resolve

    with staged_progress() as on_progress:
        return resolve.resolve(model, on_progress=on_progress)


def load_resolved(found, **options):
    """resolve.prepare(found) with progress bars (loading, a first calibration)."""
    from . import resolve

    with staged_progress() as on_progress:
        return resolve.prepare(found, on_progress=on_progress, **options)


def density_origin(engine) -> str:
    """Where the engine's default density comes from, in a few words."""
    if engine.calibration is not None:
        return engine.calibration.summary()
    if engine.has_predictor:
        return "set by training, not calibrated: `ifprune calibrate MODEL` chooses it by the measured rule"
    return "not calibrated: `ifprune calibrate MODEL` measures which density to trust"
