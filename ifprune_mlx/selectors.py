"""Selections and the rules that turn channel scores into one.

A Selection names, for every layer, the FFN channels (original numbering) the model keeps.
The rules here are plain numpy so the PyTorch reference and the MLX runtime share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import SelectionError


def check_density(density: float) -> float:
    """Return density as a float, or raise SelectionError if it is not in (0, 1]."""
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise SelectionError(f"density must be a number in (0, 1], got {density!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise SelectionError(
            f"density must be in (0, 1] (the fraction of FFN channels kept), got {density!r}; "
            "e.g. 0.33 keeps a third of the channels"
        )
    return value


def kept_count(density: float, d_ffn: int, pad_multiple: int = 32) -> int:
    """Channels kept per layer at `density`: ceil(density * d_ffn), rounded up to `pad_multiple`."""
    density = check_density(density)
    k = math.ceil(density * d_ffn - 1e-9)
    if pad_multiple > 1:
        k = math.ceil(k / pad_multiple) * pad_multiple
    return max(1, min(d_ffn, k))


def top_k(scores: np.ndarray, k: int) -> list[np.ndarray]:
    """Per layer, the ids of the k highest scores (ties broken by lower id), sorted ascending.

    scores: [n_layers, d_ffn]
    """
    scores = np.asarray(scores, dtype=np.float32)
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return [np.sort(row).astype(np.int64) for row in order]


@dataclass(frozen=True)
class Selection:
    """The FFN channels kept in every layer.

    Attributes:
        indices: one sorted int array per layer, channel ids in the original numbering.
        d_ffn: channels per layer in the dense model.
        seconds: wall time the selector took to produce it (0 for explicit selections).
        source: who chose it ("predictor", "activations", "explicit").
    """

    indices: tuple[np.ndarray, ...]
    d_ffn: int
    seconds: float = 0.0
    source: str = "explicit"

    @property
    def kept(self) -> list[int]:
        """Channels kept per layer."""
        return [len(ids) for ids in self.indices]

    @property
    def density(self) -> float:
        """Fraction of FFN channels kept, over all layers."""
        return sum(self.kept) / (self.d_ffn * len(self.indices))

    def overlap(self, other: "Selection") -> list[float]:
        """Per-layer Jaccard overlap of kept channels with another selection."""
        return [
            len(np.intersect1d(a, b)) / max(1, len(np.union1d(a, b)))
            for a, b in zip(self.indices, other.indices)
        ]

    @classmethod
    def from_indices(cls, indices: Sequence[Sequence[int]], d_ffn: int, n_layers: int) -> "Selection":
        """Validate explicit per-layer channel ids and make a Selection of them."""
        if len(indices) != n_layers:
            raise SelectionError(
                f"an explicit selection needs one index array per layer: got {len(indices)}, "
                f"the model has {n_layers} layers"
            )
        checked = []
        for layer, ids in enumerate(indices):
            ids = np.asarray(ids)
            if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise SelectionError(
                    f"layer {layer}: channel ids must be a 1-D array of integers, got shape "
                    f"{ids.shape} dtype {ids.dtype}"
                )
            ids = ids.astype(np.int64)
            if ids.size == 0:
                raise SelectionError(f"layer {layer}: keeps no channel; keep at least one")
            bad = ids[(ids < 0) | (ids >= d_ffn)]
            if bad.size:
                raise SelectionError(
                    f"layer {layer}: channel id {int(bad[0])} is out of range; ids must be in "
                    f"[0, {d_ffn})"
                )
            unique, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise SelectionError(
                    f"layer {layer}: channel id {int(unique[counts > 1][0])} appears "
                    f"{int(counts.max())} times; each channel may be kept once"
                )
            checked.append(unique)
        return cls(indices=tuple(checked), d_ffn=d_ffn)


class PredictorSelector:
    """Scores channels with the trained sparsity predictor (the IFPruning method)."""

    name = "predictor"

    def __init__(self, predictor, tokenizer):
        self.predictor = predictor
        self.tokenizer = tokenizer
        self.calls = 0  # backbone runs, for tests and stats

    def scores(self, text: str) -> np.ndarray:
        self.calls += 1
        return self.predictor.scores(self.tokenizer.encode(text))


class ActivationSelector:
    """Training-free: scores channels by their activation on the prompt (GRIFFIN-style).

    Runs the dense model over the prompt and, per layer, takes the l2 norm over tokens of
    each token's activation vector normalized to unit l2 norm. Channels that fire for this
    prompt are the ones generation will need.
    """

    name = "activations"

    def __init__(self, model, mlps, tokenizer):
        self.model, self.mlps, self.tokenizer = model, mlps, tokenizer
        self.calls = 0

    def scores(self, text: str) -> np.ndarray:
        import mlx.core as mx

        self.calls += 1
        tokens = self.tokenizer.encode(text)
        collected: list = []

        def observe(h):
            h = h[0].astype(mx.float32)  # (T, d_ffn) in position order
            h = h / (mx.linalg.norm(h, axis=-1, keepdims=True) + 1e-6)
            collected.append(mx.linalg.norm(h, axis=0))

        ks = [mlp.k for mlp in self.mlps]
        try:
            for mlp in self.mlps:
                mlp.k, mlp.observer = mlp.d_ffn, observe
            self.model.model(mx.array(tokens, dtype=mx.int32)[None])
            mx.eval(collected)
        finally:
            for mlp, k in zip(self.mlps, ks):
                mlp.k, mlp.observer = k, None
        scores = np.empty((len(self.mlps), self.mlps[0].d_ffn), dtype=np.float32)
        for layer, (mlp, s) in enumerate(zip(self.mlps, collected)):
            scores[layer, mlp.perm] = np.array(s)  # back to original channel ids
        return scores
