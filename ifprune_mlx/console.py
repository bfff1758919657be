"""What every CLI command shares: one-line errors, progress bars."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import IFPruneError

stderr = Console(stderr=True)


def error_line(message: str) -> None:
    """Print `error: message` as one red line on stderr."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


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


@contextmanager
def progress_bar(description: str, total: float | None = None):
    """A transient progress bar on stderr; yields update(done, total=None)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=stderr, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def update(done: float, new_total: float | None = None) -> None:
            progress.update(task, completed=done, **({"total": new_total} if new_total else {}))

        yield update


def in_megabytes(update):
    """Adapt a progress bar's update(done, total) to callbacks that count bytes."""
    return lambda done, total: update(done // 1_000_000, max(1, total // 1_000_000))


def load_with_progress(path: Path):
    """ifprune_mlx.load(path) with a progress bar over the layers."""
    import ifprune_mlx

    with progress_bar(f"loading {path}") as update:
        return ifprune_mlx.load(path, on_progress=update)
