"""Selections and the rules that turn channel scores into one.

A Selection names, for every layer, the FFN channels (original numbering) the model keeps.
The rules here are plain numpy so the PyTorch reference and the MLX runtime share them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence, Union

import numpy as np

from .bundle import PAD_MULTIPLE
from .errors import SamplingError, SelectionError

Prompt = Union[str, Sequence[dict]]  # a user prompt, or chat messages [{"role", "content"}, ...]


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


def check_sampling(*, max_tokens: int | None = None, temp: float | None = None, top_p: float | None = None,
                   seed: int | None = None, top_k: int | None = None, min_p: float | None = None,
                   repetition_penalty: float | None = None, presence_penalty: float | None = None,
                   frequency_penalty: float | None = None, logit_bias: dict | None = None) -> None:
    """Raise SamplingError unless the generation options given are usable: max_tokens a whole
    number >= 1, temp a number >= 0, top_p in (0, 1], seed a whole number in [0, 2**64); and
    for mlx-lm's other samplers and logits processors (the server takes them): top_k a whole
    number >= 0 (0: off), min_p in [0, 1], repetition_penalty > 0, presence and frequency
    penalties in [-2, 2], logit_bias token id -> a bias in [-100, 100].
    Every front end (Python, CLI, chat, server) goes through the engine, which calls this."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                   or max_tokens < 1):
        raise SamplingError(f"max_tokens must be a whole number >= 1 (the most tokens to generate), got {max_tokens!r}")
    if temp is not None and not _number_in(temp, 0.0, math.inf, low_open=False):
        raise SamplingError(f"temp must be a number >= 0 (0 samples greedily), got {temp!r}")
    if top_p is not None and not _number_in(top_p, 0.0, 1.0, low_open=True):
        raise SamplingError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64):
        raise SamplingError(f"seed must be a whole number in [0, 2**64), got {seed!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise SamplingError(f"top_k must be a whole number >= 0 (0 keeps every token), got {top_k!r}")
    if min_p is not None and not _number_in(min_p, 0.0, 1.0, low_open=False):
        raise SamplingError(f"min_p must be in [0, 1] (0 keeps every token), got {min_p!r}")
    if repetition_penalty is not None and not _number_in(repetition_penalty, 0.0, math.inf, low_open=True):
        raise SamplingError(f"repetition_penalty must be a number > 0 (1 is none), got {repetition_penalty!r}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None and not _number_in(value, -2.0, 2.0, low_open=False):
            raise SamplingError(f"{name} must be in [-2, 2] (0 is none), got {value!r}")
    for token, bias in (logit_bias or {}).items():
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
            raise SamplingError(f"logit_bias: {token!r} is not a token id (a whole number >= 0)")
        if not _number_in(bias, -100.0, 100.0, low_open=False):
            raise SamplingError(f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias!r}")


def _number_in(value, low: float, high: float, *, low_open: bool) -> bool:
    """Whether value is a finite real number (not a bool) in (low, high] or [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    if not math.isfinite(value):
        return False
    above = value > low if low_open else value >= low
    return bool(above and value <= high)


def kept_count(density: float, d_ffn: int, pad_multiple: int = PAD_MULTIPLE) -> int:
    """Channels kept per layer at `density`: ceil(density * d_ffn), rounded up to `pad_multiple`."""
    density = check_density(density)
    k = math.ceil(density * d_ffn - 1e-9)
    if pad_multiple > 1:
        k = math.ceil(k / pad_multiple) * pad_multiple
    return max(1, min(d_ffn, k))


def top_k(scores: np.ndarray, k: int | Sequence[int]) -> list[np.ndarray]:
    """Per layer, the ids of the k highest scores (ties broken by lower id), sorted ascending.

    scores: [n_layers, d_ffn]; k: one count for every layer, or one per layer (layer budgets).
    """
    scores = np.asarray(scores, dtype=np.float32)
    counts = [int(k)] * len(scores) if np.isscalar(k) else [int(c) for c in k]
    if len(counts) != len(scores):
        raise SelectionError(f"{len(counts)} kept counts for {len(scores)} layers")
    order = np.argsort(-scores, axis=-1, kind="stable")
    return [np.sort(row[:c]).astype(np.int64) for row, c in zip(order, counts)]


def overlap(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[float]:
    """Per layer, the Jaccard overlap |a & b| / |a | b| of two masks' kept channel ids."""
    return [len(np.intersect1d(x, y)) / max(1, len(np.union1d(x, y))) for x, y in zip(a, b)]


def static_scores(scores: Iterable[np.ndarray], ks: Sequence[int]) -> list[np.ndarray]:
    """Fixed channel scores for one mask shared by every prompt, from many prompts' scores
    (each [n_layers, d_ffn], read once, in one pass): for each kept count k of `ks`, per layer,
    the share of prompts whose top k holds the channel, ties broken by the mean standardized
    score. top_k(static_scores(scores, [k])[0], k) is static_top_k(scores, k)."""
    ks = [int(k) for k in ks]
    frequency = total = None
    n, grand, squares = 0, 0.0, 0.0
    for one in scores:
        one = np.asarray(one, dtype=np.float32)
        if frequency is None:
            frequency = [np.zeros(one.shape, dtype=np.float64) for _ in ks]
            total = np.zeros(one.shape, dtype=np.float64)
        for freq, k in zip(frequency, ks):
            for layer, ids in enumerate(top_k(one, k)):
                freq[layer, ids] += 1
        total += one
        grand += float(one.sum(dtype=np.float64))
        squares += float(np.square(one, dtype=np.float64).sum())
        n += 1
    if not n:
        raise SelectionError("a static mask needs the scores of at least one prompt")
    size = n * total.size
    mean = grand / size
    std = np.sqrt(max(squares / size - mean * mean, 0.0))
    tie_break = 1e-3 * (total / n - mean) / (std + 1e-9)
    return [(freq / n + tie_break).astype(np.float32) for freq in frequency]


def static_top_k(scores: Iterable[np.ndarray], k: int) -> list[np.ndarray]:
    """One mask for every prompt, from many prompts' scores [n_prompts, n_layers, d_ffn]: per
    layer, the k channels most often in a prompt's top k (ties by the mean standardized score).
    """
    return top_k(static_scores(scores, [k])[0], k)


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
    def kept_counts(self) -> list[int]:
        """Channels kept per layer."""
        return [len(ids) for ids in self.indices]

    @property
    def density(self) -> float:
        """Fraction of FFN channels kept, over all layers."""
        return sum(self.kept_counts) / (self.d_ffn * len(self.indices))

    def overlap(self, other: "Selection") -> list[float]:
        """Per-layer Jaccard overlap of kept channels with another selection."""
        return overlap(self.indices, other.indices)

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


class Selector(Protocol):
    """What decides the channels: scores every FFN channel of every layer for a prompt.

    Attributes:
        name: how users ask for it (engine.generate(..., selector=name)).
        calls: how many times it has scored (tests and stats count work with it).
    """

    name: str
    calls: int

    def inputs(self, prompt: Prompt) -> list[int]:
        """The token ids it reads for `prompt` (its selections are cached by them)."""

    def scores(self, tokens: Sequence[int]) -> np.ndarray:
        """[n_layers, d_ffn] scores in original channel ids; the top k per layer are kept."""


def selector_text(prompt: Prompt) -> str:
    """What the trained predictor reads: the prompt, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise SelectionError("chat messages hold no user message to select channels from")
    return users[-1]


class PredictorSelector:
    """Scores channels with the trained sparsity predictor (the IFPruning method).

    It reads the user's instruction only (the last user message, no chat template), as it
    was trained to.
    """

    name = "predictor"

    def __init__(self, predictor, tokenizer):
        self.predictor = predictor
        self.tokenizer = tokenizer
        self.calls = 0

    def inputs(self, prompt: Prompt) -> list[int]:
        return list(self.tokenizer.encode(selector_text(prompt)))

    def scores(self, tokens: Sequence[int]) -> np.ndarray:
        self.calls += 1
        return self.predictor.scores(list(tokens))


class StaticSelector:
    """One selection for every prompt: fixed scores, whatever the prompt reads (the static-mask
    baseline; static_scores makes them from a predictor's scores on training prompts).

    fixed: [n_layers, d_ffn] scores, or a function returning them, called on first use.
    """

    name = "static"

    def __init__(self, fixed: np.ndarray | Callable[[], np.ndarray]):
        self._fixed = fixed
        self.calls = 0

    def inputs(self, prompt: Prompt) -> list[int]:
        return []  # nothing of the prompt: every prompt shares one selection (and its cache entry)

    def scores(self, tokens: Sequence[int]) -> np.ndarray:
        self.calls += 1
        if callable(self._fixed):
            self._fixed = np.asarray(self._fixed(), dtype=np.float32)
        return np.asarray(self._fixed, dtype=np.float32)


class ActivationSelector:
    """Training-free (GRIFFIN, Dong et al. 2024): scores channels by their activations on the prompt.

    The dense model runs over the prompt as the LLM will see it (chat template applied). In
    each layer, every token's FFN activation vector silu(gate) * up is scaled to unit l2 norm,
    so that no single token (e.g. the first, whose activations are often huge) dominates;
    a channel's score is the l2 norm of its column over the tokens. Channels that fire across
    the prompt are the ones generation will need ("flocking").

    scores(tokens, cache) also fills an mlx-lm KV cache: that is GRIFFIN's dense prefill,
    which the engine reuses so generation starts without a second prefill.
    normalize=False skips the per-token scaling (an ablation; docs/SELECTORS.md compares).
    """

    name = "activations"

    def __init__(self, model, mlps, prompt_tokens: Callable[[Prompt], list[int]], normalize: bool = True):
        self.model, self.mlps, self.prompt_tokens = model, mlps, prompt_tokens
        self.normalize = normalize
        self.calls = 0

    def inputs(self, prompt: Prompt) -> list[int]:
        return list(self.prompt_tokens(prompt))

    def scores(self, tokens: Sequence[int], cache: list | None = None) -> np.ndarray:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        from .prune import observing

        if len(tokens) == 0:
            raise SelectionError("the prompt has no tokens to score channels on")
        self.calls += 1
        collected: list = []

        energy = self.energy()

        def observe(h):
            # (T, d_ffn) -> (d_ffn,), channels in position order. Evaluated as the pass goes:
            # left lazy to the end, every layer's activations would be held at once.
            collected.append(energy(h[0]))
            mx.async_eval(collected[-1])

        if cache is None:  # the chunks of a long prompt attend to the earlier ones through it
            cache = make_prompt_cache(self.model)
        with observing(self.mlps, observe):
            for chunk in chunks(tokens, PREFILL_CHUNK):
                self.model(mx.array(chunk, dtype=mx.int32)[None], cache=cache)
                mx.eval(collected, [c.state for c in cache])
                if len(collected) > len(self.mlps):  # fold this chunk into the totals
                    collected[:] = [a + b for a, b in zip(collected[: len(self.mlps)],
                                                          collected[len(self.mlps):])]
        return self.scores_from(collected)

    def scores_from(self, energies: Sequence) -> np.ndarray:
        """[n_layers, d_ffn] scores from each layer's channel energies (position order)."""
        scores = np.empty((len(self.mlps), self.mlps[0].d_ffn), dtype=np.float32)
        for layer, (mlp, s) in enumerate(zip(self.mlps, energies)):
            scores[layer, mlp.channel_order()] = np.sqrt(np.array(s))  # back to original channel ids
        return scores

    def energy(self):
        """The compiled map (T, d_ffn) activations -> (d_ffn,) channel energies scores() sums."""
        return _channel_energy(self.normalize)


PREFILL_CHUNK = 2048  # tokens per forward pass of the scoring prefill (bounds activation memory)


@functools.cache
def _channel_energy(normalize: bool):
    """A compiled map (T, d_ffn) activations -> (d_ffn,): per channel, the sum over tokens of
    its squared activation, each token first scaled to unit norm when `normalize`.

    Normalizing is a weighted sum (1 / ||h_t||^2 per token), not a divided copy of h, and the
    whole map is compiled: [T, d_ffn] passes are memory-bound on CPU. docs/SELECTORS.md
    measures the scoring pass within a few percent of a plain dense pass.
    """
    import mlx.core as mx

    def energy(h):
        squares = mx.square(h.astype(mx.float32))
        if not normalize:
            return mx.sum(squares, axis=0)
        return (1.0 / (mx.sum(squares, axis=-1) + 1e-12)) @ squares

    return mx.compile(energy)


def chunks(tokens: Sequence[int], size: int):
    for start in range(0, len(tokens), size):
        yield list(tokens[start:start + size])
