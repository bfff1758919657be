"""The OpenAI side of `ifprune serve`: request schemas, errors and response objects.

Plain data: no HTTP framework here (pydantic only), so the schemas can be checked and the
response objects built anywhere. The routes are in server.py, the worker in scheduler.py.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# -- errors ------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


# -- request schemas -----------------------------------------------------------------------

class _Schema(BaseModel):
    # strict: "5" is not a number, 5.0 is not an integer; parse_request checks the unknown fields
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Schema):
    include_usage: bool = False


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class Message(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[dict]] = None   # an assistant's earlier calls
    tool_call_id: Optional[str] = None        # a tool message answers this call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Request(_Schema):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict] = None
    # extensions: sampling, as mlx_lm.server and llama-server take it
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    # extensions: what to prune
    density: Optional[float] = None
    selector: Optional[str] = None
    dense: bool = False
    policy: Literal["per-task", "per-turn"] = "per-task"


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[dict]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: Optional[bool] = None


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)  # the legacy API: how many top tokens


# Fields this server cannot honour, accepted only at the values that ask for nothing: any
# other value is a 400 naming the field, never silently ignored.
REFUSED = {
    "functions": (None, []), "function_call": (None, "none"),
"modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,), "web_search_options": (None,),
    "moderation": (None,), "service_tier": (None, "auto", "default"), "store": (None, False),
    "prompt_cache_options": (None,), "prompt_cache_retention": (None,),
    "suffix": (None, ""), "best_of": (None, 1),
}
# Labels for the caller's own records: accepted, and by their meaning they change no output
# (prompt caching here is automatic, by shared prefix).
LABELS = ("user", "metadata", "safety_identifier", "prompt_cache_key")


def parse_request(schema: type[BaseModel], body: dict):
    """The request `body` checked against `schema`: APIError 422 (schema) or 400 (a field
    refused, unknown, or a value this server cannot honour)."""
    try:
        request = schema.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        # drop the union members pydantic names in a location ("prompt.str" -> "prompt")
        param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p.isidentifier()
                         and p not in ("str", "int", "float", "bool", "list", "dict"))
        raise APIError(422, f"{param or 'body'}: {first['msg']}", param=param or None,
                       code=first["type"]) from None
    for name, value in (request.model_extra or {}).items():
        if name in REFUSED:
            if value not in REFUSED[name]:
                raise APIError(400, f"{name} is not supported by this server (accepted only as "
                                    f"{' or '.join(json.dumps(v) for v in REFUSED[name])})",
                               param=name, code="unsupported")
        elif name not in LABELS:
            raise APIError(400, f"unknown field {name!r}: this server does not know it (docs/SERVER.md "
                                "lists the fields it takes)", param=name, code="unknown_field")
    if request.n != 1:
        raise APIError(400, "n must be 1: this server generates one choice per request", param="n",
                       code="unsupported")
    return request


def sampling(body: _Request, max_tokens: int, vocab_size: int | None) -> dict:
    """The sampling settings of a request, for the scheduler (mlx-lm's samplers and logits
    processors read them); APIError 400 for a logit_bias key that is not a token id."""
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < (vocab_size or 2**31):
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 to "
                                f"{(vocab_size or 2**31) - 1})", param="logit_bias")
        bias[int(key)] = value
    if isinstance(body, CompletionRequest):
        logprobs, top = body.logprobs is not None, body.logprobs or 0
    else:
        logprobs, top = bool(body.logprobs), body.top_logprobs or 0
        if top and not logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    response_format = body.response_format
    if response_format is not None and response_format.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"response_format.type is {response_format.get('type')!r}; expected \"text\", "
                            "\"json_object\" or \"json_schema\"", param="response_format")
    if response_format is not None and response_format["type"] == "text":
        response_format = None
    return {"max_tokens": max_tokens, "response_format": response_format, "temp": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k or 0,
            "min_p": body.min_p or 0.0, "seed": body.seed, "logit_bias": bias,
            "repetition_penalty": body.repetition_penalty, "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty, "logprobs": logprobs, "top_logprobs": top}


class Reply:
    """The OpenAI response objects of one request (chat.completion or text_completion)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._offset = 0  # characters sent so far (the legacy logprobs' text_offset)

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _logprobs(self, entries: list[dict] | None) -> dict | None:
        """OpenAI's logprobs object of these tokens: chat's `content` list, or the legacy form."""
        if not entries:
            return None
        if self.chat:
            return {"content": entries, "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(self._offset)
            self._offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def whole(self, text: str, done: dict, logprobs: list[dict] | None = None,
              tool_calls: list[dict] | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            if tool_calls:
                calls = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls]
                choice["message"] = {"role": "assistant", "content": text or None, "tool_calls": calls}
        else:
            choice = {"index": 0, "text": text}
        finish = "tool_calls" if tool_calls else done["finish_reason"]
        choice.update(finish_reason=finish, logprobs=self._logprobs(logprobs))
        return self._object("chat.completion" if self.chat else "text_completion", [choice],
                            usage=done["usage"], ifprune=done["ifprune"])

    def _chunk(self, content: str | None, finish: str | None, include_usage: bool,
               logprobs: list[dict] | None = None, **extra) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {} if content is None else {"content": content}}
        else:
            choice = {"index": 0, "text": content or ""}
        choice.update(finish_reason=finish, logprobs=self._logprobs(logprobs))
        usage = {"usage": None} if include_usage else {}
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [choice],
                            **usage, **extra)

    def opening(self, include_usage: bool) -> list[dict]:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return []
        chunk = self._chunk("", None, include_usage)
        chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return [chunk]

    def piece(self, text: str, include_usage: bool, logprobs: list[dict] | None = None) -> dict:
        return self._chunk(text, None, include_usage, logprobs)

    def calls(self, tool_calls: list[dict], include_usage: bool) -> dict:
        chunk = self._chunk(None, None, include_usage)
        chunk["choices"][0]["delta"] = {"tool_calls": tool_calls}
        return chunk

    def last(self, done: dict, include_usage: bool, called: bool = False) -> dict:
        finish = "tool_calls" if called else done["finish_reason"]
        return self._chunk(None, finish, include_usage, ifprune=done["ifprune"])

    def usage(self, done: dict) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [],
                            usage=done["usage"])
