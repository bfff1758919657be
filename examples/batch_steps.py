"""mlx-lm's BatchGenerator alone on the default model: ms per decode step at 1, 8 and 16
sequences, under one mask (the serve-load system prompt's), against one stream_generate.

    python -m examples.batch_steps      # docs/SERVER.md compares the server's steps with these

On Linux CPU preload OpenBLAS (see the Makefile's WITH_BLAS).
"""

from __future__ import annotations

import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, stream_generate

from examples.serve_load import QUESTIONS, SYSTEMS
from ifprune_mlx.opener import open_model


def main(tokens: int = 64) -> None:
    engine = open_model()
    engine.apply(engine.select(SYSTEMS[0]))
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEMS[0]}, {"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    start, n = time.perf_counter(), 0
    for n, _ in enumerate(stream_generate(engine.model, engine.tokenizer, mx.array(prompt), max_tokens=tokens), 1):
        pass
    print(f"stream_generate: {(time.perf_counter() - start) / n * 1000:.1f} ms per token (prefill included)")
    for size in (1, 8, 16):
        generator = BatchGenerator(engine.model, stop_tokens=[], completion_batch_size=size, prefill_batch_size=size)
        generator.insert([prompt] * size, [tokens] * size)
        steps, start = 0, None
        while generator.next_generated():
            steps += 1
            if steps == 2:  # from the second step: the prefill is done
                start = time.perf_counter()
        seconds = (time.perf_counter() - start) / (steps - 2)
        generator.close()
        print(f"BatchGenerator, {size} sequences: {seconds * 1000:.1f} ms per step, {size / seconds:.0f} tok/s")


if __name__ == "__main__":
    main()
