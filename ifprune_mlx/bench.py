"""Measure the in-place runtime against models that really are that small.

Every figure a ratio is made of comes from one run, the variants timed in alternation, so CPU
contention and clock drift cancel:
  decode     tokens/s of the engine pruned in place at each density vs compact copies of the
             rows it keeps, in two layouts: mlx-lm's (nn.Linear FFN, down_proj [d_model, k]:
             the model that is physically that small) and the engine's own row layout
             (PrunableMLP of width k: the same kernels, so a ratio isolates the in-place
             prefix); at density 1.0 the first is plain mlx-lm on the dense model, which is
             also timed in every pruned round, so speed-ups are paired too.
  TTFT       per prompt length, vs the dense model's prefill (mlx-lm): trained predictor +
             apply (row swaps) + pruned prefill, where the model has a predictor; training-free
             selection (GRIFFIN's dense pass, which also fills the KV cache) + apply + the
             prompt's last token pruned, on every model.
  reselect   engine.apply() time from a selection that differs by a fraction of its channels.
  memory     a fresh process loads, selects, applies and generates: peak memory vs weights.
  bytes      bytes read per decoded token, the bound every speed-up must respect.

Models: synthetic random ones of several widths and dtypes, and real ones (`ifprune bench
MODEL`): a GGUF file is converted once per float dtype and quantization asked for (the
default model's GGUF in float32, bfloat16 and 4-bit in `make bench`). The machine's load
average is recorded with every model and decode row: absolute tok/s depend on it, paired
ratios much less.

`ifprune bench` prints the figures (and writes them as JSON); examples/benchmark_report.py
turns a run into docs/BENCHMARKS.md.
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import typer

from .console import fail, friendly_errors
from .fidelity import compact_model

DENSITIES = (1.0, 0.5, 0.33, 0.25)
REAL_DENSITIES = (1.0, 0.7, 0.5, 0.3)  # real models have less slack than random ones
DEFAULT_MODEL = "default"  # `ifprune bench default`: the default model (resolve's, predictor included)
CHANGED = (0.0, 0.1, 0.5, 1.0)
# A speed-up may exceed its bytes-per-token bound by this factor before it is flagged: decode
# is memory-bound, so more than that means the two timings saw different machine load.
BOUND_SLACK = 1.10
DTYPES = ("float32", "float16", "bfloat16")
_TEXT = ("Write a Python function that reverses a list. Translate the sentence into French, "
         "please. What is the sum of 12 and 30? Sort these numbers: 5 3 9 1. ")


@dataclass
class Settings:
    """How much to measure. quick_run() is for tests and smoke runs (tiny models, small probes)."""

    decode_tokens: int = 8  # tokens per timed block
    decode_prompt: int = 32
    reps: int = 9  # most rounds per density
    min_reps: int = 4
    decode_budget: float = 20.0  # seconds of timed decode per density (min_reps rounds at least)
    ttft_reps: int = 2
    prompt_lengths: tuple[int, ...] = (32, 256, 1024)
    scaling_prompt_lengths: tuple[int, ...] = (256,)
    real_prompt_lengths: tuple[int, ...] = (32, 256)
    # Prompts of half-precision and quantized models: MLX's CPU backend multiplies float16/bfloat16
    # without BLAS (~50x slower prefill), and so does mlx-lm's quantized reference.
    slow_prompt_lengths: tuple[int, ...] = (32,)
    memory_prompt: int = 64
    densities: tuple[float, ...] = DENSITIES
    real_densities: tuple[float, ...] = REAL_DENSITIES
    changed: tuple[float, ...] = CHANGED
    memory_tokens: int = 32
    layers: int = 8
    vocab: int = 32000
    bandwidth_probe: tuple[int, int, int] = (256, 5, 2048)  # bandwidth(mb, reps, d)
    quick: bool = False

    @classmethod
    def quick_run(cls) -> "Settings":
        return cls(quick=True, decode_tokens=4, decode_prompt=8, reps=1, min_reps=1, ttft_reps=1,
                   prompt_lengths=(8, 32), scaling_prompt_lengths=(8,), real_prompt_lengths=(8,),
                   slow_prompt_lengths=(8,), memory_prompt=8, densities=(1.0, 0.5, 0.25),
                   real_densities=(1.0, 0.5), changed=(0.0, 1.0), memory_tokens=4,
                   layers=2, vocab=512, bandwidth_probe=(16, 2, 512))


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


def synthetic_bundle(folder: Path, d_model: int, s: Settings, *, bits: int | None = None,
                     dtype: str = "float32") -> Path:
    """A bundle of random weights of width d_model (synthetic_config) with a random predictor
    whose backbone is d_model / 4 wide (testing.make_bundle)."""
    from .testing import make_bundle

    config = synthetic_config(d_model, s.layers, s.vocab)
    out = make_bundle(folder, config, quantize_bits=bits, dtype=dtype,
                      predictor_width=max(32, d_model // 4), force=True)
    _free()
    return out


def _array_bytes(tree) -> int:
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(tree))


def _own_bytes(module: nn.Module, other: nn.Module) -> int:
    """Bytes of module's arrays that are not also other's (the predictor shares the LLM's
    unchanged arrays: predictor.share_llm_weights)."""
    theirs = {id(v) for _, v in nn.utils.tree_flatten(other.parameters())}
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(module.parameters()) if id(v) not in theirs)


def bytes_per_token(engine, k: int, context: int) -> dict:
    """Bytes one decode step reads: weights touched + the KV cache at `context` tokens.

    The embedding table is read one row per token, unless it is tied: then the output
    projection reads all of it (SmolLM2: 49152 x 576, a fifth of the model).
    """
    c = engine.config
    ffn = sum(_array_bytes(m.parameters()) for m in engine.mlps) * k / engine.d_ffn
    embed = _array_bytes(engine.model.model.embed_tokens.parameters())
    rest = _array_bytes(engine.model.parameters()) - ffn * engine.d_ffn / k - embed
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    itemsize = engine.model.model.norm.weight.dtype.size
    kv = 2 * engine.n_layers * c["num_key_value_heads"] * head_dim * context * itemsize
    tied = engine.model.args.tie_word_embeddings
    weights = ffn + rest + (embed if tied else embed / c["vocab_size"])
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


def first_token_seconds(model: nn.Module, prompt: list[int], cache: list | None = None) -> float:
    """Prefill + first token of generate_step (continuing `cache` when given)."""
    from mlx_lm.generate import generate_step

    start = time.perf_counter()
    next(generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=1, prompt_cache=cache))
    return time.perf_counter() - start


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS does not say): the benchmark
    shares the machine, and absolute figures depend on it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _free() -> None:
    """Give freed buffers back before the next measurement."""
    gc.collect()
    mx.clear_cache()


def decode(engine, s: Settings, densities: tuple[float, ...], log: Callable[[str], None]) -> list[dict]:
    """Per density: the engine pruned in place vs compact copies of its kept rows, timed in
    alternation.

    References (compact_model): "small", mlx-lm's layout (at density 1.0: mlx-lm on the dense
    model), "rows", the engine's layout (same kernels), and at lower densities "dense",
    mlx-lm on the dense model again. Each round times one block of every variant, in an
    order that rotates from round to round (a whole number of turns); a ratio is the median over rounds of the ratio
    of two variants' blocks in that round, so load changes between rounds cancel. The
    speed-up (in place vs mlx-lm dense) is paired that way too; bytes_bound is what the
    bytes read per token allow it to be.
    """
    prompt = _ids(engine, s.decode_prompt)
    text = engine.tokenizer.decode(prompt)
    rows, dense_tps = [], {}
    dense_model = compact_model(engine)
    for density in sorted(densities, reverse=True):
        k = engine.kept_count(density)
        engine.apply(None if k == engine.d_ffn else engine.select(text, density))
        references = {"small": compact_model(engine, None if k == engine.d_ffn else k),
                      "rows": compact_model(engine, k, rows=True)}
        few = mx.array([prompt[:4]])
        check = max(float(mx.abs(engine.model(few) - model(few)).max()) for model in references.values())
        if k < engine.d_ffn:
            references["dense"] = dense_model
        names = ("inplace", *references)
        variants = {"inplace": _Stream(engine.model, prompt),
                    **{name: _Stream(model, prompt) for name, model in references.items()}}
        warm = [v.block(2) for v in variants.values()]
        # At least min_reps rounds in the budget: shorter blocks for slow models.
        per_token = sum(1 / tps for tps in warm)  # seconds for one token of each variant
        tokens = max(2, min(s.decode_tokens, int(s.decode_budget / (s.min_reps * per_token))))
        reps = max(s.min_reps, min(s.reps, int(s.decode_budget / (tokens * per_token))))
        reps = -(-reps // len(names)) * len(names)  # each variant opens as many rounds as the others
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(variants[name].block(tokens))
        med = {name: statistics.median(t) for name, t in times.items()}

        def paired(ref: str) -> float:
            return statistics.median(a / b for a, b in zip(times["inplace"], times[ref]))

        if k == engine.d_ffn:
            dense_tps = {"mlx_lm": med["small"], "rows": med["rows"]}
        context = s.decode_prompt + (reps * (tokens + 1) + 3) // 2
        bpt = bytes_per_token(engine, k, context)["total"]
        row = {"density": density, "k": k, "inplace_tps": med["inplace"], "small_tps": med["small"],
               "rows_tps": med["rows"], "mlx_lm_tps": med.get("dense", dense_tps.get("mlx_lm")),
               "ratio_small": paired("small"), "ratio_rows": paired("rows"),
               "ratio_mlx_lm": paired("small") if k == engine.d_ffn else None,
               "speedup": paired("small" if k == engine.d_ffn else "dense"),
               "speedup_rows": med["inplace"] / dense_tps["rows"] if dense_tps else None,
               "bytes_bound": bytes_per_token(engine, engine.d_ffn, context)["total"] / bpt,
               "ratio_best": max(times["inplace"]) / max(times["small"]),
               "reps": reps, "block_tokens": tokens, "bytes_per_token": bpt, "load": load_average(),
               "max_logit_diff": check, "samples": {n: [round(x, 2) for x in t] for n, t in times.items()}}
        rows.append(row)
        what = "mlx-lm dense" if k == engine.d_ffn else "small"
        log(f"  decode density {density:.2f} (k={k}): in place {med['inplace']:.1f} tok/s, "
            f"{what} {med['small']:.1f} -> {row['ratio_small']:.3f}x, same kernels {med['rows']:.1f} -> "
            f"{row['ratio_rows']:.3f}x, speed-up vs mlx-lm dense {row['speedup']:.2f}x "
            f"(bound {row['bytes_bound']:.2f}x; {reps} x {tokens} tokens, load {row['load']})")
        del references, variants
        _free()
    engine.apply(None)
    return rows


def ttft(engine, dense: nn.Module, lengths: tuple[int, ...], s: Settings,
         log: Callable[[str], None]) -> list[dict]:
    """Time to first token at the model's default density vs the dense model's (mlx-lm) prefill.

    Per prompt length, one row per selector: "predictor" (where the model has one):
    predictor + apply + pruned prefill; "activations" (training-free, every model): the
    dense scoring pass over the prompt, which also fills the KV cache (GRIFFIN, as the
    engine generates) + apply + the prompt's last token pruned. Before each pruned
    measurement the selection of another prompt is applied, so apply swaps what a new task
    would swap. Every prompt text is new, so nothing is cached.
    """
    density = engine.default_density
    selectors = [name for name in ("predictor", "activations") if name in engine.selectors]
    rows = []
    for n in lengths:
        first_token_seconds(dense, _ids(engine, n))  # warm-up
        other_text = prompt_text(engine, n, salt=10_000)[0]
        others = {name: engine.select(other_text, density, name) for name in selectors}
        parts = {name: {key: [] for key in ("select", "apply", "prefill", "dense", "swaps")} for name in selectors}
        for rep in range(s.ttft_reps + 1):
            text, ids = prompt_text(engine, n, salt=rep + 100 * n)
            for name in selectors:
                engine.apply(others[name])
                if name == "predictor":
                    start = time.perf_counter()
                    selection = engine.select(text, density, name)
                    t_select = time.perf_counter() - start
                    stats = engine.apply(selection)
                    t_prefill = first_token_seconds(engine.model, ids)
                else:  # what generate() runs: one dense pass scores the channels and fills the cache
                    cache, t_select = engine._griffin_prefill(engine.selectors[name], ids, density)
                    stats = engine.last_apply
                    t_prefill = first_token_seconds(engine.model, ids[-1:], cache)
                t_dense = first_token_seconds(dense, ids)
                if rep:  # the first is a warm-up
                    for key, v in zip(parts[name], (t_select, stats.seconds, t_prefill, t_dense, stats.swaps)):
                        parts[name][key].append(v)
        for name in selectors:
            med = {key: statistics.median(v) for key, v in parts[name].items()}
            total = med["select"] + med["apply"] + med["prefill"]
            rows.append({"tokens": len(ids), "density": density, "selector": name, **med, "total": total,
                         "ratio_dense": total / med["dense"], "select_over_dense": med["select"] / med["dense"],
                         "load": load_average()})
            log(f"  TTFT {len(ids)} tokens, {name}: select {med['select'] * 1e3:.1f} ms + apply "
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
    base = engine.select(prompt_text(engine, 32, salt=7)[0], engine.default_density)
    k = base.kept_counts[0]
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


def resident_memory(reset_peak: bool = False) -> tuple[int, int]:
    """(current, peak) resident set size of this process, bytes. reset_peak: on Linux, first
    reset the peak to the current size (/proc/self/clear_refs), so it measures from now
    (elsewhere the peak is the process's since it started)."""
    if reset_peak and Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")
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

    rss0 = resident_memory()[0]
    mx.reset_peak_memory()
    engine = ifprune_mlx.load(folder)
    after_load = mx.get_peak_memory()
    text, ids = prompt_text(engine, prompt_tokens, salt=1)
    engine.apply(engine.select(text, density))
    after_apply = mx.get_peak_memory()
    n = sum(1 for _ in engine.stream_responses(text, max_tokens=tokens, tokens=ids))
    peak = mx.get_peak_memory()
    rss = resident_memory()[1]
    weights = engine.weight_bytes()
    predictor = _own_bytes(engine.selectors["predictor"].predictor, engine.model) if engine.has_predictor else 0
    k = engine.mlps[0].k
    kv = bytes_per_token(engine, k, len(ids) + n)["kv"]
    return {"weights": weights, "predictor": predictor, "kv": kv, "density": density, "peak_load": after_load,
            "peak_apply": after_apply, "peak": peak, "rss": rss, "rss_start": rss0,
            "tokens": len(ids) + n, "ratio": (peak - kv) / (weights + predictor),
            "rss_ratio": (rss - rss0 - kv) / (weights + predictor)}


def memory(folder: Path, density: float, s: Settings) -> dict:
    """memory_probe() in a fresh interpreter (same environment, so the same BLAS)."""
    code = ("import json, sys; from ifprune_mlx.bench import memory_probe; "
            "print(json.dumps(memory_probe(*sys.argv[1:2], *map(float, sys.argv[2:3]), "
            "*map(int, sys.argv[3:]))))")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(density),
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
    import ifprune_mlx

    start = time.perf_counter()
    engine = ifprune_mlx.load(folder, cache_size=0)
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
    _free()
    result.reselect = reselect(engine, s, log)
    result.seconds = time.perf_counter() - start
    result.load.append(load_average())
    del engine
    _free()
    return result


def command_line(program: str, args: list[str]) -> str:
    """The shell command that runs `program args` as this process does (LD_PRELOAD included)."""
    preload = os.environ.get("LD_PRELOAD")
    return (f"LD_PRELOAD={preload} " if preload else "") + " ".join([program, *args])


def _bandwidth_without_openblas(s: Settings) -> Optional[dict]:
    """bandwidth() in a fresh process without the preloaded OpenBLAS (None if none is)."""
    if "openblas" not in os.environ.get("LD_PRELOAD", ""):
        return None
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    mb, _, d = s.bandwidth_probe
    args = f"{max(16, mb // 4)}, 2, {d}"
    code = f"import json; from ifprune_mlx.bench import bandwidth; print(json.dumps(bandwidth({args})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    from .resolve import resolve

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
    info["bandwidth_reference_blas"] = _bandwidth_without_openblas(settings)
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


# -- command ---------------------------------------------------------------------------

DEFAULT_WIDTHS = "512,1024,2048"


def parse_models(synthetic: str, bits: str, dtype: str) -> tuple[list[int], list[Optional[int]], list[str]]:
    """The synthetic widths, quantizations and float dtypes of `--synthetic 512,1024 --bits 0,4
    --dtype float32,bfloat16`; ValueError with a one-line message when they are not valid."""
    dtypes = [d.strip() for d in dtype.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise ValueError(f"--dtype takes {', '.join(DTYPES)} (comma-separated), got {dtype!r}")
    try:
        widths = [int(w) for w in synthetic.split(",") if w.strip()]
        bit_list = [None if part.strip().lower() in ("0", "none", "float", "") else int(part)
                    for part in bits.split(",")]
    except ValueError:
        raise ValueError(f"--synthetic takes widths like 512,1024 and --bits like 0,4; "
                         f"got {synthetic!r}, {bits!r}") from None
    if any(b not in (None, 4, 8) for b in bit_list):
        raise ValueError(f"--bits takes 0 (float), 4 or 8; got {bits!r}")
    return widths, bit_list, dtypes


def _summary(info: dict) -> list[str]:
    lines = []
    for r in info["results"]:
        lines += [f"{r['name']} ({r['quant']}, {r['weight_bytes'] / 1e6:.0f} MB): decode tok/s",
                  f"  {'density':>7} {'k':>6} {'in place':>9} {'mlx-lm':>9} {'same kern':>9} "
                  f"{'/mlx-lm':>8} {'/same':>7} {'speed-up':>9} {'bytes bound':>11}"]
        for d in r["decode"]:
            bound = bytes_bound(r, d)
            lines.append(f"  {d['density']:>7.2f} {d['k']:>6} {d['inplace_tps']:>9.1f} {d['small_tps']:>9.1f} "
                         f"{d['rows_tps']:>9.1f} {d['ratio_small']:>8.3f} {d['ratio_rows']:>7.3f} "
                         f"{(d['speedup'] or 0):>8.2f}x {(bound or 0):>10.2f}x")
        if r["memory"]:
            lines.append(f"  peak memory {r['memory']['ratio']:.3f}x the weights (+ KV cache)")
    for v in bound_violations(info):
        lines.append(f"above the bytes bound: {v['model']} at density {v['density']:.2f}, {v['figure']} "
                     f"{v['value']:.2f} > {v['bound']:.2f}")
    return lines


@friendly_errors
def bench(
    model: Optional[str] = typer.Argument(None, help="A model to benchmark: a .gguf file (measured in each --dtype and --bits), a bundle or model folder, a repo id, or 'default' (the default model). Without it: synthetic models only."),
    synthetic: Optional[str] = typer.Option(None, help=f"d_model of the synthetic random models, comma-separated (default: {DEFAULT_WIDTHS} without MODEL, none with it)."),
    dtype: str = typer.Option("float32", help="Float dtypes of the synthetic models and of a GGUF's conversions: float32, float16, bfloat16; comma-separated."),
    bits: str = typer.Option("0,4", help="Quantizations of the synthetic models and of a GGUF's conversions: 0 (float), 4, 8; comma-separated."),
    quick: bool = typer.Option(False, "--quick", help="A fast smoke run: tiny models, few tokens, one repetition."),
    decode_seconds: Optional[float] = typer.Option(None, help="Seconds of timed decode per density and model (default 20; fewer rounds when lower)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write every raw figure as JSON."),
    detail: int = typer.Option(1024, help="The synthetic width whose time to first token is measured at every prompt length."),
    resident: Optional[str] = typer.Option(None, "--resident", help="kept: measure resident mode against the full-memory engine instead (MODEL and a synthetic >= 2 GB model; ifprune_mlx/bench_resident.py, docs/RESIDENT.md)."),
):
    """Benchmark decode, time to first token, re-selection and memory; print the figures.

    docs/BENCHMARKS.md is written from such a run by examples/benchmark_report.py (`make bench`).
    """
    if resident is not None:
        from .bench_resident import bench_resident

        return bench_resident(model, resident, quick, json_path)
    if synthetic is None:
        synthetic = "" if model else DEFAULT_WIDTHS
    try:
        widths, bit_list, dtypes = parse_models(synthetic, bits, dtype)
    except ValueError as e:
        fail(str(e))
    shown = synthetic or "''"  # none: an empty list on the command line
    args = ([model] if model else []) + [f"--synthetic {shown}", f"--bits {bits}", f"--dtype {dtype}"]
    args += (["--quick"] if quick else []) + ([f"--decode-seconds {decode_seconds}"] if decode_seconds else [])
    args += [f"--json {json_path}"] if json_path else []
    info = run(models=[model] if model else [], widths=widths, bits=bit_list, dtypes=dtypes,
               settings=settings_for(quick, decode_seconds), detail=detail,
               command=command_line("ifprune bench", args), log=lambda msg: typer.echo(msg, err=True))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(info, indent=1, default=str))
    for line in _summary(info):
        typer.echo(line)


def settings_for(quick: bool, decode_seconds: Optional[float] = None) -> Settings:
    """The command's Settings: quick_run() or the default, with its decode budget if given."""
    s = Settings.quick_run() if quick else Settings()
    return replace(s, decode_budget=decode_seconds) if decode_seconds else s
