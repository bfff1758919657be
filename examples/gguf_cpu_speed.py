"""Why a GGUF named to a command becomes float32 on MLX's CPU backend: SmolLM2-135M-Instruct
converted twice from its Q4_1 GGUF, kept quantized and dequantized to float32, timed the same
way in one run (a 60-token forward, as prefill and the training-free selector's scoring pass
run; one decode step). Medians of --repeat runs.

    python examples/gguf_cpu_speed.py [--repeat 5]

Preload OpenBLAS on Linux for the float32 figures (`make` targets and the `ifprune` command
do): LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import ifprune_mlx as ifp
from converters.gguf import convert_gguf
from ifprune_mlx.blas import active_blas
from ifprune_mlx.resolve import default_gguf


def timings(folder: Path, repeat: int) -> tuple[float, float]:
    """(seconds of a 60-token forward, seconds of one decode step after it), medians."""
    engine = ifp.load(folder)
    ids = mx.array([list(range(100, 160))])
    mx.eval(engine.model(ids))  # warm-up
    forward, decode = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(engine.model(ids))
        forward.append(time.perf_counter() - start)
        cache = make_prompt_cache(engine.model)
        mx.eval(engine.model(ids, cache=cache))
        start = time.perf_counter()
        for token in range(8):
            mx.eval(engine.model(mx.array([[token + 5]]), cache=cache))
        decode.append((time.perf_counter() - start) / 8)
    return statistics.median(forward), statistics.median(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    gguf = default_gguf()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, dequantize in (("Q4_1 kept (4-bit rows, float32 down_proj)", False), ("float32", True)):
            out = Path(tmp) / name.split()[0]
            convert_gguf(gguf, out, dequantize=dequantize)
            rows.append((name, *timings(out, args.repeat)))
    print(f"device {mx.default_device()}, BLAS: {active_blas()}")
    print("| weights | 60-token forward (s) | decode step (s) |\n|---|---:|---:|")
    for name, forward, decode in rows:
        print(f"| {name} | {forward:.3f} | {decode:.3f} |")
    print(f"quantized / float32: forward {rows[0][1] / rows[1][1]:.1f}x, decode {rows[0][2] / rows[1][2]:.1f}x")


if __name__ == "__main__":
    main()
