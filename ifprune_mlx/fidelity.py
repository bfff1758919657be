"""How close a pruned model stays to the dense one: KL of next-token distributions.

Used by the selector study (examples/selector_study.py) and the tests. The measure follows
GRIFFIN's setting: the prompt is prefilled by the dense model, then the selection is applied
and the continuation is scored pruned, so only the tokens generation would produce differ.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .selectors import Selection


def random_selection(d_ffn: int, n_layers: int, k: int, seed: int) -> Selection:
    """k channels per layer drawn uniformly at random (the baseline a selector must beat)."""
    rng = np.random.default_rng(seed)
    indices = [np.sort(rng.choice(d_ffn, k, replace=False)) for _ in range(n_layers)]
    return Selection(tuple(indices), d_ffn, source="random")


def next_token_kl(p_logits: mx.array, q_logits: mx.array) -> mx.array:
    """KL(p || q) in nats at every position, from two [..., vocab] arrays of logits."""
    log_p, log_q = _log_softmax(p_logits.astype(mx.float32)), _log_softmax(q_logits.astype(mx.float32))
    return mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)


def greedy_tokens(model, ids: Sequence[int], n: int, prompt_cache: list | None = None) -> list[int]:
    """The model's greedy continuation of `ids`: n tokens (mlx-lm's generate_step), extending
    `prompt_cache` when given."""
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(list(ids)), model, max_tokens=n, prompt_cache=prompt_cache)
    return [int(token) for token, _ in steps]


def prefill_dense(engine, prompt: Sequence[int]) -> list:
    """GRIFFIN's setting: all but the last token of `prompt` prefilled by the dense model.

    Returns the mlx-lm KV cache, evaluated, so the caller may apply a selection next (rows
    move in place) and feed the last token pruned.
    """
    engine.apply(None)
    cache = make_prompt_cache(engine.model)
    engine.model(mx.array([list(prompt[:-1])], dtype=mx.int32), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def kl_after_prefill(engine, prompt: Sequence[int], continuation: Sequence[int],
                     selection: Selection | None) -> float:
    """Mean KL(dense || pruned), in nats, of the next-token distributions at the prompt's last
    position and over `continuation`, the prompt[:-1] prefilled dense.

    Pins `selection` on the engine (call engine.apply("auto") to unpin).
    """
    prompt, continuation = list(prompt), list(continuation)
    if len(prompt) < 2:
        raise ValueError("the prompt needs at least 2 tokens (all but the last are prefilled dense)")
    engine.apply(None)
    dense = engine.model(mx.array([prompt + continuation], dtype=mx.int32))[0, len(prompt) - 1:]
    mx.eval(dense)  # before the rows move
    cache = prefill_dense(engine, prompt)
    engine.apply(selection)
    pruned = engine.model(mx.array([prompt[-1:] + continuation], dtype=mx.int32), cache=cache)[0]
    return float(mx.mean(next_token_kl(dense, pruned)).item())


def _log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
