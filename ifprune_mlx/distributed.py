"""Tensor-parallel pruned FFN over mlx.distributed: each rank holds 1/N of every layer's channels.

Rank r of N holds the FFN channels [bounds[r], bounds[r+1]) of every layer (contiguous, sizes
differing by at most one), read from the bundle as one byte range per row array, so no rank
ever holds the whole FFN. Attention, norms, embeddings and the head are replicated. A layer's
FFN output is a sum over channels, so each rank computes its channels' part and one
`all_sum` per layer, after the down projection, adds them up (down_proj's bias, if any, is
kept by rank 0 only).

Every rank applies the same global selection in original channel ids, each to its own rows
(in place, canonical order: prune.apply_selection). The ranks agree on it because the scores
are made identical before top-k: the trained predictor's scores are rank 0's, sent to all
(an all_sum of rank 0's scores with zeros: exact); the training-free selector's scores come
from each rank's own channels and are gathered the same way. Two rules turn scores into the
kept channels (`SPLITS`): "global" (the single-process top-k: kept counts per rank vary) and
"balanced" (top-k/N within each rank's channels: equal work per rank, a slightly different
mask). docs/DISTRIBUTED.md measures both.

This module sits in the model layer: the engine builds on it (`load(path, group=...)`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generation_stream

from .bundle import PAD_MULTIPLE, read_rows, safetensors_header
from .errors import DistributedError
from .prune import PrunableMLP
from .selectors import top_k

T = TypeVar("T")
SPLITS = ("global", "balanced")
DEFAULT_SPLIT = "global"


def is_ffn_rows(name: str) -> bool:
    """Whether a tensor's rows are FFN channels (row layout): gate/up weights, quantization
    scales and biases and their biases; down_proj's too, but not its bias (one per output)."""
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return True
    return ".mlp.down_proj." in name and not name.endswith(".bias")


class ShardedPrunableMLP(PrunableMLP):
    """A PrunableMLP over one rank's channels; its output is summed over the group's ranks."""

    def __init__(self, d_model: int, d_ffn: int, bias: bool, group: mx.distributed.Group):
        super().__init__(d_model, d_ffn, bias)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)


