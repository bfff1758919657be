"""mlx-lm's BatchGenerator alone on the default model: ms per decode step at 1, 8 and 16
sequences, under one mask (the serve-load system prompt's), against one stream_generate.

    python -m examples.batch_steps      # docs/SERVER.md compares the server's steps with these

"same prompt": every sequence has serve-load's first prompt (equal lengths, no padding);
"serve-load's prompts": its 8 or 16 questions (lengths differ: the batch's KV cache is
left-padded, as in the server). CPU ms per step is this process's CPU time (all threads) per
step: on a shared machine the wall time measures the neighbours too.

On Linux CPU preload OpenBLAS (see the Makefile's WITH_BLAS).
"""

from __future__ import annotations

import os
import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, stream_generate

from examples.serve_load import QUESTIONS, SYSTEMS
from ifprune_mlx.opener import open_model


def steps(engine, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """Wall and CPU seconds per decode step of one BatchGenerator over `prompts` (from the
    second step on: the prefill is done by then)."""
    generator = BatchGenerator(engine.model, stop_tokens=[], completion_batch_size=len(prompts),
                               prefill_batch_size=len(prompts))
    generator.insert(prompts, [tokens] * len(prompts))
    n, start, cpu = 0, None, None
    while generator.next_generated():
        n += 1
        if n == 2:
            start, cpu = time.perf_counter(), time.process_time()
    wall, cpu = (time.perf_counter() - start) / (n - 2), (time.process_time() - cpu) / (n - 2)
    generator.close()
    return wall, cpu


def main(tokens: int = 64) -> None:
    load = os.getloadavg()
    engine = open_model()
    engine.apply(engine.select(SYSTEMS[0]))
    prompts = [engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEMS[0]}, {"role": "user", "content": q}], add_generation_prompt=True)
        for q in QUESTIONS]
    start, n = time.perf_counter(), 0
    for n, _ in enumerate(stream_generate(engine.model, engine.tokenizer, mx.array(prompts[0]), max_tokens=tokens), 1):
        pass
    print(f"stream_generate: {(time.perf_counter() - start) / n * 1000:.1f} ms per token (prefill included)")
    for name, batch in [("same prompt", lambda size: [prompts[0]] * size),
                        ("serve-load's prompts", lambda size: prompts[:size])]:
        for size in (1, 8, 16):
            if size == 1 and name != "same prompt":
                continue
            wall, cpu = steps(engine, batch(size), tokens)
            print(f"BatchGenerator, {size} sequences, {name}: {wall * 1000:.1f} ms per step, {size / wall:.0f} tok/s, "
                  f"{cpu * 1000:.1f} CPU ms per step")
    after = os.getloadavg()
    print(f"load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, after {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f}")


if __name__ == "__main__":
    main()
