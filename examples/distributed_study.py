"""Global vs balanced top-k under sharding: what balancing costs in fidelity, what it buys in speed.

    python examples/distributed_study.py fidelity [MODEL]            # one process
    mlx.launch --backend ring -n 2 -- python examples/distributed_study.py speed [MODEL]
    mlx.launch --backend ring -n 2 -- python examples/distributed_study.py latency

fidelity: for the calibration prompts (ifprune_mlx.calibrate.PROMPTS), the dense model's
greedy answer is the reference; at each density the prompt's scores give the global top-k
(what one process keeps) and the balanced top-k/N for N = 2 and 4 (ifprune_mlx.distributed),
scored teacher-forced in generation's setting (fidelity.fidelity_after_prefill): mean
next-token KL to the dense model and top-1 agreement. It also reports how uneven the global
top-k is across N contiguous shards: the largest shard's kept count over the mean (a sharded
decode step waits for the slowest rank).

speed: under mlx.launch, loads MODEL sharded twice (split global, then balanced) and decodes
the same prompts with each, printing rank 0's decode tokens/s; run it without mlx.launch for
the single-process figures. latency: under mlx.launch, the time of one all_sum of a
SmolLM2-sized (576 floats) vector, what each layer adds to a decode step. MODEL defaults to the
plain SmolLM2-135M-Instruct GGUF (training-free selector; the default model adds a trained predictor).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import ifprune_mlx
from ifprune_mlx.calibrate import ANSWER_TOKENS, PROMPTS
from ifprune_mlx.distributed import balanced_top_k, world
from ifprune_mlx.fidelity import fidelity_after_prefill, greedy_tokens
from ifprune_mlx.resolve import default_gguf, resolve
from ifprune_mlx.selectors import Selection, top_k

DENSITIES = (0.3, 0.5, 0.7)
RANKS = (2, 4)


def bounds(d_ffn: int, n: int) -> np.ndarray:
    return np.array([d_ffn * r // n for r in range(n + 1)])


def fidelity(model: str | None, prompts: int) -> None:
    path = resolve(model or default_gguf()).path  # the plain SmolLM2 GGUF: converted once into the cache
    engine = ifprune_mlx.load(path)
    selector = engine.selector
    names = ["global"] + [f"balanced N={n}" for n in RANKS]
    kl = np.zeros((len(DENSITIES), len(names), prompts))
    agree = np.zeros_like(kl)
    imbalance = np.zeros((len(DENSITIES), len(RANKS), prompts))
    for p, prompt in enumerate(PROMPTS[:prompts]):
        ids = engine.prompt_tokens(prompt)
        engine.apply(None)
        answer = greedy_tokens(engine.model, ids, ANSWER_TOKENS)
        scores = selector.scores(selector.inputs(prompt))
        for d, density in enumerate(DENSITIES):
            k = engine.kept_count(density)
            masks = [top_k(scores, k)] + [balanced_top_k(scores, k, bounds(engine.d_ffn, n)) for n in RANKS]
            selections = [Selection(tuple(m), engine.d_ffn) for m in masks]
            for s, (value, share) in enumerate(fidelity_after_prefill(engine, ids, answer, selections)):
                kl[d, s, p], agree[d, s, p] = value, share
            for r, n in enumerate(RANKS):
                counts = np.stack([np.diff(np.searchsorted(ids_, bounds(engine.d_ffn, n))) for ids_ in masks[0]])
                imbalance[d, r, p] = (counts.max(axis=1) / (k / n)).mean()
        print(f"  prompt {p + 1}/{prompts}", file=sys.stderr)
    engine.apply("auto")
    print(f"{path.name}, selector {selector.name}, {prompts} prompts x {ANSWER_TOKENS} answer tokens\n")
    print("| density | kept / layer | " + " | ".join(f"{n}: KL, top-1" for n in names)
          + " | " + " | ".join(f"global: slowest shard N={n}" for n in RANKS) + " |")
    print("|---" * (2 + len(names) + len(RANKS)) + "|")
    for d, density in enumerate(DENSITIES):
        cells = [f"{kl[d, s].mean():.4f}, {agree[d, s].mean():.3f}" for s in range(len(names))]
        cells += [f"{imbalance[d, r].mean():.3f}x" for r in range(len(RANKS))]
        print(f"| {density} | {engine.kept_count(density)} | " + " | ".join(cells) + " |")


def speed(model: str | None, tokens: int, prompts: int) -> None:
    group = world()
    rank = group.rank() if group else 0
    splits = ("global", "balanced") if group else ("one process",)
    path = resolve(model or default_gguf()).path  # converted once before (the fidelity run does)
    rows = []
    for split in splits:
        engine = ifprune_mlx.load(path, group=group, split=split) if group else ifprune_mlx.load(path)
        for mode in ("dense", "pruned 0.5"):
            engine.apply(None if mode == "dense" else "auto")
            rates = []
            for prompt in PROMPTS[:prompts]:
                last = None
                for last in engine.stream_responses(prompt, max_tokens=tokens, density=None if mode == "dense" else 0.5):
                    pass
                rates.append(last.generation_tps)
            rows.append((split, mode, float(np.median(rates))))
        del engine
    if rank == 0:
        size = group.size() if group else 1
        print(f"{path.name}, {size} rank(s), {prompts} prompts x {tokens} tokens, median decode tok/s (rank 0)")
        print("| split | mask | decode tok/s |\n|---|---|---|")
        for split, mode, rate in rows:
            print(f"| {split} | {mode} | {rate:.1f} |")


def latency(width: int = 576, repeats: int = 300) -> None:
    import mlx.core as mx

    group = world()
    if group is None:
        raise SystemExit("latency measures all_sum between ranks: run it under mlx.launch")
    x = mx.ones((1, 1, width))
    mx.eval(mx.distributed.all_sum(x, group=group))  # connect, warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        times.append(time.perf_counter() - start)
    if group.rank() == 0:
        print(f"all_sum of {width} float32 over {group.size()} ranks: median {np.median(times) * 1e6:.0f} us, "
              f"p90 {np.percentile(times, 90) * 1e6:.0f} us ({repeats} calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("fidelity", "speed", "latency"))
    parser.add_argument("model", nargs="?")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8, help="how many of the calibration prompts")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.what == "fidelity":
        fidelity(args.model, args.prompts)
    elif args.what == "speed":
        speed(args.model, args.tokens, args.prompts)
    else:
        latency()
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