class Sharding:
    """How a model's FFN channels are split over the ranks of an mlx.distributed group.

    Attributes:
        group: the mlx.distributed group; rank, size: this process's place in it.
        d_ffn: channels per layer in the whole model.
        bounds: rank r holds channels [bounds[r], bounds[r+1]); start, stop: this rank's.
        split: "global" or "balanced", how scores become kept channels (see the module doc).
    """

    def __init__(self, group: mx.distributed.Group, d_ffn: int, split: str = DEFAULT_SPLIT,
                 pad_multiple: int = PAD_MULTIPLE):
        if split not in SPLITS:
            raise DistributedError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.d_ffn, self.split = d_ffn, split
        least = max(1, pad_multiple)
        if d_ffn // self.size < least:
            raise DistributedError(
                f"the model has {d_ffn} FFN channels per layer: {self.size} ranks would hold "
                f"{d_ffn // self.size} each, fewer than {least} (its pad multiple); use at most "
                f"{max(1, d_ffn // least)} ranks")
        self.bounds = np.array([d_ffn * r // self.size for r in range(self.size + 1)])
        self.start, self.stop = int(self.bounds[self.rank]), int(self.bounds[self.rank + 1])

    @property
    def width(self) -> int:
        """Channels per layer this rank holds."""
        return self.stop - self.start

    # -- loading ------------------------------------------------------------------------

    def shard_model(self, model: nn.Module, bias: bool) -> None:
        """Replace every layer's PrunableMLP by a ShardedPrunableMLP of this rank's width."""
        for layer in model.layers:
            d_model = layer.mlp.down_proj.weight.shape[1]
            layer.mlp = ShardedPrunableMLP(d_model, self.width, bias, self.group)

    def local_weights(self, weights: dict[str, mx.array],
                      files: Sequence[Path] | None = None) -> dict[str, mx.array]:
        """This rank's weights: every FFN row array cut to its rows, the rest as given (lazy).

        files: the bundle's safetensors files (row layout on disk): the rows are read from
        them as byte ranges, so the other ranks' rows are never read. Without files (a plain
        folder, put in row layout lazily) each matrix is read whole and cut, one at a time.
        """
        out = dict(weights)
        done = set()
        for path in files or ():
            header = safetensors_header(Path(path))
            for name in header:
                if name in out and is_ffn_rows(name):
                    out[name] = read_rows(Path(path), header, name, self.start, self.stop)
                    done.add(name)
        for name, value in weights.items():
            if is_ffn_rows(name) and name not in done:
                out[name] = mx.contiguous(value[self.start:self.stop])  # a copy: the whole matrix is freed
            elif name.endswith(".mlp.down_proj.bias") and self.rank != 0:
                out[name] = mx.zeros_like(value)  # the all_sum adds rank 0's bias once
        return out

    # -- selection ----------------------------------------------------------------------

    def agree(self, score: Callable[[], np.ndarray], from_shards: bool) -> np.ndarray:
        """Scores [n_layers, d_ffn] that are the same on every rank.

        score(): this rank's scores; from_shards: they cover this rank's channels only
        ([n_layers, width], the training-free selector's), else all channels (rank 0's are used).
        """
        self.wait_for_streams()
        with peer_errors():
            scores = np.asarray(score(), dtype=np.float32)
        if not from_shards:
            return rank0_values(self.group, scores)
        full = np.zeros((scores.shape[0], self.d_ffn), dtype=np.float32)
        full[:, self.start:self.stop] = scores
        return _sum(self.group, full)

    def wait_for_streams(self) -> None:
        """Wait for the work in flight on this rank (mlx-lm's generation runs one step ahead,
        on its own stream) so that the next collectives are issued in the same order on
        every rank: collectives from two streams at once pair up wrongly between ranks
        (seen here: the predictor's scores arrived mixed with a decode step's sums)."""
        mx.synchronize(generation_stream)
        mx.synchronize()

    @staticmethod
    def guarded(items: Iterable[T]) -> Iterator[T]:
        """`items`, with a lost rank reported as a DistributedError (peer_errors)."""
        with peer_errors():
            yield from items

    def top_k(self, scores: np.ndarray, k: int | Sequence[int]) -> list[np.ndarray]:
        """Per layer, the k kept channel ids (sorted) by this sharding's split rule (k: one
        count, or one per layer)."""
        if self.split == "global":
            return top_k(scores, k)
        if np.isscalar(k):
            return balanced_top_k(scores, k, self.bounds)
        return [balanced_top_k(scores[layer:layer + 1], int(c), self.bounds)[0] for layer, c in enumerate(k)]

    def local(self, indices: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Global channel ids per layer -> this rank's rows (ids minus start), sorted."""
        return [ids[(ids >= self.start) & (ids < self.stop)] - self.start
                for ids in (np.asarray(i) for i in indices)]

    def kept_per_rank(self, indices: Sequence[np.ndarray]) -> np.ndarray:
        """[n_layers, size]: channels each rank keeps in each layer."""
        return np.stack([np.diff(np.searchsorted(np.asarray(ids), self.bounds)) for ids in indices])


def balanced_top_k(scores: np.ndarray, k: int, bounds: np.ndarray) -> list[np.ndarray]:
    """Per layer, the best k * width_r / d_ffn channels inside each range [bounds[r], bounds[r+1])
    (largest remainders first, so the counts add up to k): equal work on every rank."""
    scores = np.asarray(scores, dtype=np.float32)
    widths = np.diff(bounds)
    exact = k * widths / widths.sum()
    counts = np.floor(exact).astype(int)
    extra = k - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:extra]] += 1
    parts = [top_k(scores[:, lo:hi], int(c)) for lo, hi, c in zip(bounds[:-1], bounds[1:], counts)]
    return [np.concatenate([part[layer] + lo for part, lo in zip(parts, bounds[:-1])])
            for layer in range(scores.shape[0])]


def _sum(group: mx.distributed.Group, values: np.ndarray) -> np.ndarray:
    with peer_errors():  # on the CPU, which has float64
        return np.array(mx.distributed.all_sum(mx.array(values), group=group, stream=mx.cpu))


def rank0_values(group: mx.distributed.Group, values, dtype=np.float32) -> np.ndarray:
    """Rank 0's `values` (an array or a number), on every rank: rank 0's summed with the
    others' zeros, and x + 0 is x exactly, so they arrive bit for bit."""
    values = np.asarray(values, dtype=dtype)
    return _sum(group, values if group.rank() == 0 else np.zeros_like(values))


def all_ranks_ok(group: mx.distributed.Group, error: BaseException | None,
                 doing: str = "load the model") -> None:
    """Every rank says whether it succeeded; raise on every rank if one did not.

    The rank that failed raises its own error; the others a DistributedError naming it.
    """
    failed = np.zeros(group.size(), dtype=np.float32)
    failed[group.rank()] = error is not None
    failed = _sum(group, failed)
    if error is not None:
        raise error
    bad = [r for r in range(group.size()) if failed[r]]
    if bad:
        raise DistributedError(f"rank {bad[0]} could not {doing} (its error is in its output); "
                               f"rank {group.rank()} stops too")


def rank0_first(group: mx.distributed.Group | None, work: Callable[[], T], doing: str) -> T:
    """work() on rank 0, then on the other ranks (e.g. a conversion into a cache they may
    share, done once); if it fails on rank 0, every rank raises."""
    if group is None:
        return work()
    result, error = None, None
    if group.rank() == 0:
        try:
            result = work()
        except Exception as e:  # the others must hear of it before rank 0 raises
            error = e
    all_ranks_ok(group, error, doing)
    return result if group.rank() == 0 else work()


@contextlib.contextmanager
def peer_errors() -> Iterator[None]:
    """Turn the ring backend's error for a lost rank into a one-line DistributedError."""
    try:
        yield
    except RuntimeError as e:
        if "[ring]" in str(e) or "peer" in str(e):
            raise DistributedError(f"lost the connection to another rank ({e}); it died or was "
                                   "stopped, so this rank stops too") from e
        raise


def world() -> mx.distributed.Group | None:
    """The group mlx.launch started this process in, or None when it runs alone."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None
