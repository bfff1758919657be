"""Multi-turn chat on a pruned model: which mask each turn uses, and what happens to the KV cache.

The paper leaves multi-turn open. A ChatSession decides, per turn, the FFN selection by a
policy, and keeps one KV cache per mask:

  per-task  (default) the first user message selects; later turns keep that mask, so each
            turn prefills only its new tokens.
  per-turn  every user message selects again. A new mask invalidates the KV cache (the
            keys/values of earlier tokens were computed by other FFN channels), so the
            turn prefills the whole conversation, unless a cache of that mask is kept:
            caches are keyed by mask (LRU) and reused when a mask comes back.
  off       dense: no selection, one cache.

A cache holds the keys/values of a token prefix computed under one mask. For a turn, the
templated conversation is compared with the tokens the mask's cache holds; the cache is
trimmed to their common prefix and only the rest is fed. No terminal I/O here: the CLI
(chat_cli.py) and app authors drive a session the same way.

    session = ChatSession(engine, policy="per-turn", density=0.5)
    for response in session.send("Write a haiku about pruning"):
        print(response.text, end="")
    session.last.prefill_tokens, session.last.select_ms
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from .bundle import check_prefill
from .errors import SelectionError
from .selectors import Selection, Selector, check_density, check_sampling

POLICIES = ("per-task", "per-turn", "off")
DENSE = "dense"  # the cache key of the unpruned model
DENSE_PREFILLED = "dense-prefill "  # what a KV cache's key starts with when its prompt ran on every channel


def cache_key(mask: str, dense_prefill: bool) -> str:
    """The key of a KV cache of mask key `mask`: a dense prefill's keys and values serve no
    pruned prefill (nor the reverse), so the two are kept apart."""
    return DENSE_PREFILLED + mask if dense_prefill else mask


def split_cache_key(key: str) -> tuple[str, bool]:
    """cache_key's inverse: (mask key, dense_prefill)."""
    return key.removeprefix(DENSE_PREFILLED), key.startswith(DENSE_PREFILLED)


def mask_key(selection: Selection | None) -> str:
    """A short stable key of a mask: a hash of its per-layer channel ids ("dense" for None)."""
    if selection is None:
        return DENSE
    h = hashlib.sha1()
    for ids in selection.indices:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(ids.astype("<i8").tobytes())
    return h.hexdigest()[:12]


@dataclass
class TurnStats:
    """What one turn cost. Times in milliseconds, memory in GB."""

    policy: str
    mask: str                      # mask_key of the mask the turn used
    density: float                 # fraction of FFN channels kept (1.0 dense)
    kept_counts: list[int]         # channels kept per layer
    selected: bool                 # the selector ran this turn (not a cached selection)
    select_ms: float               # wall time to get the selection (≈0 when cached)
    apply_ms: float                # wall time to swap rows into place
    swaps: int                     # rows swapped (all layers)
    cache_hit: bool                # a cache of this mask was reused
    reused_tokens: int             # tokens of the conversation already in that cache
    prefill_tokens: int            # tokens fed this turn (prompt prefill)
    dense_prefill: bool = False    # those tokens ran on every FFN channel (the answer pruned)
    ttft_ms: float = 0.0           # from send() to the first token (select+apply+prefill)
    prefill_tps: float = 0.0
    generation_tokens: int = 0
    decode_tps: float = 0.0
    peak_memory_gb: float = 0.0    # MLX's peak during the turn (reset when it starts)
    finish_reason: str | None = None  # "stop", "length" or "interrupted"
    rows_read: int = 0             # resident mode: FFN rows the apply read from the bundle,
    read_bytes: int = 0            # their bytes
    read_ms: float = 0.0           # and the reads' wall time


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Cache:
    cache: list          # mlx-lm KV cache (one entry per layer)
    tokens: list[int]    # the token ids whose keys/values it holds


