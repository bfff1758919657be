"""The disk cache: models converted here, once, and converted again when their source changes.

The folder is $IFPRUNE_CACHE, else $XDG_CACHE_HOME/ifprune-mlx, else ~/.cache/ifprune-mlx:
KIND/NAME-HASH holds a conversion (a bundle), next to NAME-HASH.source, the fingerprint of
its inputs. resolve.py decides what a name means; this module only converts and keeps.
(Not the engine's selection cache nor the KV caches of a chat: those live in memory.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

StageProgress = Callable[[str, int, int], None]  # on_progress(stage, done, total)


def cache_dir() -> Path:
    """Where converted models and calibrations are kept."""
    if os.environ.get("IFPRUNE_CACHE"):
        return Path(os.environ["IFPRUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ifprune-mlx"


def one_stage(on_progress: StageProgress | None, stage: str) -> Callable[[int, int], None] | None:
    """A one-stage callback on_progress(done, total) for an on_progress(stage, done, total)."""
    return (lambda done, total: on_progress(stage, done, total)) if on_progress else None


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


def convert_once(src: Path, kind: str, convert: Callable[[Path], None], also: Path | None = None) -> Path:
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


def gguf_bundle(path: Path, on_progress: StageProgress | None = None, artifacts: Path | None = None) -> Path:
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
    return convert_once(path, kind, lambda out: convert_gguf(
        path, out, force=True, dequantize=dequantize, artifacts=artifacts,
        on_progress=one_stage(on_progress, f"converting {path.name} (MB)")), also=artifacts)


def checkpoint_bundle(folder: Path, on_progress: StageProgress | None = None) -> Path:
    """The bundle converted from a PyTorch IFPruning checkpoint folder (llm/ + predictor/),
    e.g. the toy model in examples/train_tiny/checkpoint, converting it into the cache if needed."""
    from converters.layouts import detect
    from converters.write import convert

    folder = Path(folder)
    return convert_once(folder, "checkpoints", lambda out: convert(
        detect(folder), out, force=True, on_progress=one_stage(on_progress, f"converting {folder.name} (MB)")))
