"""Read checkpoint tensors one at a time, without holding the model twice in memory.

Formats: safetensors (one file, or shards listed in `*.safetensors.index.json`) and PyTorch
state dicts (.bin / .pt / .pth, one file or shards in `*.bin.index.json`). Safetensors
headers are validated before anything is trusted and tensors are read lazily by MLX, one at
a time; PyTorch files are opened with `torch.load(weights_only=True, mmap=True)`: plain
tensors only, no code is ever unpickled. torch is imported only for .bin/.pt input.

    checkpoint = open_checkpoint(path)          # a file or a folder
    for name, ref in checkpoint.items():        # TensorRef: shape, dtype, path
        array = ref.load()                      # an mx.array, read now
"""

from __future__ import annotations

import ctypes
import functools
from contextlib import contextmanager
import mmap
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import mlx.core as mx

from ifprune_mlx.bundle import (DTYPE_BYTES, SAFETENSORS_DTYPES, index_shards, read_safetensors,
                                safetensors_header)
from ifprune_mlx.errors import BundleError, ConversionError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Files a trainer writes next to the weights; never model weights.
_NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|rng_state.*|scaler|trainer_state)\.")


@contextmanager
def conversion_errors(what: str | None = None) -> Iterator[None]:
    """Report a BundleError of the runtime's format checks (headers, configs, models) as the
    converter's ConversionError, prefixed with "cannot convert {what}: " when given.
    A context manager, and a decorator."""
    try:
        yield
    except BundleError as e:
        raise ConversionError(f"cannot convert {what}: {e}" if what else str(e)) from None


def torch_or_error(why: str):
    """Import torch, or raise a ConversionError that says how to install it."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{why} needs PyTorch, which is not installed; run: pip install 'ifprune-mlx[torch]'"
        ) from None
    return torch


@dataclass
class TensorRef:
    """One tensor of a checkpoint: its metadata now, its data when load() is called."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "float16", "bfloat16", ...
    path: Path
    _fetch: Callable[[], mx.array] = field(repr=False)

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_BYTES.get(self.dtype, 1)

    def load(self) -> mx.array:
        """The tensor as an mx.array (evaluated lazily by MLX, read from disk now)."""
        return self._fetch()


class Checkpoint(Mapping[str, TensorRef]):
    """The tensors of one or more weight files, by name (a read-only mapping)."""

    def __init__(self, refs: dict[str, TensorRef], files: list[Path]):
        self._refs, self.files = refs, files

    def __getitem__(self, name: str) -> TensorRef:
        return self._refs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    @property
    def nbytes(self) -> int:
        return sum(ref.nbytes for ref in self._refs.values())


# -- files ---------------------------------------------------------------------------------------


@conversion_errors()
def checkpoint_files(path: Path, skip: str | None = None) -> list[Path]:
    """The weight files of a checkpoint: the file itself, or those of a folder.

    In a folder: the shards listed in a `*.safetensors.index.json` (each must exist), else
    every .safetensors file, else the same for .bin/.pt/.pth (safetensors win when a folder
    holds both, as Hugging Face writes them side by side). Trainer files (optimizer.pt ...) are
    skipped, and in a folder the files whose name starts with `skip`.
    """
    path = Path(path)
    if path.is_file():
        if not path.name.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + (".index.json",)):
            raise ConversionError(f"{path}: not a weight file (expected .safetensors, .bin, .pt or .pth)")
        if path.name.endswith(".index.json"):
            return index_shards(path)
        return [path]
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    for suffixes in (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES):
        indexes = [i for i in sorted(path.glob("*.index.json"))
                   if i.name[: -len(".index.json")].endswith(suffixes) and not (skip and i.name.startswith(skip))]
        if indexes:  # only what the index lists (e.g. not Mistral's consolidated.safetensors)
            return [f for index in indexes for f in index_shards(index)]
        files = [f for f in sorted(path.iterdir())
                 if f.is_file() and f.name.endswith(suffixes) and not _NOT_WEIGHTS.match(f.name)
                 and not (skip and f.name.startswith(skip))]
        if files:
            return files
    raise ConversionError(f"{path}: no weight files (.safetensors, .bin, .pt, .pth) in this folder")