class MaskCaches:
    """mlx-lm KV caches per mask (LRU), each reused for its longest common prefix.

    A cache holds the keys/values of a token prefix computed under one mask, so it serves
    only calls that run with that mask applied. ChatSession (one cache per mask) and
    `ifprune serve` (up to `per_mask` per mask: one per conversation) share it:

        lease = caches.take(mask_key(selection), tokens)   # with `selection` applied
        for response in lease.stream(engine, prompt, max_tokens=64):
            ...
    """

    def __init__(self, model, max_caches: int = 4, per_mask: int = 1):
        self.model, self.max_caches, self.per_mask = model, max_caches, per_mask
        self._caches: OrderedDict[tuple[str, int], _Cache] = OrderedDict()  # (mask key, serial)
        self._serial = itertools.count()

    def take(self, key: str, tokens: list[int]) -> "CacheLease":
        """The cache of mask `key` sharing the longest prefix with `tokens`, trimmed to it;
        it becomes the most recently used. A new cache when nothing is shared, or when the
        best one would lose most of what it holds (another conversation's) and the mask
        has room for one more."""
        slots = [(slot, entry, common_prefix(entry.tokens, tokens))
                 for slot, entry in self._caches.items() if slot[0] == key]
        best = max(slots, key=lambda s: s[2], default=None)
        if best is not None and len(slots) < self.per_mask and 2 * best[2] < len(best[1].tokens):
            best = None
        slot, entry, reused = (key, next(self._serial)), None, 0
        if best is not None:
            slot, entry, n = best
            del self._caches[slot]
            n = min(n, len(tokens) - 1)  # feed at least one token to get logits
            offset = entry.cache[0].offset
            if n > 0 and (offset == n or can_trim_prompt_cache(entry.cache)):
                if offset > n:
                    trim_prompt_cache(entry.cache, offset - n)
                entry.tokens, reused = tokens[:n], n
            else:
                entry = None
        hit = entry is not None
        if entry is None:
            entry = _Cache(make_prompt_cache(self.model), [])
        self._caches[slot] = entry
        while len(self._caches) > self.max_caches:
            self._caches.popitem(last=False)
        return CacheLease(self, slot, entry, list(tokens), reused, hit)

    def settle(self, slot: tuple[str, int], entry: _Cache, held: list[int]) -> None:
        """Record what a cache holds after a call; drop it if its layers disagree."""
        offsets = {c.offset for c in entry.cache}
        if len(offsets) != 1:  # interrupted inside a forward pass
            self._caches.pop(slot, None)
            return
        offset = offsets.pop()
        if offset > len(held):
            trim_prompt_cache(entry.cache, offset - len(held))
        entry.tokens = held[:min(offset, len(held))]
        # Evaluate now: the rows of these weights move on the next apply().
        mx.eval([c.state for c in entry.cache])

    def clear(self) -> None:
        self._caches.clear()

    def tokens_held(self) -> list[tuple[str, int]]:
        """(mask key, tokens its KV cache holds) per cache, most recently used last."""
        return [(slot[0], len(entry.tokens)) for slot, entry in self._caches.items()]

    def nbytes(self) -> int:
        """Bytes the KV caches of all masks take (allocated, not only used)."""
        total = 0
        for entry in self._caches.values():
            for c in entry.cache:
                try:
                    total += c.nbytes
                except (NotImplementedError, AttributeError):
                    pass
        return total


@dataclass
class CacheLease:
    """A mask's cache taken for one call: `reused` tokens of `tokens` are in it already."""

    caches: MaskCaches
    slot: tuple[str, int]  # (mask key, serial)
    entry: _Cache
    tokens: list[int]
    reused: int
    hit: bool  # a cache of this mask was reused

    @property
    def feed(self) -> list[int]:
        """The tokens the call still has to prefill."""
        return self.tokens[self.reused:]

    def stream(self, engine, prompt, **options) -> Iterator[GenerationResponse]:
        """engine.stream_responses on the cache (the mask must be applied, e.g. pinned);
        when the generator ends or is closed, the cache is settled with what it holds."""
        generated = []
        responses = engine.stream_responses(prompt, prompt_cache=self.entry.cache, tokens=self.feed,
                                            **options)
        try:
            for response in responses:
                generated.append(response.token)
                yield response
        finally:
            responses.close()
            self.caches.settle(self.slot, self.entry, self.tokens + generated)


