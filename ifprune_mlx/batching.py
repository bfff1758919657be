"""Batched decoding of the requests that share one mask (continuous batching; no HTTP).

A selection is applied to the model in place, so a batch runs under one mask: the scheduler
applies it, and requests whose mask is equal join the batch between decode steps and leave
it when they finish. mlx-lm's BatchGenerator does the batching: it prefills new arrivals in
chunks of `prefill_step` tokens (several prompts together) between decode steps and steps
every sequence in one forward pass (primed.py: a joining sequence's first token comes out
of the batch's next step, not a pass of its own). Each request keeps its own sampler and
logits processors (mlx-lm's sample_utils), stop strings, detokenizer and token count.

PrefixCaches keeps the KV caches of finished requests per mask (LRU): a new request starts
from a copy of the longest prefix it shares with one (a shared system prompt, or its
conversation's previous turn), so only the rest is prefilled.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import StopSequences
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .chat import common_prefix
from .jobs import post
from .primed import primed_generator
from .prune import observing
from .selectors import check_sampling

PREFILL_STEP = 512      # prompt tokens per prefill chunk: a decode step waits for one chunk at most
PREFILL_TOGETHER = 8    # prompts prefilled in one batch


@functools.lru_cache(maxsize=64)
def sampler(temp: float, top_p: float, min_p: float, top_k: int):
    """mlx-lm's sampler; one object per setting, so a batch of equal settings samples in one call."""
    return make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)


CHECKED = ("max_tokens", "temp", "top_p", "seed", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "logit_bias")


def check_request_sampling(sampling: dict) -> None:
    """The engine's check (selectors.check_sampling) of a request's sampling settings:
    SamplingError naming the first bad one."""
    check_sampling(**{name: sampling.get(name) for name in CHECKED})


def logits_processors(sampling: dict) -> list:
    """mlx-lm's logits processors for a request's logit_bias and penalties (none when neutral)."""
    bias = sampling.get("logit_bias") or None
    return make_logits_processors(
        logit_bias=bias, repetition_penalty=sampling.get("repetition_penalty"),
        presence_penalty=sampling.get("presence_penalty"), frequency_penalty=sampling.get("frequency_penalty"))


def _prefix(cache: KVCache, n: int) -> KVCache:
    """A KVCache holding the first n positions of `cache` (MLX arrays are not shared for writing)."""
    out = KVCache()
    out.keys, out.values, out.offset = cache.keys[..., :n, :], cache.values[..., :n, :], n
    return out


class PrefixCaches:
    """KV caches of finished requests per mask (LRU, at most `max_caches` in all).

        cache, reused = caches.lookup(key, tokens)   # a copy: the stored one is not changed
        ...
        caches.store(key, tokens_in_cache, cache)
    """

    def __init__(self, max_caches: int):
        self.max_caches = max_caches
        self._entries: OrderedDict[int, tuple[str, list[int], list]] = OrderedDict()
        self._serial = itertools.count()

    def lookup(self, key: str, tokens: list[int]) -> tuple[list | None, int]:
        """(a copy of the longest prefix of `tokens` held under mask `key`, its length), or
        (None, 0). At least one token is left to feed, for the first token's logits."""
        best, reused = None, 0
        for serial, (k, held, _) in self._entries.items():
            if k == key and (n := common_prefix(held, tokens)) > reused:
                best, reused = serial, n
        reused = min(reused, len(tokens) - 1)
        if best is None or reused <= 0:
            return None, 0
        self._entries.move_to_end(best)
        return [_prefix(c, reused) for c in self._entries[best][2]], reused

    def store(self, key: str, tokens: list[int], cache: list) -> None:
        """Keep `cache` (whose first positions hold `tokens`) for mask `key`; entries it
        contains (an earlier turn, the same prompt) are dropped."""
        if not cache or self.max_caches < 1 or not all(type(c) is KVCache and c.keys is not None for c in cache):
            return
        offsets = {c.offset for c in cache}
        n = min(offsets.pop(), len(tokens)) if len(offsets) == 1 else 0
        if n == 0:
            return
        held = list(tokens[:n])
        for serial in [s for s, (k, old, _) in self._entries.items() if k == key and old == held[:len(old)]]:
            del self._entries[serial]
        kept = [_prefix(c, n) for c in cache]
        mx.eval([(c.keys, c.values) for c in kept])  # the rows of the weights move on the next apply
        self._entries[next(self._serial)] = (key, held, kept)
        while len(self._entries) > self.max_caches:
            self._entries.popitem(last=False)

    def tokens_held(self) -> list[tuple[str, int]]:
        """(mask key, tokens held) per cache, most recently used last."""
        return [(k, len(held)) for k, held, _ in self._entries.values()]


