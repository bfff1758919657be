"""Where a model's calibration (its chosen default density, calibrate.py) is kept.

Bundles carry theirs in config.json (ifpruning.default_density and .calibration, read by
load()); plain folders are not ours to write, so theirs go to the disk cache's calibration/
folder, keyed by the folder's path and its weight files' names and sizes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import bundle
from .calibrate import Calibration
from .disk_cache import cache_dir


def _calibration_file(folder: Path) -> Path:
    h = hashlib.sha1(str(Path(folder).resolve()).encode())
    for weights in sorted(Path(folder).glob("*.safetensors")):
        h.update(f"{weights.name}:{weights.stat().st_size}\n".encode())
    return cache_dir() / "calibration" / f"{h.hexdigest()[:16]}.json"


def read_plain_calibration(folder: Path) -> dict | None:
    """The stored calibration of a plain model folder (None if it was never calibrated)."""
    path = _calibration_file(folder)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_plain_calibration(folder: Path, calibration: dict) -> Path:
    """Store a plain folder's calibration in the cache (the folder itself is not written)."""
    path = _calibration_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    return bundle.write_json_atomic(path, calibration)


def attach_stored_calibration(engine) -> bool:
    """Give a plain folder's engine its stored calibration; True if it has one (bundles carry
    theirs in config.json, read by load())."""
    if engine.calibration is not None:
        return True
    if "ifpruning" in engine.config or engine.path is None:
        return False
    data = read_plain_calibration(engine.path)
    if data is None:
        return False
    engine.use_calibration(Calibration.from_json(data))
    return True


def save_calibration(engine, calibration: Calibration) -> Path:
    """Store a calibration where the engine's model is read from next time, and use it.

    Bundles: in config.json (ifpruning.default_density and .calibration); plain folders: in
    the cache (their folder is not ours to write). Returns where it went.
    """
    engine.use_calibration(calibration)
    if "ifpruning" in engine.config:
        bundle.update_ifpruning(engine.path, {"default_density": calibration.density,
                                              "calibration": calibration.to_json()})
        return engine.path / "config.json"
    return write_plain_calibration(engine.path, calibration.to_json())
