"""Every request field of the official `openai` client is honoured or refused (400 naming it).

The field lists come from the client itself (its CompletionCreateParams TypedDicts), so a
field a new client version adds fails here until the server decides what to do with it.
Honoured sampling fields are checked against mlx-lm's own generation with the same sampler
and logits processors, on the same pruned model (a tiny one, greedy answers never end early).
"""

from __future__ import annotations

import json
import typing

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

import ifprune_mlx as ifp  # noqa: E402
from mlx_lm.generate import generate  # noqa: E402
from mlx_lm.sample_utils import make_logits_processors, make_sampler  # noqa: E402
from openai.types import completion_create_params as completion_params  # noqa: E402
from openai.types.chat import completion_create_params as chat_params  # noqa: E402

from ifprune_mlx import server  # noqa: E402

SYSTEM = "Answer in one word."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a color."}]

# Honoured: what a request says changes what it gets (tested here, in test_server.py and, for
# the tools, test_server_tools.py; values that cannot be honoured are a 400 there too).
HONOURED = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
            "stop", "stream", "stream_options", "n", "frequency_penalty", "presence_penalty", "logit_bias",
            "logprobs", "top_logprobs", "prompt", "response_format", "tools", "tool_choice", "parallel_tool_calls"}
# Labels for the caller's records: accepted, no effect on the output by their meaning.
LABELS = {"user", "metadata", "safety_identifier", "prompt_cache_key"}
# Refused: a value that asks for something is a 400 naming the field.
REFUSED = {
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "function_call": "auto",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "high", "verbosity": "low", "web_search_options": {}, "moderation": {"model": "x"},
    "service_tier": "flex", "store": True, "prompt_cache_options": {}, "prompt_cache_retention": "24h",
    "suffix": "the end", "best_of": 3, "echo": True, "n": 2,
}


def client_fields(module) -> set[str]:
    streaming = typing.get_type_hints(module.CompletionCreateParamsStreaming)
    return set(streaming) | set(typing.get_type_hints(module.CompletionCreateParamsNonStreaming))


@pytest.fixture(scope="module")
def served(endless_bundle):
    running = server.BackgroundServer(lambda: ifp.load(endless_bundle), server.ServerConfig(model_id="m"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(endless_bundle):
    return ifp.load(endless_bundle)


def test_every_client_field_is_classified():
    for module in (chat_params, completion_params):
        unclassified = client_fields(module) - HONOURED - LABELS - set(REFUSED)
        assert not unclassified, f"{module.__name__}: decide what the server does with {unclassified}"


@pytest.mark.parametrize("route,module", [("chat/completions", chat_params), ("completions", completion_params)])
def test_refused_fields_are_a_400_naming_the_field(served, route, module):
    base = {"messages": MESSAGES} if route.startswith("chat") else {"prompt": "Once"}
    for name in sorted(client_fields(module) & set(REFUSED)):
        r = httpx.post(f"{served.url}/v1/{route}", json={**base, "max_tokens": 2, name: REFUSED[name]}, timeout=30)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["param"] == name and name in r.json()["error"]["message"]


def test_labels_are_accepted(client):
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, user="u-1",
                                           metadata={"app": "x"}, safety_identifier="s", prompt_cache_key="k")
    assert reply.choices[0].finish_reason == "length"


def test_an_unknown_field_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MESSAGES, extra_body={"top_q": 0.5})
    assert e.value.body["param"] == "top_q"


def mlx_reference(engine, *, max_tokens=10, sampler=None, processors=None) -> str:
    """What mlx-lm generates on the same pruned model (the system message's mask)."""
    engine.apply(engine.select(SYSTEM))
    try:
        return generate(engine.model, engine.tokenizer, engine.prompt_tokens(MESSAGES), max_tokens=max_tokens,
                        sampler=sampler or make_sampler(0.0), logits_processors=processors)
    finally:
        engine.apply("auto")


def ask(client, **options) -> str:
    extra = {k: options.pop(k) for k in ("top_k", "min_p", "repetition_penalty") if k in options}
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10,
                                           extra_body=extra or None, **options)
    return reply.choices[0].message.content


@pytest.mark.parametrize("options", [
    {"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0},
    {"presence_penalty": -2.0, "frequency_penalty": 0.5},
], ids=str)
def test_penalties_are_mlx_lm_logits_processors(client, engine, options):
    text = ask(client, temperature=0, **options)
    assert text == mlx_reference(engine, processors=make_logits_processors(**options))
    assert text != mlx_reference(engine)  # they change this answer


def test_logit_bias_forces_a_token(client, engine):
    token = engine.tokenizer.encode(" red")[-1]
    text = ask(client, temperature=0, logit_bias={str(token): 100})
    assert text == mlx_reference(engine, processors=make_logits_processors(logit_bias={token: 100}))
    assert text == engine.tokenizer.decode([token] * 10)


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"min_p": 1.0}], ids=str)
def test_top_k_and_min_p_narrow_sampling(client, engine, extra):
    # at temperature 1.5 three seeds give three answers; keeping only the top token, the greedy one
    free = {ask(client, temperature=1.5, seed=seed) for seed in (1, 2, 3)}
    assert len(free) > 1
    narrowed = {ask(client, temperature=1.5, seed=seed, **extra) for seed in (1, 2, 3)}
    assert narrowed == {mlx_reference(engine)}


def test_logprobs_and_top_logprobs(client, engine):
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for entry in content:
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert entry.logprob == pytest.approx(top[0])  # greedy: the chosen token is the likeliest
        assert entry.top_logprobs[0].token == entry.token and entry.logprob <= 0
    # streamed, per chunk; the legacy completions form
    chunks = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content[:4]], abs=1e-4)
    legacy = client.completions.create(model="m", prompt="Once upon", max_tokens=3, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}}}}


def valid_person(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"name", "age", "tags"} and isinstance(value["name"], str)
            and len(value["name"]) <= 6 and type(value["age"]) is int and 0 <= value["age"] <= 120
            and isinstance(value["tags"], list) and len(value["tags"]) <= 2 and set(value["tags"]) <= {"a", "b"})


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "sampled"])
def test_json_schema_output_parses_and_validates(client, options):
    pytest.importorskip("llguidance")
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=200,
                                           response_format=response_format, **options)
    assert reply.choices[0].finish_reason == "stop"
    assert valid_person(json.loads(reply.choices[0].message.content))
    # streamed, in a batch with unconstrained requests
    chunks = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=200, stream=True,
                                            response_format=response_format, **options)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert valid_person(json.loads(text))


def test_json_object_output_is_an_object_or_a_prefix_of_one(client):
    pytest.importorskip("llguidance")
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=60, temperature=0,
                                           response_format={"type": "json_object"})
    text = reply.choices[0].message.content
    assert text.lstrip().startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_a_schema_that_cannot_be_followed_is_a_400(client):
    pytest.importorskip("llguidance")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MESSAGES, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=MESSAGES, response_format={"type": "yaml"})


@pytest.mark.parametrize("body,param", [({"seed": -1}, "seed"), ({"logit_bias": {"5": 500}}, "logit_bias"),
                                        ({"temperature": float("inf")}, "temperature")], ids=str)
def test_the_engines_sampling_check_answers_400(served, body, param):
    r = httpx.post(served.url + "/v1/chat/completions", timeout=30,
                   content=json.dumps({"messages": MESSAGES, **body}).replace("Infinity", "1e999"),
                   headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == param, r.text
