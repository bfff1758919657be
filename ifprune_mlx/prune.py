"""The prunable FFN and the in-place row-swap engine.

Row layout: channel j of a layer is row j of gate_proj, of up_proj and of down_proj stored
transposed ([d_ffn, d_model]). Each PrunableMLP keeps a permutation `perm` (position ->
original channel id) and a prefix length `k`; it computes on the zero-copy slices W[:k].

Applying a selection S of k channels makes positions [0, k) hold exactly S:
  incoming = positions >= k whose channel is in S        (sorted)
  outgoing = positions <  k whose channel is not in S    (sorted)
  swap rows incoming[i] <-> outgoing[i] in every row array of the layer.
The work is a few row copies per array, sized by the channels that change, not by the
model, done in the weight's own buffer (no second copy of any weight): through a NumPy view
of the buffer where NumPy has the dtype and writes reach MLX (CPU, unified memory), else
with MLX gathers evaluated before the scatter, so MLX reuses the buffer.

The FFN output is a sum over its channels, so any order inside the prefix computes the dense
model with the others zeroed, but float rounding follows the order, and near-ties in greedy
decoding can flip with it. With `canonical=True` the prefix is also put in ascending channel
order (and dense in the original order), so the same selection computes bit for bit the same
whatever was applied before. That costs up to two row copies per kept channel instead of
one per changed channel: the move is a permutation of positions, done as two rounds of
disjoint swaps (every permutation is a product of two involutions).

A failed apply (error or Ctrl-C) swaps back what it had swapped: swaps are involutions.

Quantized rows multiply by quantized.quantized_product (on the CPU through BLAS over more than a
few rows: MLX's CPU quantized_matmul has no BLAS path).
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu

from .errors import SelectionError
from .quantized import forget_float_copy, quantized_product


def _add_bias(layer: nn.Module, y: mx.array, k: int) -> mx.array:
    """y plus the layer's bias, if it has one: all of it for down (channel_in), the kept
    channels' for gate and up."""
    if "bias" not in layer:
        return y
    return y + (layer.bias if layer.channel_in else layer.bias[:k])


class RowLinear(nn.Module):
    """A linear map whose FFN channels are the rows of `weight` [d_ffn, d_model].

    `channel_in=False` (gate, up): y = x @ W[:k].T (+ bias[:k]), channels are outputs.
    `channel_in=True` (down):      y = h @ W[:k]   (+ bias),    channels are inputs.
    """

    def __init__(self, d_ffn: int, d_model: int, bias: bool = False, channel_in: bool = False):
        super().__init__()
        self.channel_in = channel_in
        self.weight = mx.zeros((d_ffn, d_model))
        if bias:
            self.bias = mx.zeros((d_model,) if channel_in else (d_ffn,))

    def __call__(self, x: mx.array, k: int) -> mx.array:
        w = self.weight if k == self.weight.shape[0] else self.weight[:k]  # dense: no slice op
        return _add_bias(self, x @ w if self.channel_in else x @ w.T, k)

    def row_arrays(self) -> list[str]:
        """Names of the arrays whose rows are channels."""
        return ["weight"] if self.channel_in or "bias" not in self else ["weight", "bias"]

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedRowLinear.from_row_linear(self, group_size, bits, mode)


class QuantizedRowLinear(nn.Module):
    """RowLinear with affine-quantized rows: weight, scales and biases rows move together.

    Groups run along d_model for every matrix, so rows stay independently selectable.
    """

    BITS = (2, 3, 4, 5, 6, 8)  # MLX's affine widths; quantized_matmul takes each either way round
    uses_float_copies = True  # quantized.float_copies() applies

    def __init__(self, d_ffn: int, d_model: int, bias: bool = False, channel_in: bool = False,
                 group_size: int = 64, bits: int = 4, mode: str = "affine"):
        super().__init__()
        if mode != "affine" or bits not in self.BITS:
            raise ValueError(f"quantized FFN rows are affine {'/'.join(map(str, self.BITS))}-bit, got {mode} {bits}-bit")
        self.channel_in = channel_in
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, self.biases = mx.quantize(
            mx.zeros((d_ffn, d_model)), group_size=group_size, bits=bits
        )
        if bias:
            self.bias = mx.zeros((d_model,) if channel_in else (d_ffn,))
        self.freeze()

    @classmethod
    def from_row_linear(cls, layer: RowLinear, group_size: int, bits: int, mode: str = "affine"):
        d_ffn, d_model = layer.weight.shape
        q = cls(d_ffn, d_model, "bias" in layer, layer.channel_in, group_size, bits, mode)
        q.weight, q.scales, q.biases = mx.quantize(layer.weight, group_size=group_size, bits=bits)
        if "bias" in layer:
            q.bias = layer.bias
        return q

    def __call__(self, x: mx.array, k: int) -> mx.array:
        y = quantized_product(x, self.weight, self.scales, self.biases, k, group_size=self.group_size,
                              bits=self.bits, channel_in=self.channel_in)
        return _add_bias(self, y, k)

    def row_arrays(self) -> list[str]:
        rows = ["weight", "scales", "biases"]
        return rows if self.channel_in or "bias" not in self else rows + ["bias"]