@dataclass(frozen=True)
class Mask:
    """The FFN channels a turn computed with: a selection, or None for the dense model."""

    selection: Selection | None
    key: str  # mask_key(selection)

    @property
    def dense(self) -> bool:
        return self.selection is None


class ChatSession:
    """A conversation with an Engine: messages, selection policy, per-mask KV caches, stats.

    Args:
        engine: an ifprune_mlx Engine.
        policy: "per-task", "per-turn" or "off" (dense).
        density: fraction of FFN channels kept (default: the bundle's).
        selector: "predictor", "activations" or a Selector (default: the engine's: the trained
            predictor where the bundle has one). In chat the training-free selector scores the
            task message in its own dense pass; each turn's new tokens are then prefilled dense
            (all channels on, no row moves) and the answer runs pruned, as they are for the
            trained predictor when `prefill` is "dense" (else pruned).
        prefill: "pruned" or "dense", what the trained predictor's turns prefill their new
            tokens with (default: the engine's, i.e. the bundle's). Caches of the two are kept
            apart.
        system: an optional system message.
        max_tokens, temp, top_p: generation options of every turn.
        seed: seeds the sampler once, at the start of the session.
        max_caches: KV caches kept (one per mask, least recently used dropped first).

    State (read it; reset() clears it): messages, turns (TurnStats), mask (the Mask of the
    last turn, None before the first), previous (the Mask in use before the last change, None
    if there was none), task (per-task: the text the mask was selected from).
    """

    def __init__(self, engine, *, policy: str = "per-task", density: float | None = None,
                 selector: str | Selector | None = None, system: str | None = None,
                 max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, max_caches: int = 4, prefill: str | None = None):
        check_sampling(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)  # as the engine will
        self.engine, self.system, self.seed, self.max_caches = engine, system, seed, max_caches
        self.max_tokens, self.temp, self.top_p = max_tokens, temp, top_p
        self.set_policy(policy)
        self.set_selector(selector)
        self.set_prefill(prefill or engine.prefill)
        self.density = check_density(density if density is not None else engine.default_density)
        self._caches = MaskCaches(engine.model, max_caches)
        if seed is not None:
            mx.random.seed(seed)
        self.reset()

    # -- settings ----------------------------------------------------------------------

    def set_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise SelectionError(f"unknown selection policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.policy = policy

    def set_selector(self, selector: str | Selector | None) -> None:
        """Select masks with `selector` ("predictor", "activations" or a Selector; None: the
        engine's default) from the next selection on."""
        self.selector: Selector = self.engine.get_selector(selector)

    def set_prefill(self, prefill: str) -> None:
        """What the trained predictor's turns prefill with from the next turn on ("pruned" or "dense")."""
        self.prefill = check_prefill(prefill)

    def prefills_dense(self) -> bool:
        """Whether a pruned turn prefills its new tokens dense (the training-free selector always does)."""
        return self.engine.prefills_dense(self.selector, self.prefill)

    def set_density(self, density: float) -> int:
        """Keep `density` of the FFN channels from the next turn on; returns the kept count.

        Per task, the task's mask is selected again at the new density (the conversation's
        cache for it is then rebuilt on the next turn).
        """
        self.density = check_density(density)
        return self.kept_count()

    def kept_count(self) -> int:
        return self.engine.kept_count(self.density)

    def reselect(self) -> None:
        """The next user message selects a new mask (per-task: it becomes the new task)."""
        self._reselect = True

    def reset(self) -> None:
        """Forget the conversation, the task, the caches and the stats (settings stay)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.turns: list[TurnStats] = []
        self.task: str | None = None
        self.mask: Mask | None = None
        self.previous: Mask | None = None
        self._reselect = False
        self._caches.clear()

    @property
    def last(self) -> TurnStats | None:
        """Stats of the last turn (None before the first)."""
        return self.turns[-1] if self.turns else None

    # -- a turn ------------------------------------------------------------------------

    def _choose(self, text: str) -> tuple[Selection | None, bool, float]:
        """The mask of this turn per policy: (selection, selector ran, seconds)."""
        if self.policy == "off":
            return None, False, 0.0
        if self.policy == "per-turn" or self.task is None or self._reselect:
            self.task, self._reselect = text, False
        calls = self.selector.calls
        start = time.perf_counter()
        selection = self.engine.select(self.task, self.density, self.selector)
        return selection, self.selector.calls > calls, time.perf_counter() - start

    def send(self, text: str) -> Iterator[GenerationResponse]:
        """Add a user message and stream the assistant's answer as GenerationResponses.

        Closing the generator early (e.g. on Ctrl-C) ends the turn: the partial answer is
        kept in the conversation, its stats get finish_reason "interrupted".
        """
        if not text.strip():
            raise SelectionError("empty message: nothing to answer")
        start = time.perf_counter()
        mx.reset_peak_memory()  # so peak_memory_gb is this turn's
        selection, selected, select_s = self._choose(text)
        t = time.perf_counter()
        stats = self.engine.apply(selection)  # pins it: stream_responses uses it untouched
        apply_s = time.perf_counter() - t
        key = mask_key(selection)
        if self.mask is not None and key != self.mask.key:
            self.previous = self.mask
        self.mask = Mask(selection, key)

        self.messages.append({"role": "user", "content": text})
        dense_prefill = selection is not None and self.prefills_dense()
        lease = self._caches.take(cache_key(key, dense_prefill), self.engine.prompt_tokens(self.messages))
        turn = TurnStats(
            policy=self.policy, mask=key,
            density=1.0 if selection is None else selection.density,
            kept_counts=[self.engine.d_ffn] * self.engine.n_layers if selection is None else selection.kept_counts,
            selected=selected, select_ms=select_s * 1000, apply_ms=apply_s * 1000,
            swaps=stats.swaps, rows_read=stats.rows_read, read_bytes=stats.bytes_read,
            read_ms=stats.read_seconds * 1000, cache_hit=lease.hit, reused_tokens=lease.reused,
            prefill_tokens=len(lease.feed), dense_prefill=dense_prefill,
        )
        self.turns.append(turn)
        pieces = []
        responses = lease.stream(self.engine, self.messages, max_tokens=self.max_tokens,
                                 temp=self.temp, top_p=self.top_p, prefill="dense" if dense_prefill else "pruned")
        try:
            for response in responses:
                if not pieces:
                    turn.ttft_ms = (time.perf_counter() - start) * 1000
                    turn.prefill_tps = response.prompt_tps
                pieces.append(response.text)
                turn.generation_tokens = response.generation_tokens
                turn.decode_tps = response.generation_tps
                turn.peak_memory_gb = response.peak_memory
                turn.finish_reason = response.finish_reason
                yield response
        finally:
            responses.close()
            if turn.finish_reason is None:
                turn.finish_reason = "interrupted"
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    # -- reports -----------------------------------------------------------------------

    def cached_masks(self) -> dict[str, int]:
        """Cache key (chat.cache_key: mask key, dense-prefilled or not) -> tokens its KV cache
        holds (most recently used last)."""
        return dict(self._caches.tokens_held())

    def cache_bytes(self) -> int:
        """Bytes the KV caches of all cached masks take (allocated, not only used)."""
        return self._caches.nbytes()

    def settings(self) -> dict:
        return {"policy": self.policy, "selector": self.selector.name, "prefill": self.prefill, "density": self.density,
                "max_tokens": self.max_tokens, "temp": self.temp, "top_p": self.top_p, "seed": self.seed,
                "system": self.system}

    def transcript(self) -> dict:
        """{"model", "settings", "messages", "turns"}: what /save writes."""
        path = getattr(self.engine, "path", None)
        return {"model": None if path is None else str(path), "settings": self.settings(),
                "messages": list(self.messages), "turns": [asdict(t) for t in self.turns]}

    def save(self, path: str | Path) -> Path:
        """Write the transcript as JSON."""
        path = Path(path).expanduser()
        path.write_text(json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n")
        return path
