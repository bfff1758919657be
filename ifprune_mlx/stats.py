"""Bootstrap 95% intervals: of a mean, of a ratio of sums, and of a paired difference.

A score over documents is a ratio of sums: sum of per-document numerators over sum of
per-document counts (count 1 each for a plain mean; for IFEval's instruction-level accuracy,
a document holding three instructions counts 3). Documents are resampled with replacement;
a paired difference resamples the same documents for both conditions, so what the two
share (which prompts are hard) cancels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DRAWS = 2000


def _resamples(n: int, seed: int, draws: int) -> np.ndarray:
    """[draws, n] indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def _percentiles(stats: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def bootstrap_interval(values: Sequence[float], seed: int = 0, draws: int = DRAWS) -> tuple[float, float]:
    """95% bootstrap interval of the mean of `values`."""
    values = np.asarray(values, dtype=np.float64)
    return _percentiles(values[_resamples(len(values), seed, draws)].mean(axis=1))


def ratio(numerators: Sequence[float], counts: Sequence[float]) -> float:
    """sum(numerators) / sum(counts): a score over documents."""
    return float(np.sum(numerators, dtype=np.float64) / np.sum(counts, dtype=np.float64))


def _ratios(numerators, counts, idx: np.ndarray) -> np.ndarray:
    numerators, counts = np.asarray(numerators, np.float64), np.asarray(counts, np.float64)
    return numerators[idx].sum(axis=1) / np.maximum(counts[idx].sum(axis=1), 1e-300)


def ratio_interval(numerators: Sequence[float], counts: Sequence[float], seed: int = 0,
                   draws: int = DRAWS) -> tuple[float, float]:
    """95% bootstrap interval of ratio(numerators, counts), resampling documents."""
    if len(numerators) != len(counts) or not len(counts):
        raise ValueError(f"need as many counts as numerators, at least one; got {len(numerators)} and {len(counts)}")
    return _percentiles(_ratios(numerators, counts, _resamples(len(counts), seed, draws)))


def paired_difference(a: tuple[Sequence[float], Sequence[float]], b: tuple[Sequence[float], Sequence[float]],
                      seed: int = 0, draws: int = DRAWS) -> tuple[float, float, float]:
    """ratio(*a) - ratio(*b) and its paired 95% bootstrap interval.

    a and b are (numerators, counts) over the same documents in the same order; each
    resample draws the same documents for both.
    """
    n = len(a[1])
    if not (len(a[0]) == n == len(b[0]) == len(b[1])) or n == 0:
        raise ValueError("a paired difference needs the same documents on both sides")
    idx = _resamples(n, seed, draws)
    low, high = _percentiles(_ratios(*a, idx) - _ratios(*b, idx))
    return ratio(*a) - ratio(*b), low, high
