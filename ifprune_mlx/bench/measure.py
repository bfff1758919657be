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
turns a run into docs/BENCHMARKS.md. The parts: settings.py (how much), machine.py
(probes), this module (the models and the measurements), run.py (a whole run, the checks)
and cli.py (`ifprune bench`).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..engine import load
from ..fidelity import compact_model
from ..prune import ApplyStats
from ..selectors import Selection
from ..testing import make_bundle, model_config
from .machine import best_seconds, free_buffers, load_average, resident_memory
from .settings import Settings

_TEXT = ("Write a Python function that reverses a list. Translate the sentence into French, "
         "please. What is the sum of 12 and 30? Sort these numbers: 5 3 9 1. ")


# -- models ----------------------------------------------------------------------------

def synthetic_config(d_model: int, layers: int = 8, vocab: int = 32000) -> dict:
    """A llama config of width d_model: d_ffn = 4 * d_model (multiple of 256), head_dim 64."""
    heads = max(1, d_model // 64)
    return model_config("llama", hidden_size=d_model, num_hidden_layers=layers,
                        intermediate_size=-(-4 * d_model // 256) * 256, vocab_size=vocab,
                        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                        max_position_embeddings=4096)


def synthetic_bundle(folder: Path, d_model: int, s: Settings, *, bits: int | None = None,
                     dtype: str = "float32") -> Path:
    """A bundle of random weights of width d_model (synthetic_config) with a random predictor
    whose backbone is d_model / 4 wide (testing.make_bundle)."""
    config = synthetic_config(d_model, s.layers, s.vocab)
    out = make_bundle(folder, config, quantize_bits=bits, dtype=dtype,
                      predictor_width=max(32, d_model // 4), force=True)
    free_buffers()
    return out


def array_bytes(tree) -> int:
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
    ffn = sum(array_bytes(m.parameters()) for m in engine.mlps) * k / engine.d_ffn
    embed = array_bytes(engine.model.model.embed_tokens.parameters())
    rest = array_bytes(engine.model.parameters()) - ffn * engine.d_ffn / k - embed
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    itemsize = engine.model.model.norm.weight.dtype.size
    kv = 2 * engine.n_layers * c["num_key_value_heads"] * head_dim * context * itemsize
    tied = engine.model.args.tie_word_embeddings
    weights = ffn + rest + (embed if tied else embed / c["vocab_size"])
    return {"weights": weights, "kv": kv, "total": weights + kv}


# -- measurements ----------------------------------------------------------------------

def prompt_ids(engine, n: int) -> list[int]:
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
    prompt = prompt_ids(engine, s.decode_prompt)
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
        free_buffers()
    engine.apply(None)
    return rows


def ttft(engine, dense: nn.Module, lengths: tuple[int, ...], s: Settings,
         log: Callable[[str], None]) -> list[dict]:
    """Time to first token at the model's default density vs the dense model's (mlx-lm) prefill.

    Per prompt length, one row per selector: "predictor" (where the model has one):
    predictor + apply + pruned prefill, or with the engine's prefill "dense", predictor + apply
    + a dense pass over the prompt ("select" counts both) + its last token pruned;
    "activations" (training-free, every model): the dense scoring pass over the prompt, which
    also fills the KV cache (GRIFFIN, as the engine generates) + apply + the prompt's last
    token pruned. Before each pruned
    measurement the selection of another prompt is applied, so apply swaps what a new task
    would swap. Every prompt text is new, so nothing is cached.
    """
    density = engine.default_density
    selectors = [name for name in ("predictor", "activations") if name in engine.selectors]
    rows = []
    for n in lengths:
        first_token_seconds(dense, prompt_ids(engine, n))  # warm-up
        other_text = prompt_text(engine, n, salt=10_000)[0]
        others = {name: engine.select(other_text, density, name) for name in selectors}
        parts = {name: {key: [] for key in ("select", "apply", "prefill", "dense", "swaps")} for name in selectors}
        for rep in range(s.ttft_reps + 1):
            text, ids = prompt_text(engine, n, salt=rep + 100 * n)
            for name in selectors:
                engine.apply(others[name])
                if not engine.prefills_dense(name):
                    start = time.perf_counter()
                    selection = engine.select(text, density, name)
                    t_select = time.perf_counter() - start
                    stats = engine.apply(selection)
                    t_prefill = first_token_seconds(engine.model, ids)
                else:  # what generate() runs: a dense prefill (the training-free selector's also scores)
                    before = engine.last_apply
                    cache, t_select = engine.prefill_dense(text, ids, density, name)
                    stats = engine.last_apply if engine.last_apply is not before else ApplyStats([0] * engine.n_layers)
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


def changed_selection(base, fraction: float, d_ffn: int, rng: np.random.Generator):
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
    rng = np.random.default_rng(0)
    base = engine.select(prompt_text(engine, 32, salt=7)[0], engine.default_density)
    k = base.kept_counts[0]
    rows = []
    for fraction in s.changed:
        target = Selection.from_indices(changed_selection(base, fraction, engine.d_ffn, rng), engine.d_ffn,
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

    copy_s = best_seconds(copies, s.reps)
    for row in rows:
        row["compact_copy_seconds"] = copy_s
        log(f"  reselect {row['fraction']:.0%} changed: {row['seconds'] * 1e3:.1f} ms, "
            f"{row['swaps']} row swaps (compact copies: {copy_s * 1e3:.1f} ms)")
    engine.apply(None)
    free_buffers()
    return rows


def memory_probe(folder: str, density: float, prompt_tokens: int, tokens: int) -> dict:
    """In a fresh process: load + select + apply + generate; peak memory vs weight bytes."""
    rss0 = resident_memory()[0]
    mx.reset_peak_memory()
    engine = load(folder)
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
    code = ("import json, sys; from ifprune_mlx.bench.measure import memory_probe; "
            "print(json.dumps(memory_probe(*sys.argv[1:2], *map(float, sys.argv[2:3]), "
            "*map(int, sys.argv[3:]))))")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(density),
                          str(s.memory_prompt), str(s.memory_tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
