"""Affine-quantized products on the CPU: which kernel runs them.

MLX's CPU quantized_matmul has no BLAS path: its cost grows with every row (token, batch
sequence) it multiplies, so from a few rows on, dequantizing the weights and multiplying
through BLAS is several times faster (dequantized_matmul; crossover measured on MLX 0.32 with
OpenBLAS: 4-8 rows). One row (decode of one sequence) keeps quantized_matmul.

A run of many passes over the same weights (calibration: a batched decode, then one batched
pass per prompt) spends much of its time dequantizing the same weights again at every pass.
Inside float_copies(model) every quantized layer of the model that fits the memory allowance
multiplies by a float copy of its weights made once on entry: the same values
dequantized_matmul computes with, so the results agree up to float rounding.
On other devices (Metal) quantized_matmul is the fast path and none of this applies.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

# Quantized products on the CPU: inputs of at least this many rows (tokens x sequences) are
# multiplied by dequantized weights through BLAS, in blocks of at most this many bytes of floats.
DEQUANTIZE_ROWS = 8
DEQUANTIZE_BLOCK_BYTES = 8 * 2**20
# float_copies(): at most this many bytes of float copies (SmolLM2-135M in float32: 0.54 GB).
FLOAT_COPY_BYTES = 2 * 2**30

_float_copies: dict[int, tuple[mx.array, mx.array]] = {}  # id(weight) -> (weight, its float copy)


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def many_rows_on_cpu(x: mx.array) -> bool:
    """Whether x [..., d] has enough rows that, on the CPU, dequantizing the weights and
    multiplying through BLAS beats quantized_matmul (MLX's CPU kernel has no BLAS path)."""
    return x.size >= DEQUANTIZE_ROWS * x.shape[-1] and on_cpu()


def dequantized_matmul(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, k: int, *,
                       group_size: int, bits: int, channel_in: bool) -> mx.array:
    """What quantized_matmul computes with the first k rows of affine-quantized [rows, d]
    weights (channel_in=False: x @ W[:k].T; True: x @ W[:k]), from float rows dequantized a
    block at a time, so the float copy stays below DEQUANTIZE_BLOCK_BYTES.

    An order of magnitude faster than MLX's CPU quantized_matmul over prompts of tens of
    tokens (prefill, the training-free selector's scoring pass); slower for one token (decode).
    """
    d = weight.shape[1] * 32 // bits
    block = max(group_size, DEQUANTIZE_BLOCK_BYTES // (4 * d))
    parts = []
    for start in range(0, k, block):
        end = min(k, start + block)
        w = mx.dequantize(weight[start:end], scales[start:end], biases[start:end],
                          group_size=group_size, bits=bits).astype(x.dtype)
        parts.append(x[..., start:end] @ w if channel_in else x @ w.T)
    if channel_in:  # the rows are the product's inputs: the blocks' products add up
        return functools.reduce(mx.add, parts)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def quantized_product(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, k: int, *,
                      group_size: int, bits: int, channel_in: bool) -> mx.array:
    """x @ W[:k].T (channel_in: x @ W[:k]) for affine-quantized rows, by the fastest kernel
    here: the weight's float copy inside float_copies(), dequantized_matmul over many rows on
    the CPU, else quantized_matmul."""
    copy = _float_copies.get(id(weight))
    if copy is not None and copy[0] is weight:
        w = copy[1] if k == copy[1].shape[0] else copy[1][:k]
        w = w.astype(x.dtype)  # a no-op in the usual case: copies are in the scales' dtype
        return x @ w if channel_in else x @ w.T
    if many_rows_on_cpu(x):
        return dequantized_matmul(x, weight, scales, biases, k, group_size=group_size, bits=bits,
                                  channel_in=channel_in)
    if k != weight.shape[0]:
        weight, scales, biases = weight[:k], scales[:k], biases[:k]
    return mx.quantized_matmul(x, weight, scales, biases, transpose=not channel_in, group_size=group_size,
                               bits=bits)


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The model's affine-quantized layers that multiply through quantized_product."""
    return [m for _, m in model.named_modules()
            if "scales" in m and getattr(m, "mode", "affine") == "affine" and hasattr(m, "uses_float_copies")]


@contextmanager
def float_copies(model: nn.Module, max_bytes: int | None = None) -> Iterator[int]:
    """Inside the block, on the CPU, the model's quantized layers multiply by float copies of
    their weights made once on entry (in model order, while the copies stay within max_bytes,
    default FLOAT_COPY_BYTES); the block gets the bytes copied. Rows that move inside the block
    (prune's row swaps) drop their layer's copy. Nothing is copied on other devices."""
    limit = FLOAT_COPY_BYTES if max_bytes is None else max_bytes
    made: list[int] = []
    total = 0
    try:
        for layer in _quantized_layers(model) if on_cpu() else []:
            rows, packed = layer.weight.shape
            size = rows * packed * 32 // layer.bits * layer.scales.dtype.size
            if total + size > limit:
                break
            copy = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size,
                                 bits=layer.bits)
            mx.eval(copy)
            _float_copies[id(layer.weight)] = (layer.weight, copy)
            made.append(id(layer.weight))
            total += size
        yield total
    finally:
        for key in made:
            _float_copies.pop(key, None)


def forget_float_copy(weight: mx.array) -> None:
    """Drop weight's float copy (its rows are about to move)."""
    _float_copies.pop(id(weight), None)


class BlasQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear (affine) whose products run by quantized_product: over many tokens
    through BLAS on the CPU, for one token (decode) by quantized_matmul."""

    uses_float_copies = True

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_product(x, self.weight, self.scales, self.biases, self.weight.shape[0],
                              group_size=self.group_size, bits=self.bits, channel_in=False)
        return y + self.bias if "bias" in self else y


class BlasQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding (affine) whose output projection (tied embeddings: as_linear) over
    many tokens runs through BLAS on the CPU (quantized_product), as BlasQuantizedLinear."""

    uses_float_copies = True

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_product(x, self.weight, self.scales, self.biases, self.weight.shape[0],
                                 group_size=self.group_size, bits=self.bits, channel_in=False)


def blas_quantized(module: nn.Module) -> nn.Module:
    """mlx-lm's affine QuantizedLinear / QuantizedEmbedding as their BLAS-prefill twins (the
    same parameters); any other module as it is."""
    if type(module) not in (nn.QuantizedLinear, nn.QuantizedEmbedding) or module.mode != "affine":
        return module
    rows, packed = module.weight.shape
    options = (module.group_size, module.bits, module.mode)
    if type(module) is nn.QuantizedLinear:
        twin = BlasQuantizedLinear(packed * 32 // module.bits, rows, "bias" in module, *options)
    else:
        twin = BlasQuantizedEmbedding(rows, packed * 32 // module.bits, *options)
    twin.update(module.parameters())
    twin.freeze()
    return twin
