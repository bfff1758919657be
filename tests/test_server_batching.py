"""The parts of batched serving without a model: prefix caches and stop strings (properties)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import KVCache

from ifprune_mlx.batching import PrefixCaches, StopText

tokens = st.lists(st.integers(0, 3), min_size=1, max_size=12)


def cache_of(ids: list[int], layers: int = 2) -> list[KVCache]:
    """A KV cache whose position i holds the value ids[i] (so what it holds can be read back)."""
    out = []
    for _ in range(layers):
        c = KVCache()
        values = mx.array(np.array(ids, dtype=np.float32).reshape(1, 1, -1, 1))
        c.update_and_fetch(values, values)
        out.append(c)
    return out


def held(cache: list[KVCache]) -> list[int]:
    return [int(v) for v in np.array(cache[0].keys[0, 0, : cache[0].offset, 0])]


@settings(max_examples=80, deadline=None)
@given(stored=st.lists(st.tuples(st.sampled_from(["m1", "m2"]), tokens), max_size=6), query=tokens,
       key=st.sampled_from(["m1", "m2"]))
def test_lookup_gives_a_copy_of_the_longest_shared_prefix(stored, query, key):
    caches = PrefixCaches(max_caches=16)
    for k, ids in stored:
        caches.store(k, ids, cache_of(ids))
    before = caches.tokens_held()

    def shared(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    best = max((shared(ids, query) for k, ids in stored if k == key), default=0)
    cache, reused = caches.lookup(key, query)
    assert reused == min(best, len(query) - 1)  # at least one token is left to feed
    if reused:
        assert held(cache) == query[:reused]
        cache[0].update_and_fetch(*[mx.zeros((1, 1, 1, 1))] * 2)  # writing to the copy ...
    assert sorted(caches.tokens_held()) == sorted(before)  # ... changes nothing stored


def test_store_keeps_at_most_max_caches_and_drops_what_a_new_entry_contains():
    caches = PrefixCaches(max_caches=2)
    caches.store("m", [1, 2], cache_of([1, 2]))
    caches.store("m", [1, 2, 3], cache_of([1, 2, 3]))  # the conversation's next turn replaces its first
    assert caches.tokens_held() == [("m", 3)]
    caches.store("m", [4], cache_of([4]))
    caches.store("d", [5], cache_of([5]))
    assert caches.tokens_held() == [("m", 1), ("d", 1)]  # LRU


@settings(max_examples=80, deadline=None)
@given(text=st.text("ab<>", max_size=30), stops=st.lists(st.text("ab<>", min_size=1, max_size=3), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=6))
def test_stop_text_cuts_at_the_first_complete_stop_however_the_text_streams(text, stops, cuts):
    stopper, out, stopped = StopText(stops), "", False
    bounds = sorted({0, len(text), *[c % (len(text) + 1) for c in cuts]})
    for a, b in zip(bounds, bounds[1:]):
        piece, stopped = stopper.feed(text[a:b])
        out += piece
        if stopped:
            break
    if not stopped:
        out += stopper.flush()
    # the stop complete first wins (the least end; then the earliest start), however the text streams
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    assert out == (text[:min(hits)[1]] if hits else text) and stopped == bool(hits)