class StopText:
    """Cuts generated text at the first stop string to be complete; holds back what may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        self.held += text
        if not self.stops:
            out, self.held = self.held, ""
            return out, False
        # the stop that is complete first (the least end), as it would be token by token
        hits = [(i + len(s), i) for s in self.stops if (i := self.held.find(s)) >= 0]
        if hits:
            out, self.held = self.held[:min(hits)[1]], ""
            return out, True
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class Decoding:
    """One request in the batch: its job (scheduler.Job), report and decoding state."""

    job: object
    key: str          # what its KV cache is kept under (the mask's key)
    report: dict
    detokenizer: object
    stopper: StopText
    tokens: int = 0


class MaskBatch:
    """The requests decoding together under the applied mask, over one BatchGenerator.

    add() a request (its mask applied), step() once per decode step: it hands each request's
    events to it ("start", "progress", "text"; all of a step at once, jobs.post) and returns
    those that finished, with their finish reason. Cancelled requests leave at the next step.
    """

    def __init__(self, engine, prefixes: PrefixCaches, max_batch: int, stream=None):
        self.engine, self.prefixes, self.max_batch = engine, prefixes, max_batch
        self.active: dict[int, Decoding] = {}
        self.closed = False  # a solo request runs: nothing joins
        self.outbox: list[tuple[object, str, object]] = []  # this step's events, posted at its end
        self._stops = StopSequences([[t] for t in engine.tokenizer.eos_token_ids])
        self.generator = primed_generator(engine.model, completion_batch_size=max_batch,
                                          prefill_batch_size=min(PREFILL_TOGETHER, max_batch),
                                          prefill_step_size=PREFILL_STEP, stream=stream,
                                          prefill_context=self._prefill_context)

    def _prefill_context(self):
        """Around each prefill pass: with the engine's prefill "dense", every FFN channel on
        under the applied mask (no row moves). Only the trained predictor's requests prefill
        here: the training-free selector's come prefilled (their dense scoring pass), and a
        dense request's mask is every channel anyway."""
        return observing(self.engine.mlps, None) if self.engine.prefill == "dense" else nullcontext()

    def __len__(self) -> int:
        return len(self.active)

    def room(self) -> int:
        return 0 if self.closed else self.max_batch - len(self.active)

    def add(self, job, key: str, report: dict, cache: list | None = None, reused: int | None = None) -> None:
        """Insert a job (job.ids, job.sampling) whose mask is applied; its KV cache is kept
        under `key`. Without `cache`, the longest prefix the caches of `key` hold is reused."""
        ids, s = job.ids, job.sampling
        check_request_sampling(s)
        if cache is None:
            cache, reused = self.prefixes.lookup(key, ids)
        max_tokens = s["max_tokens"]
        if self.engine.context_length:
            max_tokens = max(1, min(max_tokens, self.engine.context_length - len(ids)))
        (uid,) = self.generator.insert(
            [ids[reused:]], max_tokens=[max_tokens], caches=[cache], all_tokens=[ids[:reused]],
            samplers=[sampler(s["temp"], s["top_p"], s.get("min_p", 0.0), s.get("top_k", 0))],
            logits_processors=[logits_processors(s) + ([job.constraint] if job.constraint else [])],
            stop_sequences=[self._stops])
        report.update(reused_tokens=reused, prefill_tokens=len(ids) - reused)
        self.active[uid] = Decoding(job, key, report, self.engine.tokenizer.detokenizer, StopText(job.stop))

    def step(self) -> list[tuple[Decoding, str]]:
        """One decode step (and a prefill chunk of new arrivals); returns (decoding, finish
        reason) of the requests that finished."""
        finished = []
        for uid, d in list(self.active.items()):
            if d.job.cancelled.is_set():
                self._leave(uid)
                finished.append((d, "cancelled"))
        if not self.active:
            return finished
        try:
            prompts, responses = self.generator.next()
            for p in prompts:
                if p.uid in self.active and not p.end_of_prompt:
                    self._emit(self.active[p.uid].job, "progress", p.progress)
            for r in responses:
                d = self.active.get(r.uid)
                if d is not None and (finish := self._token(d, r)) is not None:
                    finished.append((d, finish))
        finally:
            events, self.outbox = self.outbox, []
            post(events)
        if not self.active:
            self.closed = False
        return finished

    def _emit(self, job, kind: str, payload=None) -> None:
        self.outbox.append((job, kind, payload))

    def _token(self, d: Decoding, r) -> str | None:
        """Hand one generated token to its request; its finish reason if it ended."""
        d.tokens += 1
        job = d.job
        if d.tokens == 1:
            d.report["batch"] = len(self.active)
            self._emit(job, "start", d.report)
        eos = r.finish_reason == "stop"
        if not eos:
            d.detokenizer.add_token(r.token)
        if r.finish_reason:
            d.detokenizer.finalize()
        text, stopped = d.stopper.feed(d.detokenizer.last_segment)
        if not stopped and r.finish_reason:
            text += d.stopper.flush()
        logprobs = self._logprobs(job, r) if job.sampling.get("logprobs") and not eos else None
        if text or logprobs:
            self._emit(job, "text", (text, logprobs))
        if r.finish_reason:  # the generator let it go already
            del self.active[r.uid]
            self.prefixes.store(d.key, r.all_tokens, r.prompt_cache)
            return "stop" if stopped else r.finish_reason
        if stopped:
            self._leave(r.uid)
            return "stop"
        return None

    def _leave(self, uid: int) -> None:
        """Take a request out of the batch before its end; its cache is kept."""
        d = self.active.pop(uid)
        for cache, tokens in self.generator.remove([uid], return_prompt_caches=True).values():
            self.prefixes.store(d.key, tokens, cache)

    def _logprobs(self, job, r) -> list[dict]:
        """OpenAI's logprobs entry of the token just generated (with its top alternatives)."""
        decode = self.engine.tokenizer.decode
        logprobs = r.logprobs

        def entry(token: int, logprob: float) -> dict:
            text = decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        out = entry(r.token, logprobs[r.token].item())
        top = job.sampling.get("top_logprobs") or 0
        if top:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values = logprobs[ids].tolist()
            pairs = sorted(zip(ids.tolist(), values), key=lambda p: -p[1])
            out["top_logprobs"] = [entry(t, v) for t, v in pairs]
        else:
            out["top_logprobs"] = []
        return [out]

    def close(self) -> None:
        self.generator.close()
