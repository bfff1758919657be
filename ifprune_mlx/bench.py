"""`ifprune bench`: is the in-place runtime as fast as a model that is really that small?

Every figure is a ratio measured in one run, so CPU contention and clock drift cancel:
  decode     tokens/s of the engine pruned in place at each density vs (a) a plain mlx-lm
             model physically built with that FFN width (compact copies of the same kept
             rows) and (b) plain mlx-lm on the full dense model (at density 1.0). All run
             through mlx_lm.generate.generate_step from the same prompt; after a warm-up,
             blocks alternate (in place, reference, reference, in place, ...) and the ratio is
             the median of the ratios of neighbouring blocks.
  TTFT       predictor + apply (row swaps) + prefill, per prompt length, vs the dense model.
  reselect   engine.apply() time from a selection that differs by a fraction of its channels,
             with the rows it swapped (ApplyStats.swaps) and the cost of compact copies.
  memory     a fresh process loads the bundle, selects, applies and generates; peak MLX
             memory and RSS vs the weights' bytes.
  roofline   bytes read per decoded token (attention + kept FFN rows + lm_head + one
             embedding row + KV cache) / memory bandwidth measured in the same run.

Synthetic models are random mlx-lm llama models (d_ffn = 4 * d_model, head_dim 64, 4 query
heads per KV head) written as bundles with a random predictor; speed does not depend on
the values of the weights.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import typer

from .console import fail, friendly_errors

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
DENSITIES = (1.0, 0.5, 0.33, 0.25)
CHANGED = (0.0, 0.1, 0.5, 1.0)
RESELECT_DENSITY = 0.33
NOTES = "<!-- Hand-written notes below this line are kept when the benchmark is re-run. -->"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_TEXT = ("Write a Python function that reverses a list. Translate the sentence into French, "
         "please. What is the sum of 12 and 30? Sort these numbers: 5 3 9 1. ")


@dataclass
class Settings:
    """How much to measure. quick() is for tests and smoke runs."""

    decode_tokens: int = 8  # tokens per timed block
    decode_prompt: int = 32
    reps: int = 9  # most rounds per density
    min_reps: int = 4
    decode_budget: float = 20.0  # seconds of timed decode per density (min_reps rounds at least)
    ttft_reps: int = 2
    prompt_lengths: tuple[int, ...] = (32, 256, 1024)
    scaling_prompt_lengths: tuple[int, ...] = (256,)
    quantized_prompt_lengths: tuple[int, ...] = (16,)  # quantized prefill is slow on Linux CPU
    memory_prompt: int = 64
    densities: tuple[float, ...] = DENSITIES
    changed: tuple[float, ...] = CHANGED
    memory_tokens: int = 32
    layers: int = 8
    vocab: int = 32000

    @classmethod
    def quick(cls) -> "Settings":
        return cls(decode_tokens=4, decode_prompt=8, reps=1, min_reps=1, ttft_reps=1,
                   prompt_lengths=(8, 32), scaling_prompt_lengths=(8,), quantized_prompt_lengths=(8,),
                   memory_prompt=8, densities=(1.0, 0.5, 0.25), changed=(0.0, 1.0), memory_tokens=4,
                   layers=2, vocab=512)


# -- machine ---------------------------------------------------------------------------

def blas_name() -> str:
    """Which BLAS MLX's CPU backend runs with in this process."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return f"OpenBLAS (LD_PRELOAD={os.environ['LD_PRELOAD']})"
    return "reference BLAS bundled with the mlx[cpu] wheel (no OpenBLAS preloaded)"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    import mlx_lm

    return {"os": f"{platform.system()} {platform.release()}", "cpu": cpu,
            "cores": os.cpu_count(), "ram_gb": round(ram, 1), "device": str(mx.default_device()),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "python": platform.python_version(),
            "blas": blas_name()}