class PrunableMLP(nn.Module):
    """SwiGLU FFN in row layout that computes on its first `k` channels only."""

    def __init__(self, d_model: int, d_ffn: int, bias: bool = False):
        super().__init__()
        self.gate_proj = RowLinear(d_ffn, d_model, bias)
        self.up_proj = RowLinear(d_ffn, d_model, bias)
        self.down_proj = RowLinear(d_ffn, d_model, bias, channel_in=True)
        self.d_ffn = d_ffn
        self.k = d_ffn
        self.perm = np.arange(d_ffn)  # position -> original channel id
        self.observer = None  # called with the [.., k] activations (training-free selector)
        self.mask = None  # [batch, 1, d_ffn] 0/1 per position: several selections in one batch

    def __call__(self, x: mx.array) -> mx.array:
        h = swiglu(self.gate_proj(x, self.k), self.up_proj(x, self.k))
        if self.observer is not None:
            self.observer(h)
        if self.mask is not None:
            h = h * self.mask
        return self.down_proj(h, self.k)

    def channel_order(self) -> np.ndarray:
        """Original channel ids of the activations an observer gets, in their order."""
        return self.perm

    def kept_ids(self) -> np.ndarray:
        """Original ids of the channels in use, sorted."""
        return np.sort(self.perm[: self.k])

    def row_arrays(self) -> list[tuple[nn.Module, str]]:
        return [(m, name) for m in (self.gate_proj, self.up_proj, self.down_proj)
                for name in m.row_arrays()]


@contextmanager
def observing(mlps: list[PrunableMLP], observer: Callable[[mx.array], None] | None) -> Iterator[None]:
    """Inside the block every layer computes on all its channels and calls observer(h) with its
    FFN activations h [..., d_ffn] (channels in position order: mlp.perm maps them back); after
    it, each layer computes on the channels it had before. The training-free selector's pass;
    with observer None, a dense prefill under an applied selection (no row moves)."""
    widths = [mlp.k for mlp in mlps]
    try:
        for mlp in mlps:
            mlp.k, mlp.observer = mlp.d_ffn, observer
        yield
    finally:
        for mlp, k in zip(mlps, widths):
            mlp.k, mlp.observer = k, None


@contextmanager
def masking(mlps: list[PrunableMLP], masks: list[mx.array]) -> Iterator[None]:
    """Inside the block every layer computes on all its channels times masks[layer]
    ([batch, 1, d_ffn], position order): batch row b computes the model pruned to the channels
    its mask keeps, equal to that selection applied up to float rounding, with no row moved.
    Calibration measures many selections in one batched pass with it."""
    widths = [mlp.k for mlp in mlps]
    try:
        for mlp, mask in zip(mlps, masks, strict=True):
            mlp.k, mlp.mask = mlp.d_ffn, mask
        yield
    finally:
        for mlp, k in zip(mlps, widths):
            mlp.k, mlp.mask = k, None


@dataclass
class ApplyStats:
    """What one apply did: rows swapped per layer and in all, and its wall time; in resident
    mode (resident.py) also the rows read from the bundle, their bytes and the reads' time."""

    swaps_per_layer: list[int]
    seconds: float = 0.0
    rows_read: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0

    @property
    def swaps(self) -> int:
        return sum(self.swaps_per_layer)


