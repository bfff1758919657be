"""Write a Source as a bundle (docs/FORMAT.md), streaming one tensor at a time.

The bundle's safetensors files are written tensor by tensor: the header is computed from the
checked shapes first, then each tensor is read, put in row layout (down_proj transposed),
cast to the target dtype (or quantized by rows), written and freed. An mlx-lm quantized LLM
is copied as it is, except each layer's FFN, which goes through models.to_row_layout: down_proj
is dequantized, transposed and quantized again along d_model (same bits and group size). Peak
memory is the runtime's baseline plus a few tensors, never a second copy of the model. The
folder is built next to OUT and renamed into place (`ifprune_mlx.bundle.write_atomic`): an
error or Ctrl-C leaves no partial OUT.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ifprune_mlx.bundle import (DEFAULT_DENSITY, DEFAULT_PREFILL, PAD_MULTIPLE, PLAIN_DEFAULT_DENSITY,
                                SAFETENSORS_CODES, copy_tokenizer, new_ifpruning_block, refuse_overwrite,
                                write_atomic)
from ifprune_mlx.errors import ConversionError
from ifprune_mlx.models import is_quantizable, quantize_rows, to_row_layout

from .layouts import Source, is_down_proj
from .readers import TensorRef

DTYPES = ("float32", "float16", "bfloat16")
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
ByteProgress = Callable[[int, int], None]  # on_progress(bytes done, bytes total)


@dataclass
class Summary:
    """What convert() wrote."""

    out: Path
    layout: str
    model_type: str
    n_layers: int
    d_ffn: int
    dtype: str
    quantization: dict | None
    predictor: bool
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    tokenizer_files: list[str] = field(default_factory=list)
    default_density: float = DEFAULT_DENSITY
    pad_multiple: int = PAD_MULTIPLE
    requantized: int = 0  # down_proj matrices re-quantized by rows (quantized mlx-lm source)

    def lines(self) -> list[str]:
        q = self.quantization
        copied = ([f"  quantized tensors copied as they are; down_proj re-quantized along d_model in "
                   f"{self.requantized} layers (same bits and group size)"] if self.requantized else [])
        return [
            f"wrote {self.out}",
            f"  layout {self.layout}, {self.model_type}, {self.n_layers} layers x {self.d_ffn} FFN channels",
            f"  {self.tensors} tensors, {self.bytes_read / 1e6:.1f} MB read -> {self.bytes_written / 1e6:.1f} MB "
            f"written as {self.dtype}" + (f", {q['bits']}-bit rows (group {q['group_size']})" if q else ""),
            f"  predictor: {'yes' if self.predictor else 'none (explicit masks or the training-free selector)'}; "
            f"default density {self.default_density:.3g}, pad multiple {self.pad_multiple}",
            *copied,
            f"  tokenizer files: {', '.join(self.tokenizer_files) or 'none'}",
            f"  {self.seconds:.1f} s",
        ]


@dataclass
class _Job:
    """Tensors written together: their (name, shape, dtype) and how to compute them."""

    outputs: list[tuple[str, tuple[int, ...], mx.Dtype]]
    produce: Callable[[], dict[str, mx.array]]
    read_bytes: int


def source_dtype(source: Source) -> str:
    """The float dtype holding most of the LLM's float bytes (float64 counts as float32)."""
    totals: dict[str, int] = {}
    for ref in source.llm.values():
        if not ref.dtype.startswith(("float", "bfloat")):
            continue  # quantized weights (uint32)
        name = "float32" if ref.dtype == "float64" else ref.dtype
        totals[name] = totals.get(name, 0) + ref.nbytes
    return max(totals, key=totals.get)


