"""The front door: a model named as the CLI takes it, opened as every command opens it.

    engine = ifprune_mlx.open_model()                      # the default model
    engine = ifprune_mlx.open_model("model.Q4_0.gguf")     # converted once into the disk cache

open_model = resolve (name -> folder, resolve.py) + load (engine.py) + the first-use rule,
written here once: a model that was converted or downloaded here (the default model too) is
calibrated on first use and the result stored (calibration_store.py); a plain folder gets
the calibration `ifprune calibrate` stored for it. No terminal I/O: progress goes to
on_progress(stage, done, total) (console.py draws it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .calibrate import calibrate
from .calibration_store import attach_stored_calibration, save_calibration
from .disk_cache import StageProgress, one_stage
from .distributed import rank0_first, rank0_values
from .engine import Engine, load
from .resolve import Resolved, resolve


def find_model(name: str | Path | None = None, *, group=None, on_progress: StageProgress | None = None) -> Resolved:
    """resolve(name); in a sharded run (group) rank 0 first, so a conversion into a shared
    cache happens once, and if it fails there every rank raises."""
    return rank0_first(group, lambda: resolve(name, on_progress), "find the model")


def needs_calibration(engine: Engine, found: Resolved) -> bool:
    """The first-use rule: calibrate now if the model was converted or downloaded here (trained
    or not: one rule chooses every default) and has no stored calibration by the current rule
    (a plain folder's is attached here); not in resident mode, which cannot run the dense
    reference (`ifprune calibrate` without it)."""
    from .calibrate import VERSION

    stored = attach_stored_calibration(engine) and engine.calibration.version >= VERSION
    return found.made_here and not stored and engine.residency is None


def open_found(found: Resolved, *, group=None, on_progress: StageProgress | None = None, **load_options) -> Engine:
    """Load a resolved model and give it its default density: stored, or calibrated now by
    the first-use rule (needs_calibration) and stored.

    group: the mlx.distributed group of a sharded run (docs/DISTRIBUTED.md): the ranks follow
    rank 0's rule, calibrate together or not at all, rank 0 stores the result, and all keep
    rank 0's default density. load_options: more of load()'s (cache_size, split, ...).
    """
    if group is not None:
        load_options["group"] = group
    engine = load(found.path, on_progress=one_stage(on_progress, f"loading {found.path.name} (layers)"),
                  **load_options)
    needed = needs_calibration(engine, found)
    if group is not None:
        needed = bool(rank0_values(group, needed))
    if needed:
        result = calibrate(engine, on_progress=one_stage(
            on_progress, "first use: calibrating the default density, once (prompts)"))
        if group is None or group.rank() == 0:
            save_calibration(engine, result)
        else:
            engine.use_calibration(result)
    if group is not None:
        engine.default_density = float(rank0_values(group, engine.default_density, np.float64))
    return engine


def open_model(name: str | Path | None = None, *, group=None, on_progress: StageProgress | None = None,
               **load_options) -> Engine:
    """The Engine of a model named as the CLI takes it (resolve.resolve: a folder, a .gguf file,
    an IFPruning checkpoint, a repo id; None: $IFPRUNE_MODEL, else the default model), with its
    calibrated default density (open_found). on_progress(stage, done, total) reports
    conversion (bytes), loading (layers) and a first calibration (prompts)."""
    found = find_model(name, group=group, on_progress=on_progress)
    return open_found(found, group=group, on_progress=on_progress, **load_options)
