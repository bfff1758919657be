"""examples/serve_load.py's aggregate decode rate: tokens after the first over the time some
request was decoding (the union of first-token -> last-token spans)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("openai")
from examples.serve_load import decode_rate  # noqa: E402


def record(sent, ttft, latency, tokens):
    return {"sent": sent, "first": sent + ttft, "latency": latency, "tokens": tokens}


def test_one_stream_is_its_own_decode_rate_and_gaps_do_not_count():
    assert decode_rate({0: record(0.0, 0.5, 2.5, 21)}) == pytest.approx(10.0)  # 20 tokens in 2 s
    back_to_back = {0: record(0.0, 0.5, 2.5, 21), 1: record(10.0, 0.5, 2.5, 21)}  # a prefill gap between
    assert decode_rate(back_to_back) == pytest.approx(10.0)


def test_streams_decoding_together_add_up():
    together = {j: record(0.0, 0.5, 2.5, 21) for j in range(8)}
    assert decode_rate(together) == pytest.approx(80.0)
    assert decode_rate({0: record(0.0, 0.1, 0.1, 1)}) == 0.0  # no decoded token, no time


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 5), st.floats(0.01, 10), st.integers(2, 200)),
                min_size=1, max_size=12))
def test_rate_is_between_the_slowest_stream_and_the_sum_of_all(spans):
    records = {j: record(s, t, t + d, n) for j, (s, t, d, n) in enumerate(spans)}
    rates = [(n - 1) / d for _, _, d, n in spans]
    assert min(rates) * (1 - 1e-9) <= decode_rate(records) <= sum(rates) * (1 + 1e-9)
