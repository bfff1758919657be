"""The OpenAI side of `ifprune serve`: request schemas, errors and response objects.

Plain data: no HTTP framework here (pydantic only), so the schemas can be checked and the
response objects built anywhere. The routes are in server.py, the worker in scheduler.py.
"""

from __future__ import annotations

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
    # strict: "5" is not a number, 5.0 is not an integer; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Schema):
    include_usage: bool = False


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class Message(_Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

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
    # extensions: what to prune
    density: Optional[float] = None
    selector: Optional[str] = None
    dense: bool = False
    policy: Literal["per-task", "per-turn"] = "per-task"


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    echo: bool = False



# Accepted only at their neutral value: anything else would be silently ignored.
_NEUTRAL = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
            "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
            "functions": (None, []), "suffix": (None, ""), "best_of": (None, 1)}


def parse_request(schema: type[BaseModel], body: dict):
    """The request `body` checked against `schema`: APIError 422 (schema) or 400 (refused field)."""
    try:
        request = schema.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        # drop the union members pydantic names in a location ("prompt.str" -> "prompt")
        param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p.isidentifier()
                         and p not in ("str", "int", "float", "bool", "list", "dict"))
        raise APIError(422, f"{param or 'body'}: {first['msg']}", param=param or None,
                       code=first["type"]) from None
    for name, neutral in _NEUTRAL.items():
        if name in (request.model_extra or {}) and request.model_extra[name] not in neutral:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported")
    if request.n != 1:
        raise APIError(400, "n must be 1: this server generates one choice per request", param="n",
                       code="unsupported")
    return request


class Reply:
    """The OpenAI response objects of one request (chat.completion or text_completion)."""

    def __init__(self, chat: bool, model: str, report: dict):
        self.chat, self.model, self.report = chat, model, report
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, text: str, done: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": done["finish_reason"], "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": done["finish_reason"], "logprobs": None}
        return self._object("chat.completion" if self.chat else "text_completion", [choice],
                            usage=done["usage"], ifprune=done["ifprune"])

    def _chunk(self, content: str | None, finish: str | None, include_usage: bool, **extra) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {} if content is None else {"content": content},
                      "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
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

    def piece(self, text: str, include_usage: bool) -> dict:
        return self._chunk(text, None, include_usage)

    def last(self, done: dict, include_usage: bool) -> dict:
        return self._chunk(None, done["finish_reason"], include_usage, ifprune=done["ifprune"])

    def usage(self, done: dict) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [],
                            usage=done["usage"])