def plan_swaps(perm: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions to swap so that positions [0, len(keep)) hold exactly the channels `keep`.

    Returns (incoming, outgoing): equal-length sorted position arrays.
    """
    k = len(keep)
    wanted = np.zeros(len(perm), dtype=bool)
    wanted[keep] = True
    in_prefix = wanted[perm]
    incoming = k + np.flatnonzero(in_prefix[k:])
    outgoing = np.flatnonzero(~in_prefix[:k])
    return incoming, outgoing


Swaps = tuple[np.ndarray, np.ndarray]  # rows a[i] <-> b[i], all positions distinct


def plan_canonical(perm: np.ndarray, keep: np.ndarray) -> list[Swaps]:
    """Rounds of disjoint swaps after which positions [0, len(keep)) hold `keep` in ascending order.

    Channels dropped from the prefix take the places of those that enter it; the others stay.
    The permutation of positions this defines is split, cycle by cycle, into two involutions:
    reversing a cycle (c_i <-> c_-i) then reflecting it (c_i <-> c_1-i) moves c_i to c_i+1.
    """
    k = len(keep)
    incoming, outgoing = plan_swaps(perm, keep)
    where = np.empty(len(perm), dtype=np.int64)
    where[perm] = np.arange(len(perm))  # channel -> position
    target = np.arange(len(perm))       # position -> its row's new position
    target[where[np.sort(keep)]] = np.arange(k)
    target[outgoing] = incoming
    rounds: list[tuple[list[int], list[int]]] = [([], []), ([], [])]
    seen = target == np.arange(len(perm))
    for start in np.flatnonzero(~seen):
        if seen[start]:
            continue
        cycle = [int(start)]
        seen[start] = True
        nxt = int(target[start])
        while nxt != start:
            cycle.append(nxt)
            seen[nxt] = True
            nxt = int(target[nxt])
        m = len(cycle)
        for i in range(1, (m + 1) // 2):              # round 1: c_i <-> c_-i
            rounds[0][0].append(cycle[i])
            rounds[0][1].append(cycle[m - i])
        for i in range(m):                            # round 2: c_i <-> c_(1-i)
            j = (1 - i) % m
            if i < j:
                rounds[1][0].append(cycle[i])
                rounds[1][1].append(cycle[j])
    return [(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)) for a, b in rounds if a]


@functools.cache
def _numpy_writes_reach_mlx(device: str) -> bool:
    """Whether writing through np.array(a, copy=False) changes the MLX array a on `device`.

    True on the CPU and on Apple silicon's unified memory; checked once per device rather
    than assumed, so a backend that hands NumPy a copy falls back to MLX scatters.
    """
    probe = mx.zeros((2, 2))
    mx.eval(probe)
    try:
        np.array(probe, copy=False)[0, 0] = 1.0
    except (ValueError, TypeError, RuntimeError):
        return False
    return probe[0, 0].item() == 1.0


_SAME_WIDTH_INTEGERS = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


@functools.cache
def _integer_view_writes_reach_mlx(device: str, dtype: mx.Dtype) -> bool:
    """Whether rows swapped through a NumPy view of a.view(uintN) move in the MLX array a
    (a dtype NumPy lacks, e.g. bfloat16). Checked once per device and dtype."""
    probe = mx.array([[1.0], [2.0]], dtype=dtype)
    mx.eval(probe)
    try:
        bits = probe.view(_SAME_WIDTH_INTEGERS[dtype.size])
        mx.eval(bits)
        host = np.array(bits, copy=False)
        host[[0, 1]] = host[[1, 0]]
    except (KeyError, ValueError, TypeError, RuntimeError):
        return False
    return probe[0, 0].item() == 2.0


def _host_view(w: mx.array) -> np.ndarray | None:
    """A writable NumPy view of w's own row-major buffer, or None (then MLX scatters).

    Rows only move, so a dtype NumPy lacks (bfloat16) is viewed as the unsigned integer of
    its width: the same bytes, copied the same way.
    """
    device = str(mx.default_device())
    if not _numpy_writes_reach_mlx(device):
        return None
    try:
        view = np.array(w, copy=False)  # NumPy 2: raises instead of copying
    except (ValueError, TypeError, RuntimeError):
        if not _integer_view_writes_reach_mlx(device, w.dtype):
            return None
        bits = w.view(_SAME_WIDTH_INTEGERS[w.dtype.size])
        mx.eval(bits)
        try:
            view = np.array(bits, copy=False)
        except (ValueError, TypeError, RuntimeError):
            return None
    ok = view.flags.c_contiguous and view.flags.writeable and view.shape == tuple(w.shape)
    return view if ok else None


def _swap_rows(module: nn.Module, name: str, a: mx.array, b: mx.array) -> None:
    """Swap rows a[i] <-> b[i] of module[name] in place.

    Through a NumPy view of the evaluated buffer (CPU and unified memory; bfloat16 through
    an integer view of the same bytes): MLX's CPU scatter costs about ten times a row copy.
    Else (a backend whose buffers NumPy cannot write) with MLX gathers and scatters. In chunks of at most 1/64 of the
    rows, so the gathered rows in flight stay below 1/32 of one matrix.
    """
    w = module[name]
    forget_float_copy(w)
    mx.eval(w)
    mx.synchronize()  # nothing in flight still reads the rows we overwrite
    host = _host_view(w)
    step = max(16, w.shape[0] // 64)
    if host is not None:
        ha, hb = np.array(a), np.array(b)
        for i in range(0, ha.shape[0], step):
            ca, cb = ha[i : i + step], hb[i : i + step]
            host[np.concatenate([ca, cb])] = host[np.concatenate([cb, ca])]
        return
    for i in range(0, a.shape[0], step):
        ca, cb = a[i : i + step], b[i : i + step]
        rows = w[mx.concatenate([cb, ca])]
        mx.eval(rows)  # evaluated before the write, so the scatter reuses w's buffer
        w[mx.concatenate([ca, cb])] = rows
        mx.eval(w)


def _plans(mlps: list[PrunableMLP], keep: list[np.ndarray], canonical: bool) -> list[list[Swaps]]:
    plan = plan_canonical if canonical else lambda perm, ids: [plan_swaps(perm, ids)]
    return [plan(mlp.perm, np.asarray(ids)) for mlp, ids in zip(mlps, keep)]


def rows_to_swap(mlps: list[PrunableMLP], keep: list[np.ndarray] | None, canonical: bool = False) -> int:
    """How many row swaps apply_selection(mlps, keep, canonical) would make now (no rows move)."""
    if keep is None:
        if not canonical:
            return 0
        keep = [np.arange(mlp.d_ffn) for mlp in mlps]
    return sum(len(a) for rounds in _plans(mlps, keep, canonical) for a, _ in rounds)


def _swap_layer(mlp: PrunableMLP, a: np.ndarray, b: np.ndarray) -> None:
    """Swap rows a[i] <-> b[i] in every row array of the layer, and in its perm."""
    if len(a) == 0:
        return
    ma, mb = mx.array(a.astype(np.int32)), mx.array(b.astype(np.int32))
    done = []
    try:
        for module, name in mlp.row_arrays():
            _swap_rows(module, name, ma, mb)
            done.append((module, name))
    except BaseException:
        for module, name in reversed(done):
            _swap_rows(module, name, ma, mb)
        raise
    mlp.perm[a], mlp.perm[b] = mlp.perm[b], mlp.perm[a].copy()


def _move_layer(mlp: PrunableMLP, rounds: list[Swaps]) -> None:
    """Run rounds of swaps on one layer; on failure undo the rounds done, in reverse."""
    for i, (a, b) in enumerate(rounds):
        try:
            _swap_layer(mlp, a, b)
        except BaseException:
            for a_done, b_done in reversed(rounds[:i]):
                _swap_layer(mlp, a_done, b_done)
            raise


def apply_selection(mlps: list[PrunableMLP], keep: list[np.ndarray] | None,
                    canonical: bool = False) -> ApplyStats:
    """Make every layer compute on exactly its `keep` channels (None: all channels).

    canonical: also order the prefix by channel id (dense: the original order), so results
    do not depend on what was applied before (see the module docstring for the cost).
    Transactional: on any error, including KeyboardInterrupt, every layer is swapped back
    to the selection it had before and the error is re-raised.
    """
    if keep is None:
        if not canonical:
            for mlp in mlps:
                mlp.k = mlp.d_ffn
            return ApplyStats([0] * len(mlps))
        keep = [np.arange(mlp.d_ffn) for mlp in mlps]
    if len(keep) != len(mlps):
        raise SelectionError(f"selection has {len(keep)} layers, the model has {len(mlps)}")
    start = time.perf_counter()
    plans = _plans(mlps, keep, canonical)
    done: list[tuple[PrunableMLP, list[Swaps], int]] = []
    try:
        for mlp, ids, rounds in zip(mlps, keep, plans):
            _move_layer(mlp, rounds)
            done.append((mlp, rounds, mlp.k))
            mlp.k = len(ids)
    except BaseException:
        for mlp, rounds, old_k in reversed(done):
            for a, b in reversed(rounds):
                _swap_layer(mlp, a, b)
            mlp.k = old_k
        raise
    return ApplyStats([sum(len(a) for a, _ in rounds) for rounds in plans], time.perf_counter() - start)
