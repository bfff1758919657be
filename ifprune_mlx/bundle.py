"""Read and write ifprune bundles (docs/FORMAT.md), validating before trusting.

A bundle is a model folder mlx-lm's model classes can build from, with FFN weights in row
layout (down_proj stored transposed, [d_ffn, d_model]) and an "ifpruning" block in its
config.json; the sparsity predictor lives in its `predictor/` sub-folder. A folder without
"ifpruning" is a plain model folder (mlx-lm or Hugging Face, float), converted at load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import numpy as np

from .errors import BundleError, SelectionError

FORMAT_VERSION = 1
# The format's defaults (docs/FORMAT.md): a bundle with a trained predictor keeps a third of the
# FFN channels; one without it (training-free selection) keeps half, as it has less to go on.
DEFAULT_DENSITY = 0.33
PLAIN_DEFAULT_DENSITY = 0.5
PAD_MULTIPLE = 32  # kept channel counts are rounded up to a multiple of this
# What the trained predictor's requests prefill the prompt with: "pruned" (the paper's setting:
# prompt and answer both run on the kept channels) or "dense" (the prompt on all of them, the
# answer pruned). The training-free selector always prefills dense: its pass scores the channels.
PREFILLS = ("pruned", "dense")
DEFAULT_PREFILL = "pruned"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
# safetensors dtype code -> (the dtype's name in MLX, NumPy and PyTorch, bytes per element)
SAFETENSORS_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
                      "BF16": ("bfloat16", 2), "I64": ("int64", 8), "I32": ("int32", 4),
                      "U32": ("uint32", 4), "I16": ("int16", 2), "U16": ("uint16", 2),
                      "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1)}
DTYPE_BYTES = {name: size for name, size in SAFETENSORS_DTYPES.values()}
SAFETENSORS_CODES = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_config(folder: Path) -> dict:
    """config.json of a model folder, with a BundleError that says what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such model folder")
    path = folder / "config.json"
    if not path.is_file():
        raise BundleError(f"{path}: missing; a model folder needs its config.json")
    return read_config_file(path)


def read_config_file(path: Path) -> dict:
    """A model's config.json file, checked to be JSON with a model_type."""
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise BundleError(f"{path}: has no \"model_type\"; is this a model's config.json?")
    return config


def ifpruning_block(config: dict, where: Path) -> dict | None:
    """The validated "ifpruning" block of a bundle's config, or None for a plain model."""
    block = config.get("ifpruning")
    if block is None:
        return None
    if block.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{where}/config.json: ifpruning format_version {block.get('format_version')!r} "
            f"is not supported (this ifprune-mlx reads version {FORMAT_VERSION}); upgrade ifprune-mlx"
        )
    if block.get("ffn_layout") != "rows":
        raise BundleError(f"{where}/config.json: ffn_layout must be \"rows\", got {block.get('ffn_layout')!r}")
    if block.get("prefill", DEFAULT_PREFILL) not in PREFILLS:
        raise BundleError(f"{where}/config.json: ifpruning prefill must be one of {', '.join(PREFILLS)}, "
                          f"got {block.get('prefill')!r}")
    return block


def safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header: every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BundleError(f"{path}: truncated ({size} bytes); not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise BundleError(f"{path}: header claims {n} bytes but the file has {size}; truncated or not safetensors")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: corrupt safetensors header ({e})") from e
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror})") from e
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        count = 1
        for dim in info["shape"]:
            count *= dim
        size = SAFETENSORS_DTYPES.get(info["dtype"], (None, None))[1]
        if size is not None and end - start != count * size:
            raise BundleError(f"{path}: tensor {name!r}: {end - start} bytes for shape {info['shape']} {info['dtype']}; corrupt")
        if end > data:
            raise BundleError(
                f"{path}: tensor {name!r} ends at byte {end} of the data but the file holds "
                f"{data}; the file is truncated (copy or convert it again)"
            )
    return header


