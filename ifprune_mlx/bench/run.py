"""A whole benchmark run: the models to measure, every measurement on each, and the checks
of its figures against the bytes each decoded token reads."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from ..engine import load
from ..fidelity import compact_model
from .machine import bandwidth, bandwidth_without_openblas, free_buffers, load_average, machine
from .measure import decode, memory, reselect, synthetic_bundle, ttft
from .settings import BOUND_SLACK, DEFAULT_MODEL, Settings


@dataclass
class ModelResult:
    name: str
    d_model: int
    d_ffn: int
    layers: int
    vocab: int
    quant: str
    weight_bytes: int
    real: bool = False  # a real checkpoint (else random weights)
    tied_embeddings: bool = False
    decode: list[dict] = field(default_factory=list)
    ttft: list[dict] = field(default_factory=list)
    reselect: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    seconds: float = 0.0
    detailed: bool = False
    load: list = field(default_factory=list)  # load average when the model's measurements began and ended


def _ttft_lengths(engine, s: Settings, detailed: bool, real: bool) -> tuple[int, ...]:
    half = engine.model.model.norm.weight.dtype in (mx.bfloat16, mx.float16)
    if half or engine.config.get("quantization"):
        return s.slow_prompt_lengths
    return s.real_prompt_lengths if real else s.prompt_lengths if detailed else s.scaling_prompt_lengths


def bench_model(folder: Path, name: str, s: Settings, *, detailed: bool, log: Callable[[str], None],
                real: bool = False) -> ModelResult:
    """All measurements on one bundle (or plain model folder)."""
    start = time.perf_counter()
    engine = load(folder, cache_size=0)
    c, q = engine.config, engine.config.get("quantization")
    result = ModelResult(name=name, d_model=c["hidden_size"], d_ffn=engine.d_ffn,
                         layers=engine.n_layers, vocab=c["vocab_size"],
                         quant=f"{q['bits']}-bit (group {q['group_size']})" if q else
                         str(engine.model.model.norm.weight.dtype).replace("mlx.core.", ""),
                         weight_bytes=engine.weight_bytes(), detailed=detailed, real=real,
                         tied_embeddings=bool(engine.model.args.tie_word_embeddings), load=[load_average()])
    log(f"{name}: d_model {result.d_model}, d_ffn {result.d_ffn}, {result.layers} layers, "
        f"vocab {result.vocab}, {result.quant}, {result.weight_bytes / 1e6:.0f} MB, load {result.load[0]}")
    result.memory = memory(folder, engine.default_density, s)
    log(f"  memory: peak {result.memory['peak'] / 1e6:.0f} MB = {result.memory['ratio']:.3f}x "
        f"the weights (+KV)")
    result.decode = decode(engine, s, s.real_densities if real else s.densities, log)
    dense = compact_model(engine)
    result.ttft = ttft(engine, dense, _ttft_lengths(engine, s, detailed, real), s, log)
    del dense
    free_buffers()
    result.reselect = reselect(engine, s, log)
    result.seconds = time.perf_counter() - start
    result.load.append(load_average())
    del engine
    free_buffers()
    return result


def variants(bits: list[Optional[int]], dtypes: list[str]) -> list[tuple[Optional[int], str]]:
    """(bits, dtype) of each model to measure: a float model per dtype, a quantized one per
    width (scales in the first dtype)."""
    return [(b, d) for b in bits for d in (dtypes if b is None else dtypes[:1])]


def real_models(model: Path, bits: list[Optional[int]], dtypes: list[str], folder: Path,
                log: Callable[[str], None]) -> list[tuple[str, Path]]:
    """(name, folder) of the models `ifprune bench MODEL` measures: a GGUF file converted into
    `folder` once per variants(bits, dtypes) (floats dequantized; 4/8-bit re-quantized by rows
    from them, group size 32); "default" (unless such a folder exists) the default model
    resolve() opens (with its trained predictor, where it has one); anything else resolve()
    names, as it is."""
    from ..resolve import resolve

    path = Path(model).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        found = resolve(None if str(model) == DEFAULT_MODEL and not path.exists() else model).path
        return [(found.name, found)]
    from converters.gguf import convert_gguf

    out = []
    for b, dtype in variants(bits, dtypes):
        name = f"{path.name.split('.')[0]}-{f'q{b}' if b else dtype}"
        log(f"converting {path.name} to {name}")
        convert_gguf(path, folder / name, force=True, dtype=dtype, dequantize=b is None, bits=b, group_size=32)
        out.append((name, folder / name))
    return out


def run(*, models: list[Path], widths: list[int], bits: list[Optional[int]], dtypes: list[str],
        settings: Settings, detail: Optional[int] = 1024, log: Callable[[str], None] = print,
        command: str = "") -> dict:
    """Run the benchmark on real `models` (real_models) and synthetic ones of `widths` (each in
    variants(bits, dtypes)); returns every figure (JSON-serializable).

    `detail`: the synthetic width (first dtype, not quantized) whose TTFT is measured at every
    prompt length; the other synthetic models get s.scaling_prompt_lengths only.
    """
    start = time.perf_counter()
    info = {"machine": machine(), "settings": asdict(settings), "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": load_average()}
    probe = lambda: bandwidth(*settings.bandwidth_probe)  # noqa: E731
    samples = [probe()]
    bw = samples[0]
    log(f"BLAS: {info['machine']['blas']}; streaming read {bw['stream_gbs']:.1f} GB/s, "
        f"matrix-vector {bw['gemv_gbs']:.1f} GB/s, matrix-matrix {bw['gemm_gflops']:.0f} GFLOP/s")
    info["bandwidth_reference_blas"] = bandwidth_without_openblas(settings)
    if info["bandwidth_reference_blas"]:
        ref = info["bandwidth_reference_blas"]
        log(f"without OpenBLAS: matrix-vector {ref['gemv_gbs']:.1f} GB/s, matrix-matrix "
            f"{ref['gemm_gflops']:.0f} GFLOP/s")
    results = []
    detail = detail if detail in widths else (widths[0] if widths else None)
    with tempfile.TemporaryDirectory(prefix="ifprune-bench-") as tmp:
        for model in models:
            for name, folder in real_models(Path(model), bits, dtypes, Path(tmp), log):
                results.append(bench_model(folder, name, settings, detailed=True, real=True, log=log))
                samples.append(probe())  # the machine may be shared: probe again, keep the best
                if folder.is_relative_to(tmp):
                    shutil.rmtree(folder, ignore_errors=True)
        for b, dtype in variants(bits, dtypes):
            for width in widths:
                name = f"d{width}-{'q' + str(b) if b else dtype}"
                folder = synthetic_bundle(Path(tmp) / name, width, settings, bits=b, dtype=dtype)
                detailed = width == detail and b is None and dtype == dtypes[0]
                results.append(bench_model(folder, name, settings, detailed=detailed, log=log))
                shutil.rmtree(folder, ignore_errors=True)
                samples.append(probe())
    info["bandwidth_samples"] = samples
    info["bandwidth"] = {key: max(x[key] for x in samples) for key in samples[0]}
    info["results"] = [asdict(r) for r in results]
    info["seconds"] = time.perf_counter() - start
    info["load_end"] = load_average()
    return info


# -- checks ----------------------------------------------------------------------------

def bytes_bound(result: dict, row: dict) -> Optional[float]:
    """The largest speed-up over the dense model the bytes read per token allow at `row`'s density
    (dense bytes / pruned bytes; None without a density-1.0 row to compare with)."""
    if row.get("bytes_bound"):
        return row["bytes_bound"]
    dense = [d for d in result["decode"] if d["density"] == 1.0]
    return dense[0]["bytes_per_token"] / row["bytes_per_token"] if dense else None


def bound_violations(info: dict) -> list[dict]:
    """Decode figures that beat what the bytes read per token allow by more than BOUND_SLACK.

    A speed-up over the dense model is bounded by dense bytes / pruned bytes; in place vs a
    compact copy of the same rows reads the same bytes, so its ratio is bounded by 1. Above
    the bound, the figure measures something else: the machine's load changing between
    unpaired timings, or (mlx-lm's layout) a faster kernel rather than fewer bytes.
    Each: {"model", "density", "figure", "value", "bound"}.
    """
    out = []
    for r in info["results"]:
        for row in r["decode"]:
            bound = bytes_bound(r, row)
            checks = [("in place / mlx-lm layout", row.get("ratio_small"), 1.0),
                      ("in place / same kernels", row.get("ratio_rows"), 1.0),
                      ("speed-up vs mlx-lm dense", row.get("speedup"), bound),
                      ("speed-up vs dense, same kernels", row.get("speedup_rows"), bound)]
            for figure, value, limit in checks:
                if value is not None and limit is not None and value > limit * BOUND_SLACK:
                    out.append({"model": r["name"], "density": row["density"], "figure": figure,
                                "value": value, "bound": limit})
    return out