def _best_seconds(fn: Callable[[], None], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidth(mb: int = 256, reps: int = 5, d: int = 2048) -> dict:
    """Memory bandwidth MLX reaches here: a streaming sum and a matrix-vector product, each
    over `mb` MB (more than the caches), and the matrix-matrix speed prefill depends on.

    The sum runs on one thread; the matrix-vector product ([1, d] @ [rows, d].T, float32) is
    what decode does, through the BLAS in use; the matrix-matrix product is
    [256, d] @ [4d, d].T.
    """
    a = mx.random.uniform(shape=(mb * 2**20 // 4,))
    w = mx.random.normal((mb * 2**20 // (4 * d), d))
    x = mx.random.normal((1, d))
    mx.eval(a, w, x)
    t_sum = _best_seconds(lambda: mx.eval(a.sum()), reps)
    t_mv = _best_seconds(lambda: mx.eval(x @ w.T), reps * 2)
    del a
    m, w4 = mx.random.normal((256, d)), w[: 4 * d]
    mx.eval(m, w4)
    t_mm = _best_seconds(lambda: mx.eval(m @ w4.T), 2)
    out = {"stream_gbs": mb * 2**20 / t_sum / 1e9, "gemv_gbs": w.nbytes / t_mv / 1e9,
           "gemm_gflops": 2 * 256 * d * 4 * d / t_mm / 1e9}
    del w, x, m, w4
    gc.collect()
    mx.clear_cache()
    return out


# -- models ----------------------------------------------------------------------------

def synthetic_config(d_model: int, layers: int = 8, vocab: int = 32000) -> dict:
    """A llama config of width d_model: d_ffn = 4 * d_model (multiple of 256), head_dim 64."""
    from .testing import model_config

    heads = max(1, d_model // 64)
    return model_config("llama", hidden_size=d_model, num_hidden_layers=layers,
                        intermediate_size=-(-4 * d_model // 256) * 256, vocab_size=vocab,
                        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                        max_position_embeddings=4096)


def write_synthetic_bundle(folder: Path, config: dict, *, bits: int | None = None,
                           dtype: str = "float32", seed: int = 0) -> Path:
    """A bundle of random weights with a random predictor (backbone width d_model / 4)."""
    from .bundle import write_bundle
    from .models import quantize_rows, to_row_layout
    from .testing import make_tokenizer, random_predictor, random_weights

    folder = Path(folder)
    tok_dir = make_tokenizer(folder.parent / f".{folder.name}-tokenizer", 512)
    weights = to_row_layout(random_weights(config, seed))
    if dtype != "float32":
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    if bits:
        weights, config = quantize_rows(weights, config, bits)
    mx.eval(weights)
    predictor = random_predictor(config, d_pred=max(32, config["hidden_size"] // 4))
    out = write_bundle(folder, config=config, weights=weights, tokenizer_dir=tok_dir,
                       predictor=predictor, force=True)
    del weights, predictor
    gc.collect()
    mx.clear_cache()
    return out


def plain_model(engine, k: int | None = None) -> nn.Module:
    """A plain mlx-lm model (nn.Linear FFN) holding compact copies of the engine's FFN rows.

    k=None: every channel, in original order (the dense model as mlx-lm runs it).
    k: the first k positions of every layer, i.e. the selection applied now
    (intermediate_size = k: the model that is physically that small).
    Attention, norms and embeddings are shared with the engine (they are never written).
    """
    from .models import build_model, quantize_like

    config = {key: v for key, v in engine.config.items() if key not in ("ifpruning", "quantization")}
    q = engine.config.get("quantization")
    width = engine.d_ffn if k is None else k
    weights = {n: v for n, v in nn.utils.tree_flatten(engine.model.parameters()) if ".mlp." not in n}
    for i, mlp in enumerate(engine.mlps):
        order = np.argsort(mlp.perm) if k is None else np.arange(k)
        idx = mx.array(order.astype(np.int32))
        prefix = f"model.layers.{i}.mlp"
        for name in ("gate_proj", "up_proj"):
            layer = getattr(mlp, name)
            for part in layer.row_arrays():
                weights[f"{prefix}.{name}.{part}"] = layer[part][idx]  # a gather: a new buffer
        down = mlp.down_proj
        if q:
            rows = mx.dequantize(down.weight[idx], down.scales[idx], down.biases[idx],
                                 group_size=down.group_size, bits=down.bits)
            w, s, b = mx.quantize(mx.contiguous(rows.T), group_size=q["group_size"], bits=q["bits"])
            weights.update({f"{prefix}.down_proj.weight": w, f"{prefix}.down_proj.scales": s,
                            f"{prefix}.down_proj.biases": b})
        else:
            weights[f"{prefix}.down_proj.weight"] = mx.contiguous(down.weight[idx].T)
        if "bias" in down:
            weights[f"{prefix}.down_proj.bias"] = down.bias
        mx.eval([v for n, v in weights.items() if n.startswith(prefix)])
    model = build_model(dict(config, intermediate_size=width), prunable=False)
    if q:
        quantize_like(model, q, weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


def _array_bytes(tree) -> int:
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(tree))


def bytes_per_token(engine, k: int, context: int) -> dict:
    """Bytes one decode step reads: weights touched + the KV cache at `context` tokens."""
    c = engine.config
    ffn = sum(_array_bytes(m.parameters()) for m in engine.mlps) * k / engine.d_ffn
    embed = _array_bytes(engine.model.model.embed_tokens.parameters())
    rest = _array_bytes(engine.model.parameters()) - ffn * engine.d_ffn / k - embed
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    itemsize = engine.model.model.norm.weight.dtype.size
    kv = 2 * engine.n_layers * c["num_key_value_heads"] * head_dim * context * itemsize
    weights = ffn + rest + embed / c["vocab_size"]
    return {"weights": weights, "kv": kv, "total": weights + kv}


# -- measurements ----------------------------------------------------------------------

def _ids(engine, n: int) -> list[int]:
    """n token ids of English-like text (the prompt every variant decodes from)."""
    text = _TEXT
    ids = engine.tokenizer.encode(text)
    while len(ids) < n:
        text += _TEXT
        ids = engine.tokenizer.encode(text)
    return ids[:n]


def prompt_text(engine, n: int, salt: int = 0) -> tuple[str, list[int]]:
    """A prompt text of about n tokens (different per salt) and its exact token ids."""
    text = f"Task {salt}: " + _TEXT
    while len(engine.tokenizer.encode(text)) < n:
        text += _TEXT
    ids = engine.tokenizer.encode(text)[:n]
    text = engine.tokenizer.decode(ids)
    return text, engine.tokenizer.encode(text)


def decode_tps(model: nn.Module, prompt: list[int], tokens: int, cache: list | None = None) -> float:
    """Decode tokens/s of generate_step (greedy), the first token (prefill) excluded.

    With `cache` (an mlx-lm prompt cache), the generation continues it: pass the last
    token as `prompt` and no prefill is paid again.
    """
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=tokens + 1,
                          prompt_cache=cache)
    next(steps)
    start = time.perf_counter()
    n = sum(1 for _ in steps)
    return n / (time.perf_counter() - start)


class _Stream:
    """One variant's generation, continued block after block on its own KV cache."""

    def __init__(self, model: nn.Module, prompt: list[int]):
        from mlx_lm.models.cache import make_prompt_cache

        self.model, self.cache, self.prompt = model, make_prompt_cache(model), prompt
        decode_tps(model, prompt, 1, self.cache)  # prefill (+ warm-up)
        self.prompt = prompt[-1:]

    def block(self, tokens: int) -> float:
        return decode_tps(self.model, self.prompt, tokens, self.cache)


def first_token_seconds(model: nn.Module, prompt: list[int]) -> float:
    """Prefill + first token of generate_step."""
    from mlx_lm.generate import generate_step

    start = time.perf_counter()
    next(generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=1))
    return time.perf_counter() - start


def _free(*_models) -> None:
    gc.collect()
    mx.clear_cache()


def decode(engine, dense: nn.Module, s: Settings, log: Callable[[str], None]) -> list[dict]:
    """Per density: the engine pruned in place vs its reference, timed in alternation.

    The reference is the physically small model (density < 1) or mlx-lm on the dense model
    (density 1.0, where the two are the same model). Rounds of two blocks in alternating
    order (AB, BA, ...); the ratio is the median over rounds of the ratio of the two
    neighbouring blocks, so load changes between rounds cancel.
    """
    prompt = _ids(engine, s.decode_prompt)
    text = engine.tokenizer.decode(prompt)
    rows, dense_tps = [], None
    for density in sorted(s.densities, reverse=True):
        k = engine.kept_count(density)
        engine.apply(None if k == engine.d_ffn else engine.select(text, density))
        reference = dense if k == engine.d_ffn else plain_model(engine, k)
        few = mx.array([prompt[:4]])
        check = float(mx.abs(engine.model(few) - reference(few)).max())
        variants = {"inplace": _Stream(engine.model, prompt), "reference": _Stream(reference, prompt)}
        warm = [v.block(2) for v in variants.values()]
        # At least min_reps rounds in the budget: shorter blocks for slow models.
        per_token = sum(1 / tps for tps in warm)  # seconds for one token of each variant
        tokens = max(2, min(s.decode_tokens, int(s.decode_budget / (s.min_reps * per_token))))
        reps = max(s.min_reps, min(s.reps, int(s.decode_budget / (tokens * per_token))))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(reps):
            for name in (("inplace", "reference") if rep % 2 == 0 else ("reference", "inplace")):
                times[name].append(variants[name].block(tokens))
        med = {name: statistics.median(t) for name, t in times.items()}
        ratio = statistics.median(a / b for a, b in zip(times["inplace"], times["reference"]))
        if k == engine.d_ffn:
            dense_tps = med["reference"]
        bpt = bytes_per_token(engine, k, s.decode_prompt + (reps * (tokens + 1) + 3) // 2)
        row = {"density": density, "k": k, "inplace_tps": med["inplace"], "small_tps": med["reference"],
               "mlx_lm_tps": dense_tps, "ratio_small": ratio,
               "ratio_mlx_lm": ratio if k == engine.d_ffn else None,
               "speedup": med["inplace"] / dense_tps if dense_tps else None,
               "ratio_best": max(times["inplace"]) / max(times["reference"]),
               "reps": reps, "block_tokens": tokens, "bytes_per_token": bpt["total"],
               "max_logit_diff": check, "samples": {n: [round(x, 2) for x in t] for n, t in times.items()}}
        rows.append(row)
        what = "mlx-lm dense" if k == engine.d_ffn else "small"
        log(f"  decode density {density:.2f} (k={k}): in place {med['inplace']:.1f} tok/s, "
            f"{what} {med['reference']:.1f} -> {ratio:.3f}x (best blocks {row['ratio_best']:.3f}x; "
            f"{reps} x {tokens} tokens)")
        del reference, variants
        _free()
    engine.apply(None)
    return rows


def ttft(engine, dense: nn.Module, lengths: tuple[int, ...], s: Settings,
         log: Callable[[str], None]) -> list[dict]:
    """Time to first token: predictor + apply + prefill (pruned) vs prefill (dense mlx-lm).

    Before each pruned measurement the selection of another prompt is applied, so apply
    swaps what a new task would swap. Every prompt text is new, so nothing is cached.
    """
    density = RESELECT_DENSITY
    rows = []
    for n in lengths:
        parts: dict[str, list[float]] = {"predictor": [], "apply": [], "prefill": [], "dense": [],
                                         "swaps": []}
        other = engine.select(prompt_text(engine, n, salt=10_000)[0], density)
        first_token_seconds(dense, _ids(engine, n))  # warm-up
        for rep in range(s.ttft_reps + 1):
            text, ids = prompt_text(engine, n, salt=rep + 100 * n)
            engine.apply(other)
            start = time.perf_counter()
            sel = engine.select(text, density)
            t_pred = time.perf_counter() - start
            start = time.perf_counter()
            stats = engine.apply(sel)
            t_apply = time.perf_counter() - start
            t_prefill = first_token_seconds(engine.model, ids)
            t_dense = first_token_seconds(dense, ids)
            if rep == 0:
                continue  # warm-up
            for key, v in zip(parts, (t_pred, t_apply, t_prefill, t_dense, stats.swaps)):
                parts[key].append(v)
        med = {key: statistics.median(v) for key, v in parts.items()}
        total = med["predictor"] + med["apply"] + med["prefill"]
        rows.append({"tokens": len(ids), "density": density, **med, "total": total,
                     "ratio_dense": total / med["dense"]})
        log(f"  TTFT {len(ids)} tokens: predictor {med['predictor'] * 1e3:.1f} ms + apply "
            f"{med['apply'] * 1e3:.1f} ms + prefill {med['prefill'] * 1e3:.1f} ms = "
            f"{total * 1e3:.1f} ms vs dense {med['dense'] * 1e3:.1f} ms")
    engine.apply(None)
    return rows


def _changed(base, fraction: float, d_ffn: int, rng: np.random.Generator):
    """Per layer, `base` with round(fraction * k) channels replaced by channels outside it."""
    out = []
    for ids in base.indices:
        n = int(round(fraction * len(ids)))
        outside = np.setdiff1d(np.arange(d_ffn), ids)
        drop = rng.choice(len(ids), size=n, replace=False)
        out.append(np.sort(np.concatenate([np.delete(ids, drop), rng.choice(outside, n, replace=False)])))
    return out


def reselect(engine, s: Settings, log: Callable[[str], None]) -> list[dict]:
    """engine.apply() time vs the fraction of kept channels that change; compact copies too."""
    from .selectors import Selection

    rng = np.random.default_rng(0)
    base = engine.select(prompt_text(engine, 32, salt=7)[0], RESELECT_DENSITY)
    k = base.kept[0]
    rows = []
    for fraction in s.changed:
        target = Selection.from_indices(_changed(base, fraction, engine.d_ffn, rng), engine.d_ffn,
                                        engine.n_layers)
        times, swaps = [], 0
        for _ in range(s.reps + 1):
            engine.apply(base)
            start = time.perf_counter()
            swaps = engine.apply(target).swaps
            times.append(time.perf_counter() - start)
        engine.apply(base)
        rows.append({"fraction": fraction, "k": k, "seconds": statistics.median(times[1:]),
                     "swaps": swaps, "rows_per_layer": k})
    # What a runtime without in-place selection pays: compact copies of k rows, every layer.
    idx = mx.array(np.sort(rng.choice(engine.d_ffn, k, replace=False)).astype(np.int32))

    def copies():
        out = [m[name][idx] for mlp in engine.mlps for m, name in mlp.row_arrays()]
        mx.eval(out)

    copy_s = _best_seconds(copies, s.reps)
    for row in rows:
        row["compact_copy_seconds"] = copy_s
        log(f"  reselect {row['fraction']:.0%} changed: {row['seconds'] * 1e3:.1f} ms, "
            f"{row['swaps']} row swaps (compact copies: {copy_s * 1e3:.1f} ms)")
    engine.apply(None)
    _free()
    return rows


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process, bytes."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if ":" in line)
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):  # macOS: ru_maxrss is in bytes there
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak


def memory_probe(folder: str, density: float, prompt_tokens: int, tokens: int) -> dict:
    """In a fresh process: load + select + apply + generate; peak memory vs weight bytes."""
    import ifprune_mlx

    rss0 = _rss()[0]
    mx.reset_peak_memory()
    engine = ifprune_mlx.load(folder)
    after_load = mx.get_peak_memory()
    text, ids = prompt_text(engine, prompt_tokens, salt=1)
    engine.apply(engine.select(text, density))
    after_apply = mx.get_peak_memory()
    n = sum(1 for _ in engine.stream_responses(text, max_tokens=tokens, tokens=ids))
    peak = mx.get_peak_memory()
    rss = _rss()[1]
    weights = engine.weight_bytes()
    predictor = _array_bytes(engine.selectors["predictor"].predictor.parameters()) if engine.has_predictor else 0
    k = engine.mlps[0].k
    kv = bytes_per_token(engine, k, len(ids) + n)["kv"]
    return {"weights": weights, "predictor": predictor, "kv": kv, "peak_load": after_load,
            "peak_apply": after_apply, "peak": peak, "rss": rss, "rss_start": rss0,
            "tokens": len(ids) + n, "ratio": (peak - kv) / (weights + predictor),
            "rss_ratio": (rss - rss0 - kv) / (weights + predictor)}


def memory(folder: Path, s: Settings) -> dict:
    """memory_probe() in a fresh interpreter (same environment, so the same BLAS)."""
    code = ("import json, sys; from ifprune_mlx.bench import memory_probe; "
            "print(json.dumps(memory_probe(*sys.argv[1:2], *map(float, sys.argv[2:3]), "
            "*map(int, sys.argv[3:]))))")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(RESELECT_DENSITY),
                          str(s.memory_prompt), str(s.memory_tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- one model -------------------------------------------------------------------------

@dataclass
class ModelResult:
    name: str
    d_model: int
    d_ffn: int
    layers: int
    vocab: int
    quant: str
    weight_bytes: int
    decode: list[dict] = field(default_factory=list)
    ttft: list[dict] = field(default_factory=list)
    reselect: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    seconds: float = 0.0
    detailed: bool = False


def bench_model(folder: Path, name: str, s: Settings, *, detailed: bool,
                log: Callable[[str], None]) -> ModelResult:
    """All measurements on one bundle (or plain model folder)."""
    import ifprune_mlx

    start = time.perf_counter()
    engine = ifprune_mlx.load(folder, cache_size=0)
    c, q = engine.config, engine.config.get("quantization")
    result = ModelResult(name=name, d_model=c["hidden_size"], d_ffn=engine.d_ffn,
                         layers=engine.n_layers, vocab=c["vocab_size"],
                         quant=f"{q['bits']}-bit (group {q['group_size']})" if q else
                         str(engine.model.model.norm.weight.dtype).replace("mlx.core.", ""),
                         weight_bytes=engine.weight_bytes(), detailed=detailed)
    log(f"{name}: d_model {result.d_model}, d_ffn {result.d_ffn}, {result.layers} layers, "
        f"vocab {result.vocab}, {result.quant}, {result.weight_bytes / 1e6:.0f} MB")
    if engine.has_predictor:
        result.memory = memory(folder, s)
        log(f"  memory: peak {result.memory['peak'] / 1e6:.0f} MB = {result.memory['ratio']:.3f}x "
            f"the weights (+KV)")
    dense = plain_model(engine)
    result.decode = decode(engine, dense, s, log)
    if engine.has_predictor:
        lengths = (s.prompt_lengths if detailed else
                   s.quantized_prompt_lengths if q else s.scaling_prompt_lengths)
        result.ttft = ttft(engine, dense, lengths, s, log)
    del dense
    _free()
    result.reselect = reselect(engine, s, log)
    result.seconds = time.perf_counter() - start
    del engine
    _free()
    return result


def _command(args: list[str]) -> str:
    """The shell command that runs `ifprune bench args` as this process does."""
    preload = os.environ.get("LD_PRELOAD")
    return (f"LD_PRELOAD={preload} " if preload else "") + " ".join(["ifprune", "bench", *args])


def _bandwidth_without_openblas(quick: bool) -> Optional[dict]:
    """bandwidth() in a fresh process without the preloaded OpenBLAS (None if none is)."""
    if "openblas" not in os.environ.get("LD_PRELOAD", ""):
        return None
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    args = "16, 2, 512" if quick else "64, 2"
    code = f"import json; from ifprune_mlx.bench import bandwidth; print(json.dumps(bandwidth({args})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(*, model: Optional[Path], widths: list[int], bits: list[Optional[int]], dtype: str,
        settings: Settings, detail: Optional[int] = 1024, log: Callable[[str], None] = print,
        command: str = "") -> dict:
    """Run the benchmark; returns everything write_markdown() and plot() need.

    `detail`: the width (float, not quantized) whose TTFT is measured at every prompt
    length; the other models get s.scaling_prompt_lengths only.
    """
    start = time.perf_counter()
    info = {"machine": machine(), "settings": settings.__dict__,
            "command": command or _command(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    quick = settings.layers <= 2
    probe = (lambda: bandwidth(16, 2, 512)) if quick else bandwidth
    samples = [probe()]
    bw = samples[0]
    log(f"BLAS: {info['machine']['blas']}; streaming read {bw['stream_gbs']:.1f} GB/s, "
        f"matrix-vector {bw['gemv_gbs']:.1f} GB/s, matrix-matrix {bw['gemm_gflops']:.0f} GFLOP/s")
    info["bandwidth_reference_blas"] = _bandwidth_without_openblas(quick)
    if info["bandwidth_reference_blas"]:
        ref = info["bandwidth_reference_blas"]
        log(f"without OpenBLAS: matrix-vector {ref['gemv_gbs']:.1f} GB/s, matrix-matrix "
            f"{ref['gemm_gflops']:.0f} GFLOP/s")
    results = []
    if model is not None:
        results.append(bench_model(Path(model), Path(model).name, settings, detailed=True, log=log))
    else:
        detail = detail if detail in widths else widths[0]
        with tempfile.TemporaryDirectory(prefix="ifprune-bench-") as tmp:
            for b in bits:
                for width in widths:
                    config = synthetic_config(width, settings.layers, settings.vocab)
                    name = f"d{width}-{'q' + str(b) if b else dtype}"
                    folder = write_synthetic_bundle(Path(tmp) / name, config, bits=b, dtype=dtype)
                    detailed = width == detail and b is None
                    results.append(bench_model(folder, name, settings, detailed=detailed, log=log))
                    shutil.rmtree(folder, ignore_errors=True)
                    samples.append(probe())  # the machine is shared: probe again, keep the best
    info["bandwidth_samples"] = samples
    info["bandwidth"] = {key: max(x[key] for x in samples) for key in samples[0]}
    info["results"] = [r.__dict__ for r in results]
    info["seconds"] = time.perf_counter() - start
    return info


# -- report ----------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def targets(info: dict) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for the performance targets of docs/DESIGN."""
    out = []
    for r in info["results"]:
        pruned = [d for d in r["decode"] if d["density"] < 1.0]
        if pruned:
            worst = min(pruned, key=lambda d: d["ratio_small"])
            out.append((f"{r['name']}: decode in place >= 0.95x physically small, every density",
                        worst["ratio_small"] >= 0.95,
                        f"worst {worst['ratio_small']:.3f}x at density {worst['density']:.2f}"))
        full = [d for d in r["decode"] if d["density"] == 1.0]
        if full:
            out.append((f"{r['name']}: density 1.0 >= 0.97x mlx-lm", full[0]["ratio_mlx_lm"] >= 0.97,
                        f"{full[0]['ratio_mlx_lm']:.3f}x"))
        if r["memory"]:
            out.append((f"{r['name']}: peak memory <= 1.02x weights (+ KV cache)",
                        r["memory"]["ratio"] <= 1.02, f"{r['memory']['ratio']:.3f}x"))
    return out


def write_markdown(info: dict, out: Path, plot: Optional[Path] = None) -> Path:
    m, bw, s = info["machine"], info["bandwidth"], info["settings"]
    res = info["results"]
    main = next((r for r in res if r["detailed"]), res[0])
    lines = [
        "# Benchmarks",
        "",
        "Is the in-place runtime as fast as a model that is really that small? Written by "
        "`ifprune bench` (ifprune_mlx/bench.py); every ratio comes from one run in which the "
        "variants were timed in alternation (in place, reference, reference, in place, ...), so "
        "ratios, not absolute figures, are what to read: the machine (2 cores) was shared with "
        "other jobs while it ran, and absolute tok/s move with their load.",
        "",
        f"- command: `{info['command']}` ({info['seconds'] / 60:.1f} min; `make bench` runs "
        "it, preloading OpenBLAS on Linux when installed)",
        f"- date: {info['date']}",
        f"- machine: {m['os']}, {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, MLX device "
        f"{m['device']}",
        f"- software: mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, Python {m['python']}",
        f"- BLAS: {m['blas']}",
        f"- measured in this run (best of {len(info.get('bandwidth_samples', [bw]))} probes, at the "
        f"start and after each model): streaming read (MLX sum) {bw['stream_gbs']:.1f} GB/s, "
        f"matrix-vector {bw['gemv_gbs']:.1f} GB/s, matrix-matrix {bw['gemm_gflops']:.0f} GFLOP/s "
        f"(float32); the roofline uses the larger read bandwidth, {_roof_gbs(info):.1f} GB/s"
        + _reference_blas_note(info),
        f"- decode: blocks of up to {s['decode_tokens']} tokens (fewer for slow models, see "
        f"'rounds'), greedy, `mlx_lm.generate.generate_step` for every variant; each variant "
        f"prefills a {s['decode_prompt']}-token prompt once and continues its own generation "
        "(own KV cache) block after block; after a warm-up, "
        f"{s['min_reps']}-{s['reps']} rounds of two blocks in alternating order (in place, "
        "reference; reference, in place; ...); tok/s are medians, ratios are medians over rounds "
        "of the ratio of the round's two blocks, so load changes between rounds cancel",
        "- models: random llama weights (speed does not depend on values), "
        f"{main['layers']} layers, vocab {main['vocab']} with an untied lm_head, d_ffn = 4 d_model, "
        "head_dim 64, 4 query heads per KV head; random predictor (1-layer qwen2 backbone of "
        "width d_model / 4 + head) in the bundle.",
        "- physically small = a plain mlx-lm llama (nn.Linear FFN, intermediate_size = k) "
        "holding compact copies of exactly the rows the engine keeps; mlx-lm dense = the same "
        "weights in mlx-lm's own layout. Their logits match the engine's (max |diff| in the "
        "tables).",
        "",
    ]
    if plot:
        lines += [f"![decode and re-selection]({plot.name})", ""]
    lines += ["## Targets", ""]
    lines += [_table(["target", "met", "measured"],
                     [[t, "yes" if ok else "**no**", v] for t, ok, v in targets(info)]), ""]
    lines += _scaling(res)
    for r in sorted(res, key=lambda r: not r["detailed"]):
        lines += [f"## {r['name']}: d_model {r['d_model']}, d_ffn {r['d_ffn']}, {r['layers']} layers, "
                  f"{r['quant']}, weights {r['weight_bytes'] / 1e6:.0f} MB", ""]
        lines += ["### Decode (tokens/s)", "",
                  "Reference: the physically small model below density 1.0, mlx-lm on the dense "
                  "model at 1.0. Speed-up: in place vs the dense mlx-lm median of the density-1.0 "
                  "rounds; unlike the ratios it is not paired (the densities run one after "
                  "another, so load changes between them move it). Roofline: MB read per token / "
                  "the run's best read bandwidth; absolute, so it moves with the load too.", ""]
        rows = []
        for d in r["decode"]:
            roof = _roof_gbs(info) * 1e9 / d["bytes_per_token"]
            ref = "mlx-lm dense" if d["ratio_mlx_lm"] is not None else "small"
            rows.append([f"{d['density']:.2f}", d["k"], f"{d['inplace_tps']:.1f}",
                         f"{d['small_tps']:.1f} ({ref})", f"**{d['ratio_small']:.3f}**",
                         f"{d['ratio_best']:.3f}", f"{d['speedup']:.2f}x" if d["speedup"] else "",
                         f"{d['bytes_per_token'] / 1e6:.1f}",
                         f"{d['bytes_per_token'] * d['inplace_tps'] / 1e9:.1f}", f"{roof:.1f}",
                         f"{d['inplace_tps'] / roof:.0%}", f"{d['reps']} x {d['block_tokens']}",
                         f"{d['max_logit_diff']:.1e}", ""])
        lines += [_table(["density", "kept k", "in place", "reference", "in place / reference",
                          "same, best blocks", "speed-up vs dense", "MB read / token",
                          "in place GB/s", "roofline tok/s", "in place / roofline", "rounds x tokens", "max logit diff",
                          "Mac (Metal) in place / reference"],
                         rows), ""]
        if r["ttft"]:
            lines += [f"### Time to first token (ms), density {r['ttft'][0]['density']}", ""]
            lines += [_table(["prompt tokens", "predictor", "apply (row swaps)", "rows swapped",
                              "prefill (pruned)", "TTFT pruned", "TTFT dense (mlx-lm)", "pruned / dense",
                              "Mac (Metal) pruned / dense"],
                             [[t["tokens"], _ms(t["predictor"]), _ms(t["apply"]), int(t["swaps"]),
                               _ms(t["prefill"]), _ms(t["total"]), _ms(t["dense"]),
                               f"{t['ratio_dense']:.3f}", ""] for t in r["ttft"]]), ""]
        if r["reselect"]:
            k = r["reselect"][0]["k"]
            lines += [f"### Re-selection: engine.apply() vs channels changed (k = {k} of {r['d_ffn']}, "
                      f"all {r['layers']} layers)", ""]
            lines += [_table(["changed", "rows swapped", "apply ms", "compact copies ms (no in-place)",
                              "Mac (Metal) apply ms"],
                             [[f"{x['fraction']:.0%}", x["swaps"], _ms(x["seconds"]),
                               _ms(x["compact_copy_seconds"]), ""] for x in r["reselect"]]), ""]
        if r["memory"]:
            mem = r["memory"]
            lines += ["### Memory (fresh process: load + select + apply + generate)", ""]
            base = mem["weights"] + mem["predictor"]
            lines += [_table(["LLM + predictor weights MB", "KV cache MB", "peak after load",
                              "peak after select + apply", "peak after generate",
                              "(peak - KV) / weights", "RSS growth MB", "(RSS growth - KV) / weights"],
                             [[f"{mem['weights'] / 1e6:.1f} + {mem['predictor'] / 1e6:.1f}",
                               f"{mem['kv'] / 1e6:.2f}", f"{mem['peak_load'] / 1e6:.1f} "
                               f"({mem['peak_load'] / base:.3f}x)",
                               f"{mem['peak_apply'] / 1e6:.1f} ({mem['peak_apply'] / base:.3f}x)",
                               f"{mem['peak'] / 1e6:.1f}", f"**{mem['ratio']:.3f}**",
                               f"{(mem['rss'] - mem['rss_start']) / 1e6:.1f}", f"{mem['rss_ratio']:.3f}"]]),
                      "", f"Prompt {mem['tokens'] - s['memory_tokens']} tokens + {s['memory_tokens']} "
                      "generated, density 0.33; peaks from `mx.get_peak_memory()`, RSS from the "
                      "process's high-water mark (VmHWM) minus its RSS before loading.", ""]
    lines += _mac_section()
    out = Path(out)
    kept = out.read_text().split(NOTES, 1)[1] if out.is_file() and NOTES in out.read_text() else "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + NOTES + kept)
    return out


def _roof_gbs(info: dict) -> float:
    """The read bandwidth the roofline divides by: the best one measured in the run."""
    return max(info["bandwidth"]["stream_gbs"], info["bandwidth"]["gemv_gbs"])


def _reference_blas_note(info: dict) -> str:
    ref = info.get("bandwidth_reference_blas")
    if not ref:
        return ""
    return (f"; without OpenBLAS (the wheel's reference BLAS, measured in a child process of "
            f"this run): matrix-vector {ref['gemv_gbs']:.1f} GB/s, matrix-matrix "
            f"{ref['gemm_gflops']:.0f} GFLOP/s")


def _scaling(res: list[dict]) -> list[str]:
    if len(res) < 2:
        return []
    rows = []
    for r in res:
        pruned = [d for d in r["decode"] if d["density"] < 1.0]
        full = [d for d in r["decode"] if d["density"] == 1.0]
        low = min(r["decode"], key=lambda d: d["density"])
        ttft = ", ".join(f"{t['ratio_dense']:.2f} ({t['tokens']} tok)" for t in r["ttft"])
        rows.append([r["name"], f"{r['weight_bytes'] / 1e6:.0f}",
                     f"{min(d['ratio_small'] for d in pruned):.3f}" if pruned else "",
                     f"{full[0]['ratio_mlx_lm']:.3f}" if full else "",
                     f"{low['speedup']:.2f}x at {low['density']:.2f}" if low["speedup"] else "",
                     ttft,
                     _ms(r["reselect"][-1]["seconds"]) if r["reselect"] else "",
                     f"{r['memory']['ratio']:.3f}" if r["memory"] else ""])
    return ["## Scaling", "",
            _table(["model", "weights MB", "worst in place / small", "dense in place / mlx-lm",
                    "decode speed-up vs dense", "TTFT pruned / dense",
                    "re-select 100% ms", "peak memory / weights"], rows), ""]


def _mac_section() -> list[str]:
    return ["## Mac (Metal)", "",
            "The columns headed \"Mac (Metal)\" are empty: this run was on Linux CPU. On an "
            "Apple-silicon Mac, from the repository:", "",
            "```", "make bench            # installs mlx (Metal) into .venv, then runs the same benchmark",
            "# or: .venv/bin/ifprune bench --out docs/BENCHMARKS-mac.md --plot docs/benchmarks-mac.png",
            "```", "",
            "and copy the ratios into those columns (BLAS is Accelerate there; no LD_PRELOAD).", ""]


def plot(info: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = info["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    main = next((r for r in res if r["detailed"]), res[0])
    dens = [d["density"] for d in main["decode"]]
    ax.plot(dens, [d["inplace_tps"] for d in main["decode"]], "o-", label="in place (ifprune)")
    ax.plot(dens, [d["small_tps"] for d in main["decode"]], "s--",
            label="physically small (mlx-lm); at 1.0 mlx-lm dense")
    if main["decode"][0]["mlx_lm_tps"]:
        ax.axhline(main["decode"][0]["mlx_lm_tps"], color="gray", ls=":", label="mlx-lm dense")
    ax.set(xlabel="density (fraction of FFN channels kept)", ylabel="decode tokens/s",
           title=f"decode, {main['name']}")
    ax.legend(loc="lower left", fontsize=8)
    ax = axes[1]
    for r in res:
        ax.plot([d["density"] for d in r["decode"]], [d["ratio_small"] for d in r["decode"]], "o-",
                label=r["name"])
    ax.axhline(0.95, color="gray", ls="--", lw=1)
    ax.set(xlabel="density", ylabel="in place / physically small", title="decode ratio (target >= 0.95)")
    ax.legend(fontsize=8)
    ax = axes[2]
    for r in res:
        if r["reselect"]:
            ax.plot([x["fraction"] * 100 for x in r["reselect"]],
                    [x["seconds"] * 1e3 for x in r["reselect"]], "o-", label=r["name"])
    ax.set(xlabel="% of kept channels that change", ylabel="engine.apply() ms",
           title="re-selection cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command ---------------------------------------------------------------------------

def _parse_bits(text: str) -> list[Optional[int]]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(None if part in ("0", "none", "float", "") else int(part))
    return out


@friendly_errors
def bench(
    model: Optional[Path] = typer.Argument(None, help="A bundle or plain model folder to benchmark (default: synthetic models)."),
    synthetic: str = typer.Option("512,1024,2048", help="d_model of the synthetic random models, comma-separated."),
    dtype: str = typer.Option("float32", help="Float dtype of the synthetic models: float32, float16, bfloat16."),
    bits: str = typer.Option("0,4", help="Quantizations of the synthetic models: 0 (float), 4, 8; comma-separated."),
    quick: bool = typer.Option(False, "--quick", help="A fast smoke run: tiny models, few tokens, one repetition."),
    out: Path = typer.Option(Path("docs/BENCHMARKS.md"), "--out", help="The Markdown report to write."),
    plot_path: Optional[Path] = typer.Option(Path("docs/benchmarks.png"), "--plot", help="The PNG plot to write."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write every raw figure as JSON."),
    detail: int = typer.Option(1024, help="The synthetic width whose time to first token is measured at every prompt length."),
):
    """Benchmark decode, time to first token, re-selection and memory; write a Markdown report."""
    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        widths = [int(w) for w in synthetic.split(",") if w.strip()]
        bit_list = _parse_bits(bits)
    except ValueError:
        fail(f"--synthetic takes widths like 512,1024 and --bits like 0,4; got {synthetic!r}, {bits!r}")
    if any(b not in (None, 4, 8) for b in bit_list):
        fail(f"--bits takes 0 (float), 4 or 8; got {bits!r}")
    settings = Settings.quick() if quick else Settings()
    args = ([str(model)] if model else [f"--synthetic {synthetic}", f"--bits {bits}", f"--dtype {dtype}"])
    args += (["--quick"] if quick else []) + [f"--out {out}"] + ([f"--plot {plot_path}"] if plot_path else [])
    args += [f"--json {json_path}"] if json_path else []
    info = run(model=model, widths=widths, bits=bit_list, dtype=dtype, settings=settings,
               detail=detail, command=_command(args), log=lambda msg: typer.echo(msg, err=True))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(info, indent=1, default=str))
    png = None
    if plot_path:
        try:
            png = plot(info, plot_path)
        except ImportError:
            typer.secho("note: no plot (matplotlib is not installed: pip install matplotlib)", err=True)
    write_markdown(info, out, png)
    typer.echo(f"wrote {out}" + (f" and {png}" if png else ""))
