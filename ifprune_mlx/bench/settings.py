"""How much the benchmark measures: its densities, prompt lengths, budgets (Settings)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

DENSITIES = (1.0, 0.5, 0.33, 0.25)
REAL_DENSITIES = (1.0, 0.7, 0.5, 0.3)  # real models have less slack than random ones
DEFAULT_MODEL = "default"  # `ifprune bench default`: the default model (resolve's, predictor included)
CHANGED = (0.0, 0.1, 0.5, 1.0)
# A speed-up may exceed its bytes-per-token bound by this factor before it is flagged: decode
# is memory-bound, so more than that means the two timings saw different machine load.
BOUND_SLACK = 1.10
DTYPES = ("float32", "float16", "bfloat16")


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


def settings_for(quick: bool, decode_seconds: Optional[float] = None) -> Settings:
    """The command's Settings: quick_run() or the default, with its decode budget if given."""
    s = Settings.quick_run() if quick else Settings()
    return replace(s, decode_budget=decode_seconds) if decode_seconds else s
