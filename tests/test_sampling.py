"""Bad generation options are refused by one rule (selectors.check_sampling, called by the
engine) with the same message whatever the front end: Python, `ifprune generate`, `ifprune
chat`, ChatSession and the path the server generates through."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st
from typer.testing import CliRunner

import ifprune_mlx as ifp
from ifprune_mlx.chat import ChatSession, MaskCaches, mask_key
from ifprune_mlx.cli import app
from ifprune_mlx.errors import SamplingError
from ifprune_mlx.selectors import check_sampling

ROOT = Path(__file__).parents[1]
# (CLI flags, the same options in Python)
BAD = [
    (["-m", "-5"], {"max_tokens": -5}),
    (["-m", "0"], {"max_tokens": 0}),
    (["--temp", "-1"], {"temp": -1.0}),
    (["--top-p", "2"], {"top_p": 2.0}),
    (["--top-p", "0"], {"top_p": 0.0}),
    (["--seed", "-3"], {"seed": -3}),
]
IDS = ["max_tokens -5", "max_tokens 0", "temp -1", "top_p 2", "top_p 0", "seed -3"]


def message(options: dict) -> str:
    with pytest.raises(SamplingError) as caught:
        check_sampling(**options)
    return str(caught.value)


@pytest.fixture(scope="module")
def engine(bundle_dir):
    return ifp.load(bundle_dir)


@given(max_tokens=st.integers(1, 10**9), temp=st.floats(0, 1e6), top_p=st.floats(0, 1, exclude_min=True),
       seed=st.integers(0, 2**64 - 1))
def test_usable_options_pass(max_tokens, temp, top_p, seed):
    check_sampling(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)


@given(st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=3)))
def test_max_tokens_must_be_a_whole_number_of_at_least_one(value):
    with pytest.raises(SamplingError, match=r"^max_tokens must be a whole number >= 1 .*got "):
        check_sampling(max_tokens=value)


@given(st.one_of(st.floats(max_value=0, exclude_max=True), st.just(math.nan), st.just(math.inf)))
def test_temp_must_be_a_finite_number_of_at_least_zero(value):
    with pytest.raises(SamplingError, match=r"^temp must be a number >= 0"):
        check_sampling(temp=value)


@given(st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), st.just(math.nan)))
def test_top_p_must_be_in_zero_one(value):
    with pytest.raises(SamplingError, match=r"^top_p must be in \(0, 1\]"):
        check_sampling(top_p=value)


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64), st.floats()))
def test_seed_must_be_a_whole_number_in_range(value):
    with pytest.raises(SamplingError, match=r"^seed must be a whole number"):
        check_sampling(seed=value)


@pytest.mark.parametrize("flags, options", BAD, ids=IDS)
def test_python_api_refuses_before_generating(engine, flags, options):
    before = engine.last_apply
    with pytest.raises(SamplingError) as caught:
        engine.generate("Sort these numbers: 3 1 2", **options)
    assert str(caught.value) == message(options)
    assert engine.last_apply is before  # refused before selecting or applying anything
    with pytest.raises(SamplingError) as caught:
        next(engine.stream_responses("Sort these numbers", **options))
    assert str(caught.value) == message(options)


@pytest.mark.parametrize("flags, options", BAD, ids=IDS)
def test_generate_command_prints_the_same_one_line_and_exits_1(bundle_dir, flags, options):
    result = CliRunner().invoke(app, ["generate", str(bundle_dir), "-p", "hi", *flags])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {message(options)}"


@pytest.mark.parametrize("flags, options", BAD[:4], ids=IDS[:4])
def test_chat_command_prints_the_same_one_line_and_exits_1(bundle_dir, flags, options):
    result = CliRunner().invoke(app, ["chat", str(bundle_dir), *flags], input="hello\n")
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {message(options)}"


def test_the_installed_command_line_exits_1_with_the_line_on_stderr(bundle_dir):
    """`python -m ifprune_mlx.cli generate -m -5` as a user runs it: nothing generated."""
    run = subprocess.run([sys.executable, "-m", "ifprune_mlx.cli", "generate", str(bundle_dir), "-p", "hi",
                          "-m", "-5"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip() == f"error: {message({'max_tokens': -5})}"


@pytest.mark.parametrize("flags, options", BAD, ids=IDS)
def test_chat_session_refuses_at_construction(engine, flags, options):
    with pytest.raises(SamplingError) as caught:
        ChatSession(engine, **options)
    assert str(caught.value) == message(options)


@pytest.mark.parametrize("flags, options", BAD, ids=IDS)
def test_the_servers_generation_path_refuses(engine, flags, options):
    """The server's scheduler generates with a pinned mask through MaskCaches' lease.stream
    (engine.stream_responses on a KV cache): the engine's check applies there too."""
    prompt = "Sort these numbers: 3 1 2"
    selection = engine.select(prompt, 0.5)
    engine.apply(selection)
    caches = MaskCaches(engine.model, max_caches=2, per_mask=2)
    lease = caches.take(mask_key(selection), engine.prompt_tokens(prompt))
    sampling = {"max_tokens": 4, "temp": 0.0, "top_p": 1.0, "seed": None, **options}
    with pytest.raises(SamplingError) as caught:
        list(lease.stream(engine, prompt, **sampling))
    assert str(caught.value) == message(options)
    engine.apply("auto")