# -- checkpoints ---------------------------------------------------------------------------------


def open_checkpoint(path: Path, skip: str | None = None) -> Checkpoint:
    """Open the weights at `path` (a file, an index, or a folder) without reading tensor data.

    `skip`: in a folder, ignore the files whose name starts with it.
    """
    files = checkpoint_files(Path(path), skip)
    refs: dict[str, TensorRef] = {}
    for f in files:
        part = _open_safetensors(f) if f.name.endswith(SAFETENSORS_SUFFIXES) else _open_torch(f)
        for name, ref in part.items():
            if name in refs:
                raise ConversionError(f"tensor {name!r} is in both {refs[name].path.name} and {f.name}; "
                                      "which one is meant is unclear")
            refs[name] = ref
    return Checkpoint(refs, files)


def _open_safetensors(path: Path) -> dict[str, TensorRef]:
    with conversion_errors():
        header = safetensors_header(path)  # checks sizes and offsets against the file
    lazy: dict[str, mx.array] = {}

    def fetch(name: str) -> mx.array:
        # mx.load reads nothing until evaluated; pop so a loaded tensor is freed once used.
        if name not in lazy:
            with conversion_errors():
                lazy.update(read_safetensors([path]))
        return lazy.pop(name)

    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"], (None,))[0]
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which cannot be converted")
        refs[name] = TensorRef(name, tuple(info["shape"]), dtype, path, lambda n=name: fetch(n))
    return refs


def _open_torch(path: Path) -> dict[str, TensorRef]:
    torch = torch_or_error(f"reading {path.name}")
    state, mapped = _torch_load(torch, path)

    def fetch(name: str) -> mx.array:
        value = _to_mx(torch, state[name])
        if mapped:
            _drop_pages(state[name])
        return value

    refs = {}
    for name, tensor in state.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        refs[name] = TensorRef(name, tuple(tensor.shape), dtype, path, lambda n=name: fetch(n))
    return refs


def _drop_pages(tensor) -> None:
    """Give back the resident pages of a memory-mapped tensor once it is copied (Linux).

    The pages are clean pages of the file: if touched again they are read back from it. Without
    this, reading a .bin maps the whole file into RSS by the end of the conversion.
    """
    if not sys.platform.startswith("linux"):
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first, last = start // mmap.PAGESIZE * mmap.PAGESIZE, -(-end // mmap.PAGESIZE) * mmap.PAGESIZE
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _torch_load(torch, path: Path) -> tuple[dict, bool]:
    """torch.load with weights_only=True (plain tensors only), memory-mapped when possible.

    Returns the state dict and whether it is memory-mapped.
    """
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    mapped = True
    try:
        try:
            state = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            mapped, state = False, load(mmap=False)  # legacy (non-zip) files cannot be memory-mapped
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: not plain weights: it holds Python objects that torch.load(weights_only=True) "
            f"refuses ({str(e).splitlines()[0][:200]}). Only state dicts of tensors are read, code is "
            "never unpickled; save the weights with torch.save(model.state_dict(), path) or as safetensors"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read ({str(e).splitlines()[0][:200]}); "
                              "the file is truncated or corrupt") from e
    return _state_dict(torch, state, path), mapped


def _state_dict(torch, state, path: Path) -> dict:
    """The {name: tensor} dict in what torch.load returned (unwrapping {"state_dict": ...})."""
    if isinstance(state, dict):
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(state) and all(isinstance(k, str) for k in state):
            return state
        for key in ("state_dict", "model", "module"):
            if isinstance(state.get(key), dict):
                return _state_dict(torch, state[key], path)
    raise ConversionError(
        f"{path}: not a state dict (expected a dict of tensor names to tensors, found "
        f"{type(state).__name__}); save it with torch.save(model.state_dict(), path)"
    )


def _to_mx(torch, tensor) -> mx.array:
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits
        return mx.array(tensor.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(tensor.numpy())
