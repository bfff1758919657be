"""Tools: rendered by the chat template, calls parsed back into OpenAI tool_calls (streamed too).

A tiny bundle gets a tools-capable chat template (the Hermes/Qwen style mlx-lm parses with
its json_tools parser); its random weights cannot decide to call a tool, so the server-side
parsing is tested on forced outputs: a logits processor makes the model write a given text.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

import mlx.core as mx  # noqa: E402

import ifprune_mlx as ifp  # noqa: E402
from ifprune_mlx import batching, server, testing  # noqa: E402
from ifprune_mlx.tools import ToolCallText  # noqa: E402

TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>\n"
    "{% for tool_call in m.tool_calls %}{% set tool_call = tool_call.function %}"
    "<tool_call>{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}</tool_call>"
    "{% endfor %}<|end|>\n{% elif m.role == 'tool' %}<|user|>\n<tool_response>{{ m.content }}</tool_response><|end|>\n"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_bundle(models_dir):
    folder = testing.make_bundle(models_dir / "tools-bundle")
    (folder / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def engine(tools_bundle):
    return ifp.load(tools_bundle)


class Forced:
    """A logits processor that makes the model write `text` and then its end token."""

    def __init__(self, tokenizer, text: str):
        self.ids = list(tokenizer.encode(text, add_special_tokens=False)) + [tokenizer.eos_token_id]
        self.step = 0

    def __call__(self, tokens, logits):
        token = self.ids[min(self.step, len(self.ids) - 1)]
        self.step += 1
        keep = mx.arange(logits.shape[-1]) == token
        return mx.where(keep, logits, mx.array(-float("inf"), dtype=logits.dtype))


@pytest.fixture(scope="module")
def forced_server(tools_bundle):
    """A server whose model writes what forced["text"] says."""
    forced = {"text": CALL}
    running = server.BackgroundServer(lambda: ifp.load(tools_bundle), server.ServerConfig(model_id="m"))
    tokenizer = running.server.engine.tokenizer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batching, "logits_processors", lambda sampling: [Forced(tokenizer, forced["text"])])
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=60)
        yield client, forced
    running.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_forced_tool_call_comes_back_as_tool_calls(forced_server, stream):
    client, forced = forced_server
    forced["text"] = "Let me check. " + CALL
    reply = client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER], max_tokens=200,
                                           temperature=0, stream=stream)
    if stream:
        chunks = list(reply)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["tool_calls"] and calls[0].index == 0
    else:
        message = reply.choices[0].message
        content, calls, finish = message.content, message.tool_calls, reply.choices[0].finish_reason
        assert finish == "tool_calls"
    assert content == "Let me check. "
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}


def test_text_that_is_no_call_stays_content(forced_server):
    client, forced = forced_server
    forced["text"] = "No tool needed: <tool_call>not json</tool_call> done"
    reply = client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER], max_tokens=200, temperature=0)
    assert reply.choices[0].message.content == forced["text"] and not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "stop"


def test_tools_are_rendered_and_tool_messages_accepted(forced_server, engine):
    client, forced = forced_server
    forced["text"] = "It is sunny."
    conversation = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    reply = client.chat.completions.create(model="m", messages=conversation, tools=[WEATHER], max_tokens=40,
                                           temperature=0)
    assert reply.choices[0].message.content == "It is sunny."
    expected = engine.tokenizer.apply_chat_template(
        [conversation[0], {**conversation[1], "tool_calls": [{**conversation[1]["tool_calls"][0], "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]}, conversation[2]],
        tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert "<tool_response>sunny, 21 C</tool_response>" in expected and '"get_weather"' in expected
    assert reply.usage.prompt_tokens == len(engine.tokenizer.encode(expected, add_special_tokens=False))


def test_tool_choice_none_renders_no_tools_and_forcing_a_call_is_refused(forced_server):
    client, forced = forced_server
    forced["text"] = CALL  # without tools, a call's text is content
    reply = client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER], tool_choice="none",
                                           max_tokens=200, temperature=0)
    assert reply.choices[0].message.content == CALL and reply.choices[0].finish_reason == "stop"
    for options in ({"tool_choice": "required"}, {"tool_choice": {"type": "function", "function": {"name": "x"}}},
                    {"parallel_tool_calls": False}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER], **options)
        assert e.value.body["param"] == next(iter(options))


def test_a_template_without_tools_is_a_400(endless_bundle):
    running = server.BackgroundServer(lambda: ifp.load(endless_bundle), server.ServerConfig(model_id="m"))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER])
        assert e.value.body["param"] == "tools" and "renders no tools" in e.value.body["message"]
    finally:
        running.stop()


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
       before=st.sampled_from(["", "Sure. ", "<tool", "a < b "]), after=st.sampled_from(["", " ok", "<tool_c"]))
def test_splitting_does_not_depend_on_how_the_text_streams(engine, cuts, before, after):
    text = before + CALL + after + CALL
    splitter = ToolCallText(engine.tokenizer, [WEATHER])
    content, calls = "", []
    bounds = sorted({0, len(text), *[c % (len(text) + 1) for c in cuts]})
    for a, b in zip(bounds, bounds[1:]):
        piece, found = splitter.feed(text[a:b])
        content, calls = content + piece, calls + found
    rest, more = splitter.finish()
    content, calls = content + rest, calls + more
    assert content == before + after
    assert [c["index"] for c in calls] == [0, 1]
    assert all(json.loads(c["function"]["arguments"]) == {"city": "Paris"} for c in calls)
