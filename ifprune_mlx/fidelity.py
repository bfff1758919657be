"""References for a pruned model, and how close it stays to them.

KL of next-token distributions to the dense model follows GRIFFIN's setting: the prompt is
prefilled by the dense model, then the selection is applied and the continuation is scored
pruned, so only the tokens generation would produce differ. compact_model() builds the model
that is physically as small as a selection (compact copies of the kept rows). Used by verify,
the benchmark, the selector study and the tests.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

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
    return fidelity_after_prefill(engine, prompt, continuation, [selection])[0][0]


def fidelity_after_prefill(engine, prompt: Sequence[int], continuation: Sequence[int],
                           selections: Sequence[Selection | None]) -> list[tuple[float, float]]:
    """For each selection: (mean KL(dense || pruned) in nats, share of `continuation` tokens
    that are the pruned model's top-1 choice), in GRIFFIN's setting (see kl_after_prefill).

    One dense prefill serves the dense reference and every selection: the KV cache is
    trimmed back to it after each.
    Pins the last selection on the engine (call engine.apply("auto") to unpin).
    """
    prompt, continuation = list(prompt), list(continuation)
    if len(prompt) < 2:
        raise ValueError("the prompt needs at least 2 tokens (all but the last are prefilled dense)")
    cache = prefill_dense(engine, prompt)
    fed = prompt[-1:] + continuation
    dense = engine.model(mx.array([fed], dtype=mx.int32), cache=cache)[0]
    mx.eval(dense)  # before the rows move
    trim_prompt_cache(cache, len(fed))
    targets = mx.array(continuation, dtype=mx.int32)
    results = []
    for selection in selections:
        engine.apply(selection)
        pruned = engine.model(mx.array([fed], dtype=mx.int32), cache=cache)[0]
        kl = mx.mean(next_token_kl(dense, pruned))
        agree = mx.mean(mx.argmax(pruned[: len(continuation)], axis=-1) == targets)
        results.append((float(kl.item()), float(agree.item()) if continuation else 1.0))
        trim_prompt_cache(cache, len(fed))
    return results


def compact_model(engine, k: int | None = None, *, rows: bool = False) -> nn.Module:
    """A model holding compact copies of the engine's FFN rows: what is physically that small.

    k=None: every channel, in original order (the dense model); k: the first k positions of
    every layer, i.e. the selection applied now (intermediate_size = k).
    rows=False: plain mlx-lm (nn.Linear FFN, down_proj [d_model, k]), the layout mlx-lm runs;
    rows=True: PrunableMLPs of width k in the engine's row layout, so the same kernels run.
    Attention, norms and embeddings are shared with the engine (they are never written). Its
    config is the engine's as mlx-lm must be given it (models.normalize_config).
    """
    from .models import build_model, load_weights, normalize_config, quantize_like

    q = engine.config.get("quantization")
    width = engine.d_ffn if k is None else k
    weights = {n: v for n, v in nn.utils.tree_flatten(engine.model.parameters()) if ".mlp." not in n}
    for i, mlp in enumerate(engine.mlps):
        order = np.argsort(mlp.perm) if k is None else np.arange(k)
        idx = mx.array(order.astype(np.int32))
        prefix = f"model.layers.{i}.mlp"
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(mlp, name)
            for part in layer.row_arrays():
                weights[f"{prefix}.{name}.{part}"] = layer[part][idx]  # a gather: a new buffer
        down = mlp.down_proj
        if not rows and "scales" in down:
            dense = mx.dequantize(down.weight[idx], down.scales[idx], down.biases[idx],
                                  group_size=down.group_size, bits=down.bits)
            w, s, b = mx.quantize(mx.contiguous(dense.T), group_size=q["group_size"], bits=q["bits"])
            weights.update({f"{prefix}.down_proj.weight": w, f"{prefix}.down_proj.scales": s,
                            f"{prefix}.down_proj.biases": b})
        elif not rows:
            weights[f"{prefix}.down_proj.weight"] = mx.contiguous(down.weight[idx].T)
        if "bias" in down:
            weights[f"{prefix}.down_proj.bias"] = down.bias
        mx.eval([v for n, v in weights.items() if n.startswith(prefix)])
    # mlx-lm reads what normalize_config makes explicit (e.g. transformers 5's nested rope_theta)
    config = {key: v for key, v in normalize_config(engine.config, weights).items()
              if key not in ("ifpruning", "quantization", "quantization_config")}
    model = build_model(dict(config, intermediate_size=width), prunable=rows)
    if q:
        quantize_like(model, q, weights, blas_prefill=rows)
    load_weights(model, weights, "compact copy")
    return model


def _log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def masks_for(engine, selections: Sequence[Selection | None]) -> list[mx.array]:
    """Per layer, a [len(selections), 1, d_ffn] 0/1 mask in the layer's position order: row b
    keeps the channels selections[b] keeps (None: all). prune.masking's input."""
    local = [None if s is None else s.indices if engine.sharding is None else engine.sharding.local(s.indices)
             for s in selections]  # under mlx.distributed, this rank's rows
    masks = []
    for layer, mlp in enumerate(engine.mlps):
        rows = np.ones((len(selections), 1, mlp.d_ffn), dtype=np.float32)
        for b, indices in enumerate(local):
            if indices is not None:
                kept = np.zeros(mlp.d_ffn, dtype=np.float32)
                kept[indices[layer]] = 1.0
                rows[b, 0] = kept[mlp.perm]
        masks.append(mx.array(rows))
    return masks


def tile_cache(cache: list, batch: int) -> bool:
    """Repeat a one-sequence KV cache `batch` times in place (every row then extends the same
    prefix); False if a cache layer is not mlx-lm's plain KVCache (nothing is changed then)."""
    from mlx_lm.models.cache import KVCache

    if not all(type(c) is KVCache for c in cache):
        return False
    for c in cache:
        keys, values = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
        c.keys, c.values = mx.repeat(keys, batch, axis=0), mx.repeat(values, batch, axis=0)
    return True


def batched_fidelity(engine, prompt: Sequence[int], continuation: Sequence[int],
                     selections: Sequence[Selection], cache: list | None = None,
                     observe=None) -> list[tuple[float, float]]:
    """For every selection: (mean KL(dense || pruned) in nats over the positions that predict
    the continuation's tokens, share of them that are the pruned model's top-1 choice), the
    prompt[:-1] prefilled dense, all from ONE batched forward pass.

    Row 0 of the batch runs dense, row b + 1 with selections[b]'s channels masked in
    (prune.masking: the pruned model up to float rounding; no row moves), all extending the
    same dense prefill of prompt[:-1] (`cache`, filled here when None; it is consumed).
    observe(h), if given, sees every layer's [batch, T, d_ffn] activations before masking.
    The engine must be dense (engine.apply(None)). Many rows per product is what CPU BLAS
    (and the dequantize-then-BLAS path of quantized rows) runs fast.
    """
    from .prune import masking, observing

    prompt, continuation = list(prompt), list(continuation)
    if len(prompt) < 2:
        raise ValueError("the prompt needs at least 2 tokens (all but the last are prefilled dense)")
    batch = 1 + len(selections)
    fed = prompt[-1:] + continuation[:-1]  # position i predicts continuation[i]
    if cache is None:
        cache = prefill_dense(engine, prompt)
    if not tile_cache(cache, batch):  # another cache type: prefill every row
        cache = make_prompt_cache(engine.model)
        engine.model(mx.array([prompt[:-1]] * batch, dtype=mx.int32), cache=cache)
    with masking(engine.mlps, masks_for(engine, [None, *selections])), \
            (observing(engine.mlps, observe) if observe else nullcontext()):
        logits = engine.model(mx.array([fed] * batch, dtype=mx.int32), cache=cache)
    if not selections:  # the dense pass alone (what observe sees)
        mx.eval(logits)
        return []
    dense, pruned = logits[:1], logits[1:]
    kl = mx.mean(next_token_kl(dense, pruned), axis=-1)
    targets = mx.array(continuation, dtype=mx.int32)
    agree = mx.mean(mx.argmax(pruned, axis=-1) == targets, axis=-1) if continuation else mx.ones(len(selections))
    mx.eval(kl, agree)
    agreement = agree.tolist()
    return list(zip(kl.tolist(), agreement))