def read_rows(path: Path, header: dict, name: str, start: int, stop: int) -> mx.array:
    """Rows [start, stop) of tensor `name` of a safetensors file, reading only their bytes.

    `header` is the file's safetensors_header. Rows are contiguous in the row-major file, so
    a range of rows is one range of bytes: a rank of a sharded load reads its rows alone.
    """
    rows = mx.array(read_row_runs(path, header, name, [(start, stop)]))
    return rows.view(mx.bfloat16) if header[name]["dtype"] == "BF16" else rows


def read_row_runs(path: Path, header: dict, name: str, runs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Rows of tensor `name` of a safetensors file, runs [start, stop) after one another, one
    byte range read per run (one open file). NumPy, with bfloat16 as the uint16 of the same
    bytes (NumPy has no bfloat16), so the rows can be copied into a buffer without MLX.

    Raises OSError from the file system as it comes; BundleError if a run lies past the end.
    """
    info = header[name]
    shape, dtype = list(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]][0]
    row_bytes = (info["data_offsets"][1] - info["data_offsets"][0]) // max(1, shape[0])
    runs = list(runs)
    out = np.empty([sum(stop - start for start, stop in runs), *shape[1:]],
                   dtype="uint16" if dtype == "bfloat16" else dtype)
    flat = out.reshape(-1).view(np.uint8)
    with open(path, "rb", buffering=0) as f:  # unbuffered: the bytes go straight into `out`
        (n,) = struct.unpack("<Q", f.read(8))
        done = 0
        for start, stop in runs:
            want = (stop - start) * row_bytes
            f.seek(8 + n + info["data_offsets"][0] + start * row_bytes)
            if f.readinto(memoryview(flat[done: done + want])) != want:
                raise BundleError(f"{path}: tensor {name!r} is truncated")
            done += want
    return out


def file_stamp(path: Path) -> tuple[int, int, str]:
    """(size, mtime in ns, SHA-256 of the safetensors header) of a weight file: what changes
    when the file is rewritten, replaced or truncated, read in a few kB."""
    st = path.stat()
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        digest = hashlib.sha256(head + f.read(min(n, _MAX_HEADER))).hexdigest()
    return st.st_size, st.st_mtime_ns, digest


def index_shards(index: Path) -> list[Path]:
    """The weight files a `*.index.json` lists; each must exist."""
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{index}: not a valid weight index (expected a \"weight_map\"): {e}") from e
    files = [index.parent / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BundleError(
            f"{index.parent}: shard {missing[0]} listed in {index.name} is missing "
            f"({len(missing)} of {len(files)} shards missing); copy all shards again"
        )
    return files


def weight_files(folder: Path, stem: str = "model") -> list[Path]:
    """The safetensors files of a folder: from its index if sharded, else `{stem}*.safetensors`."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return index_shards(index)
    files = sorted(folder.glob(f"{stem}*.safetensors"))
    if not files:
        raise BundleError(f"{folder}: no {stem}*.safetensors weight files")
    return files


def read_safetensors(files: Iterable[Path]) -> dict[str, mx.array]:
    """Validate every file's header, then load them lazily with mx.load."""
    weights: dict[str, mx.array] = {}
    for path in files:
        safetensors_header(path)
        try:
            weights.update(mx.load(str(path)))
        except (RuntimeError, ValueError) as e:
            raise BundleError(f"{path}: cannot load ({e})") from e
    return weights


def save_safetensors(path: Path, weights: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files found in src to dst; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def refuse_overwrite(out: Path, force: bool) -> None:
    """Raise BundleError if `out` exists and `force` is not set (writers check before any work)."""
    if Path(out).exists() and not force:
        raise BundleError(f"{out}: already exists; pass --force (force=True) to overwrite it")


def write_atomic(out: Path, fill: Callable[[Path], None], force: bool = False) -> Path:
    """Create folder `out` by calling fill(tmp) on a temporary sibling, then renaming it.

    Refuses to overwrite an existing `out` unless force. On any error (or Ctrl-C) the
    temporary folder is removed and `out` is left as it was.
    """
    out = Path(out)
    refuse_overwrite(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        fill(tmp)
        _make_readable(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _make_readable(folder: Path) -> None:
    """Folders 0755 and files 0644, as a model folder is expected to be (mkdtemp makes 0700)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def update_ifpruning(folder: Path, changes: dict) -> dict:
    """Merge `changes` into a bundle's "ifpruning" block; config.json is replaced atomically."""
    folder = Path(folder)
    config = read_config(folder)
    if ifpruning_block(config, folder) is None:
        raise BundleError(f"{folder}: not an ifprune bundle (no \"ifpruning\" block in config.json)")
    config["ifpruning"] = {**config["ifpruning"], **changes}
    write_json_atomic(folder / "config.json", config)
    return config


def write_json_atomic(path: Path, data) -> Path:
    """Write JSON to `path` through a temporary sibling renamed over it (readers never see half
    a file), readable by others (0644)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


def new_ifpruning_block(default_density: float = DEFAULT_DENSITY, pad_multiple: int = PAD_MULTIPLE,
                        has_predictor: bool = True, prefill: str = DEFAULT_PREFILL) -> dict:
    """The "ifpruning" block of a new bundle's config.json (also used by the converter);
    "prefill" is written for a bundle with a predictor (the only one it concerns)."""
    block = {
        "format_version": FORMAT_VERSION,
        "ffn_layout": "rows",
        "default_density": default_density,
        "pad_multiple": pad_multiple,
        "predictor": "predictor" if has_predictor else None,
        "pooling": "last",
    }
    if has_predictor:
        block["prefill"] = check_prefill(prefill)
    return block


def check_prefill(prefill: str) -> str:
    """`prefill` if it is one of PREFILLS, else a SelectionError naming them."""
    if prefill not in PREFILLS:
        raise SelectionError(f"prefill must be one of {', '.join(PREFILLS)}, got {prefill!r}")
    return prefill


def write_bundle(
    out: Path,
    *,
    config: dict,
    weights: dict[str, mx.array],
    tokenizer_dir: Path | None = None,
    predictor: dict | None = None,
    default_density: float = DEFAULT_DENSITY,
    pad_multiple: int = PAD_MULTIPLE,
    prefill: str = DEFAULT_PREFILL,
    force: bool = False,
) -> Path:
    """Write a bundle atomically.

    Args:
        out: the bundle folder to create.
        config: the LLM's config (mlx-lm fields; "quantization" if weights are quantized).
        weights: mlx-lm weight names; FFN in row layout (down_proj.weight is [d_ffn, d_model]).
        tokenizer_dir: a folder whose tokenizer files are copied into the bundle.
        predictor: None, or {"config": backbone config, "weights": backbone weights,
            "head": {"head1.weight", "head1.bias", "head2.weight", "head2.bias"},
            "tokenizer_dir": optional folder of the predictor's own tokenizer}.
        default_density: the density generate() uses when none is given.
        pad_multiple: kept channel counts are rounded up to a multiple of this.
        prefill: what the trained predictor's requests prefill the prompt with (PREFILLS).
        force: overwrite an existing `out`.
    """
    config = dict(config, ifpruning=new_ifpruning_block(default_density, pad_multiple, bool(predictor), prefill))

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_safetensors(tmp / "model.safetensors", weights)
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        if predictor:
            pdir = tmp / "predictor"
            pdir.mkdir()
            (pdir / "config.json").write_text(json.dumps(predictor["config"], indent=2))
            save_safetensors(pdir / "model.safetensors", predictor["weights"])
            save_safetensors(pdir / "head.safetensors", predictor["head"])
            if predictor.get("tokenizer_dir"):
                copy_tokenizer(Path(predictor["tokenizer_dir"]), pdir)

    return write_atomic(out, fill, force)