def _checked_dtype(source: Source, dtype: str | None, bits: int | None, group_size: int) -> str:
    """The dtype to write (default: the source's), after checking it, bits and group_size;
    ConversionError (one line) for a combination convert() cannot write."""
    dtype = dtype or source_dtype(source)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if bits is not None and bits not in BITS:
        raise ConversionError(f"--quantize {bits}: only 4- and 8-bit rows are supported")
    if bits is not None and group_size not in GROUP_SIZES:
        raise ConversionError(f"--group-size {group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    if source.quantization and (bits is not None or dtype != source_dtype(source)):
        raise ConversionError(
            f"{source.folder or 'the LLM'} is already quantized: its tensors are copied as they are and "
            f"down_proj is re-quantized by rows; drop {'--quantize' if bits is not None else '--dtype'} "
            "(or convert the float model to choose bits or dtype)")
    return dtype


def convert(source: Source, out: Path, *, dtype: str | None = None, bits: int | None = None,
            group_size: int = 64, default_density: float | None = None,
            pad_multiple: int | None = None, force: bool = False,
            on_progress: ByteProgress | None = None, check: Callable[[Path], None] | None = None) -> Summary:
    """Write `source` as a bundle at `out`.

    Args:
        source: a checked checkpoint (layouts.detect).
        out: the bundle folder to create.
        dtype: float32, float16 or bfloat16 (default: the source's dtype; float64 -> float32).
            A quantized mlx-lm source keeps its own (its tensors are copied as they are).
        bits: quantize the LLM's linear and embedding weights by rows to 4 or 8 bits
            (the predictor stays in `dtype`). Not for an already quantized source.
        group_size: quantization group size (32, 64 or 128; must divide every row).
        default_density, pad_multiple: the bundle's defaults (else ifpruning.json's, else
            the format's: bundle.DEFAULT_DENSITY with a predictor, bundle.PLAIN_DEFAULT_DENSITY
            without, bundle.PAD_MULTIPLE).
        force: replace an existing `out`.
        on_progress: called as on_progress(bytes_done, bytes_total) after each tensor.
        check: called on the finished folder before it is renamed to `out` (e.g. verify);
            if it raises, nothing is left at `out`.
    """
    start = time.perf_counter()
    out = Path(out)
    refuse_overwrite(out, force)
    dtype = _checked_dtype(source, dtype, bits, group_size)
    target = getattr(mx, dtype)
    fallback = DEFAULT_DENSITY if source.predictor is not None else PLAIN_DEFAULT_DENSITY
    density = default_density if default_density is not None else source.defaults.get("default_density", fallback)
    pad = pad_multiple if pad_multiple is not None else source.defaults.get("pad_multiple", PAD_MULTIPLE)

    config = dict(source.config)
    if bits:
        config["quantization"] = {"group_size": group_size, "bits": bits}
    config["ifpruning"] = new_ifpruning_block(density, pad, source.predictor is not None,
                                              source.defaults.get("prefill", DEFAULT_PREFILL))
    if source.quantization:
        llm_jobs = _requantize_jobs(source.llm, source.quantization)
    else:
        llm_jobs = _jobs(source.llm, target, rows=True, bits=bits, group_size=group_size)
    files = {"model.safetensors": llm_jobs}
    if source.predictor is not None:
        files["predictor/model.safetensors"] = _jobs(source.predictor, target)
        files["predictor/head.safetensors"] = _jobs(source.head, target)
    total = sum(job.read_bytes for jobs in files.values() for job in jobs)
    done = 0
    copied: list[str] = []

    def progress(job: _Job) -> None:
        nonlocal done
        done += job.read_bytes
        if on_progress:
            on_progress(done, total)

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copied.extend(copy_tokenizer(source.tokenizer_dir, tmp))
        if source.predictor is not None:
            (tmp / "predictor").mkdir()
            (tmp / "predictor" / "config.json").write_text(json.dumps(source.predictor_config, indent=2))
            own = source.predictor_tokenizer_dir
            if own is not None and Path(own).resolve() != Path(source.tokenizer_dir).resolve():
                copy_tokenizer(own, tmp / "predictor")
        for name, jobs in files.items():
            write_safetensors(tmp / name, jobs, progress)
        if check is not None:
            check(tmp)

    write_atomic(out, fill, force)
    written = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    return Summary(out, source.layout, config["model_type"], source.n_layers, source.d_ffn, dtype,
                   config.get("quantization"), source.predictor is not None,
                   sum(len(job.outputs) for jobs in files.values() for job in jobs),
                   total, written, time.perf_counter() - start, copied, density, pad,
                   sum(name.endswith("mlp.down_proj.scales") for name in source.llm))


# -- tensors -------------------------------------------------------------------------------------


def _jobs(tensors: dict[str, TensorRef], target: mx.Dtype, *, rows: bool = False,
          bits: int | None = None, group_size: int = 64) -> list[_Job]:
    """One job per source tensor: row layout (LLM), cast, and quantization when asked."""
    jobs = []
    for name in sorted(tensors):
        ref = tensors[name]
        transpose = rows and is_down_proj(name)
        shape = tuple(ref.shape[::-1]) if transpose else tuple(ref.shape)
        dtype = target if ref.dtype.startswith(("float", "bfloat")) else getattr(mx, ref.dtype)

        def load(ref=ref, transpose=transpose, dtype=dtype) -> mx.array:
            value = ref.load()
            value = mx.contiguous(value.T) if transpose else value
            return value.astype(dtype)

        if bits and is_quantizable(name, shape):
            if shape[-1] % group_size:
                raise ConversionError(
                    f"cannot quantize {name!r}: its rows hold {shape[-1]} values, not a multiple of "
                    f"--group-size {group_size}; choose a group size that divides it"
                )
            base = name[: -len(".weight")]
            packed = (shape[0], shape[1] * bits // 32)
            groups = (shape[0], shape[1] // group_size)
            outputs = [(name, packed, mx.uint32), (f"{base}.scales", groups, dtype),
                       (f"{base}.biases", groups, dtype)]

            def produce(name=name, load=load) -> dict[str, mx.array]:
                return quantize_rows({name: load()}, {}, bits, group_size)[0]
        else:
            outputs = [(name, shape, dtype)]

            def produce(name=name, load=load) -> dict[str, mx.array]:
                return {name: load()}
        jobs.append(_Job(outputs, produce, ref.nbytes))
    return jobs


def _requantize_jobs(tensors: dict[str, TensorRef], quantization: dict) -> list[_Job]:
    """An mlx-lm quantized LLM: one job per layer's FFN, through models.to_row_layout (down_proj
    re-quantized along d_model, as ifprune_mlx.load does for such a folder), one per other tensor,
    copied as it is. The output shapes are read off the lazy result: nothing is read to plan."""
    groups: dict[str, list[str]] = {}
    for name in sorted(tensors):
        key = name[: name.index(".mlp.")] if ".mlp." in name else name
        groups.setdefault(key, []).append(name)
    jobs = []
    for names in groups.values():
        def produce(names=names) -> dict[str, mx.array]:
            return to_row_layout({name: tensors[name].load() for name in names}, quantization)

        planned = produce()
        outputs = [(name, tuple(value.shape), value.dtype) for name, value in sorted(planned.items())]
        del planned
        jobs.append(_Job(outputs, produce, sum(tensors[name].nbytes for name in names)))
    return jobs


def write_safetensors(path: Path, jobs: list[_Job], on_job: Callable[[_Job], None] | None = None) -> None:
    """Write a safetensors file tensor by tensor (the header comes from the jobs' declared shapes)."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for job in jobs:
        for name, shape, dtype in job.outputs:
            count = 1
            for dim in shape:
                count *= dim
            code = SAFETENSORS_CODES[str(dtype).rsplit(".", 1)[-1]]
            header[name] = {"dtype": code, "shape": list(shape),
                            "data_offsets": [offset, offset + count * dtype.size]}
            offset += count * dtype.size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for job in jobs:
            arrays = job.produce()
            for name, shape, dtype in job.outputs:
                value = arrays.pop(name)
                if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                    raise ConversionError(f"internal: {name} came out {value.dtype}{tuple(value.shape)}, "
                                          f"planned {dtype}{tuple(shape)}")
                mx.eval(value)
                f.write(memoryview(value))
                del value
            mx.clear_cache()  # give the freed buffers back: peak memory stays a few tensors
            if on_job:
                on_job(job)
