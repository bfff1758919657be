"""primed.py: sequences joining a running batch share its next decode step (no forward pass of
their own) and get the tokens mlx-lm's BatchGenerator gives them, alone or joining."""

from __future__ import annotations

import pytest
from mlx_lm.generate import BatchGenerator

import ifprune_mlx as ifp
from ifprune_mlx.primed import primed_generator

PROMPTS = [[5, 9, 14, 3, 7], [11, 2, 8], [4, 4, 19, 23, 6, 1, 30], [12, 40]]


class CountingModel:
    """The model, counting its forward passes."""

    def __init__(self, model):
        self.model, self.passes = model, 0

    def __call__(self, *args, **kwargs):
        self.passes += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.fixture(scope="module")
def model(endless_bundle):
    return ifp.load(endless_bundle).model


def run(make, model, joins: list[int], prompts: list[list[int]] = PROMPTS,
        max_tokens: int = 8) -> tuple[list[list[int]], int]:
    """prompts[i] inserted before step joins[i] (step 0: at the start); the tokens of each and
    the forward passes run. Bounded: every sequence ends after max_tokens."""
    counting = CountingModel(model)
    generator = make(counting, stop_tokens=[], completion_batch_size=8, prefill_batch_size=8)
    uids, tokens, step = {}, {}, 0
    while step < 200 and (len(uids) < len(joins) or any(len(t) < max_tokens for t in tokens.values())):
        for i, at in enumerate(joins):
            if at == step:
                (uids[generator.insert([prompts[i]], [max_tokens])[0]],) = [i]
                tokens[i] = []
        for r in generator.next()[1]:
            tokens[uids[r.uid]].append(r.token)
        step += 1
    generator.close()
    return [tokens[i] for i in range(len(joins))], counting.passes


@pytest.mark.parametrize("joins", [[0, 0, 0, 0], [0, 3, 5, 9], [0, 1, 1, 6], [0, 2, 4, 4]])
def test_joiners_get_the_tokens_they_get_alone_with_a_pass_less_per_join(model, joins):
    plain, plain_passes = run(BatchGenerator, model, joins)
    primed, primed_passes = run(primed_generator, model, joins)
    assert primed == plain
    assert all(len(t) == 8 for t in primed)
    # prompts inserted at one step prefill and start together; each group but the first joins
    # a running batch, and its first step is the batch's own (the first group's is a pass either way)
    joining_groups = len(set(joins)) - 1
    assert primed_passes == plain_passes - joining_groups


def test_each_sequence_gets_what_it_gets_alone(model):
    references = [run(BatchGenerator, model, [0], [p])[0][0] for p in PROMPTS]
    together, _ = run(primed_generator, model, [0, 2, 2, 5])
    assert together == references
