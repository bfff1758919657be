"""mlx-lm's BatchGenerator with the new sequences' first step shared with the running batch.

mlx-lm prefills a new prompt but its last token, then runs a forward pass of the new
sequences alone on that token (PromptProcessingBatch.generate): its logits give their first
token. When sequences join a running batch, that pass is one more forward pass per join, and
the running sequences wait for it; on a CPU a pass over one sequence costs nearly what one
over eight does (the weights are read either way). Here the new sequences enter the
generation batch "primed": their last prompt token is fed in the batch's next decode step,
with everyone's, and their first token comes out of it. The split of the prompt is the same
(the prompt but its last token prefilled, the last token fed as a decode step), so the
computation is mlx-lm's, in a batch of other rows.

    generator = primed_generator(model, completion_batch_size=..., ...)   # a BatchGenerator
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
from mlx_lm.models.cache import TokenBuffer


class PrimedGeneration(GenerationBatch):
    """A GenerationBatch whose rows in `priming` feed their prompt's last token in the next
    step: that step yields no token for them (their first comes out of it, the step after)."""

    priming: set = frozenset()

    @classmethod
    def primed(cls, prompts: PromptProcessingBatch, last: list[int]) -> "PrimedGeneration":
        """The prefilled sequences of `prompts` (their prompt but `last`), primed."""
        batch = cls.empty(prompts.model, prompts.fallback_sampler)
        n = len(prompts.uids)
        batch.uids, batch.prompt_cache, batch.tokens = prompts.uids, prompts.prompt_cache, prompts.tokens
        batch.samplers, batch.logits_processors = prompts.samplers, prompts.logits_processors
        batch.stop_sequences, batch.max_tokens = prompts.stop_sequences, prompts.max_tokens
        batch._next_tokens = mx.array(last, dtype=mx.uint32)
        batch._next_logprobs = [mx.zeros((1,))] * n  # never read: a priming row yields no token
        batch._token_context = [TokenBuffer(t) for t in prompts.tokens]
        batch._num_tokens = [0] * n
        batch._matchers = [s.matcher() for s in prompts.stop_sequences]
        batch.priming = set(prompts.uids)
        return batch

    def extend(self, batch) -> None:
        super().extend(batch)
        self.priming = set(self.priming) | set(getattr(batch, "priming", ()))

    def next(self) -> list[GenerationBatch.Response]:
        """GenerationBatch.next, but a priming row's token (its prompt's last) is not counted,
        matched against the stop sequences or returned."""
        if not self.uids:
            return []
        tokens, logprobs = self._step()
        keep, responses = [], []
        for i, uid in enumerate(self.uids):
            if uid in self.priming:
                self.priming.discard(uid)
                keep.append(i)
                continue
            self._num_tokens[i] += 1
            finish = "length" if self._num_tokens[i] >= self.max_tokens[i] else None
            if self._matchers[i].advance(tokens[i]):
                finish = "stop"
            if finish is None:
                keep.append(i)
            responses.append(self.Response(
                uid=uid, token=tokens[i], logprobs=logprobs[i], finish_reason=finish,
                prompt_cache=self.extract_cache(i) if finish else None, all_tokens=self.tokens[i] if finish else None))
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses


class PrimingPrompts(PromptProcessingBatch):
    """A PromptProcessingBatch whose finished prompts become primed rows (no pass of their own),
    and whose prefill passes run under `prefill_context()` (e.g. every FFN channel on)."""

    prefill_context: Callable[[], ContextManager] = staticmethod(nullcontext)

    def prompt(self, tokens: list[list[int]]) -> None:
        with self.prefill_context():
            super().prompt(tokens)

    def _copy(self) -> "PrimingPrompts":
        batch = super()._copy()
        batch.prefill_context = self.prefill_context
        return batch

    def generate(self, tokens: list[list[int]]) -> PrimedGeneration:
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        batch = PrimedGeneration.primed(self, [t[-1] for t in tokens])
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens = [], [], []
        return batch


def primed_generator(model, prefill_context: Callable[[], ContextManager] = nullcontext, **options) -> BatchGenerator:
    """mlx-lm's BatchGenerator (same options) whose joining sequences share its next decode step;
    prefill_context() is entered around every prefill pass (default: nothing)."""
    generator = BatchGenerator(model, **options)
    generator._prompt_batch = PrimingPrompts.empty(model, generator.sampler, prefill_step_size=generator.prefill_step_size)
    generator._prompt_batch.prefill_context = prefill_context
    generator._generation_batch = PrimedGeneration.empty(model, generator.sampler)
    return generator
