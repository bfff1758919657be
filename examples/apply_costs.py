"""What an apply costs: the canonical (deterministic) row order against the order that
follows history, and bfloat16 rows moved through an integer view against MLX scatters.

    python examples/apply_costs.py                  # a random d512 model, 8 layers x 2048 channels
    python examples/apply_costs.py --model default  # SmolLM2, or any model name `ifprune chat` takes

Each figure is the median of --repeat re-selections of random masks at --density (rows
moved per apply, and milliseconds). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

import ifprune_mlx.prune as prune
from ifprune_mlx.models import build_model
from ifprune_mlx.testing import model_config


def random_mlps(dtype, d_model=512, d_ffn=2048, layers=8):
    model = build_model(model_config(hidden_size=d_model, intermediate_size=d_ffn, num_hidden_layers=layers))
    for layer in model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            proj.weight = mx.random.normal(proj.weight.shape).astype(dtype)
    mx.eval(model.parameters())
    return [layer.mlp for layer in model.layers]


def reselections(mlps, density: float, repeat: int, canonical: bool) -> tuple[float, float]:
    """(median rows swapped, median ms) of applying `repeat` random masks one after another."""
    rng = np.random.default_rng(0)
    d_ffn = mlps[0].d_ffn
    k = int(round(density * d_ffn))
    rows, times = [], []
    for _ in range(repeat):
        keep = [np.sort(rng.choice(d_ffn, k, replace=False)) for _ in mlps]
        start = time.perf_counter()
        stats = prune.apply_selection(mlps, keep, canonical=canonical)
        times.append(1000 * (time.perf_counter() - start))
        rows.append(stats.swaps)
    return statistics.median(rows), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model name as `ifprune chat` takes it, or `default` for the default "
                                        "model (without --model: a random model)")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if args.model:
        from ifprune_mlx.resolve import resolve
        import ifprune_mlx as ifp

        mlps, name = ifp.load(resolve(None if args.model == "default" else args.model).path).mlps, args.model
    else:
        mlps, name = random_mlps(mx.float32), "random d512, 8 x 2048, float32"
    print(f"{name}, density {args.density}, medians of {args.repeat} re-selections\n")
    print("| row order | rows swapped | ms |\n|---|---:|---:|")
    for label, canonical in (("canonical (deterministic, the default)", True), ("follows history", False)):
        rows, ms = reselections(mlps, args.density, args.repeat, canonical)
        print(f"| {label} | {rows:.0f} | {ms:.1f} |")
    print("\n| dtype | rows move through | ms |\n|---|---|---:|")
    real = prune._host_view
    for dtype in (mx.float32, mx.bfloat16):
        for label, view in (("a NumPy view of the buffer", real), ("MLX gather + scatter", lambda w: None)):
            prune._host_view = view
            try:
                _, ms = reselections(random_mlps(dtype), args.density, args.repeat, canonical=False)
            finally:
                prune._host_view = real
            print(f"| {dtype} | {label} | {ms:.1f} |")


if __name__ == "__main__":
    main()
