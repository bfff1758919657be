"""Tool calls: OpenAI `tools` through the model's chat template, calls parsed back (no HTTP).

The chat template renders the tools (the `tools` variable of Hugging Face chat templates);
the model answers a call between its tool-call markers, which mlx-lm's tokenizer wrapper
knows together with the parser of the model family (mlx_lm.tool_parsers, inferred from the
template, as mlx_lm.server uses them). ToolCallText splits the generated text, as it streams,
into the content and the calls, each an OpenAI tool call.
"""

from __future__ import annotations

import json
import uuid


def supports_tools(tokenizer) -> bool:
    """Whether the model's chat template renders tools and mlx-lm knows how to parse its calls."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return bool(getattr(tokenizer, "has_tool_calling", False)) and "tools" in template


def held_prefix(text: str, marker: str) -> int:
    """Characters at the end of `text` that may begin `marker` (held back until it is known)."""
    return max((n for n in range(1, len(marker)) if text.endswith(marker[:n])), default=0)


def template_message(message: dict) -> dict:
    """An OpenAI message as chat templates take it: tool-call arguments as objects, not JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = []
    for call in calls:
        function = dict(call.get("function") or {})
        try:
            function["arguments"] = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError):
            pass  # templates that print the text get it as is
        out.append({**call, "function": function})
    return {**message, "tool_calls": out}


class ToolCallText:
    """Splits streamed text into content and tool calls.

        splitter = ToolCallText(tokenizer, tools)
        content, calls = splitter.feed(piece)    # per piece of generated text
        content, calls = splitter.finish()       # at the end
    """

    def __init__(self, tokenizer, tools: list[dict]):
        self.start, self.end = tokenizer.tool_call_start, tokenizer.tool_call_end
        self.parser, self.tools = tokenizer.tool_parser, tools
        self.buffer, self.inside, self.count = "", False, 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content safe to send now, tool calls completed by this piece)."""
        self.buffer += text
        content, calls = "", []
        while True:
            if not self.inside:
                i = self.buffer.find(self.start)
                if i < 0:
                    cut = len(self.buffer) - held_prefix(self.buffer, self.start)
                    content, self.buffer = content + self.buffer[:cut], self.buffer[cut:]
                    return content, calls
                content, self.buffer, self.inside = content + self.buffer[:i], self.buffer[i + len(self.start):], True
            else:
                j = self.buffer.find(self.end) if self.end else -1
                if j < 0:
                    return content, calls
                parsed, text = self._parse(self.buffer[:j])
                calls, content = calls + parsed, content + text
                self.buffer, self.inside = self.buffer[j + len(self.end):], False

    def finish(self) -> tuple[str, list[dict]]:
        """What is left at the end: a call without its end marker is parsed if it can be
        (a model may stop right after the call), else it is content; nothing is lost."""
        rest, self.buffer = self.buffer, ""
        if not self.inside:
            return rest, []
        self.inside = False
        calls, text = self._parse(rest)
        return text, calls

    def _parse(self, text: str) -> tuple[list[dict], str]:
        """(OpenAI tool calls of one call's text, ""), or ([], the text with its markers) when
        it does not parse."""
        try:
            parsed = self.parser(text, self.tools)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):  # parsers raise these on bad text
            return [], f"{self.start}{text}{self.end or ''}"
        calls = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(call, dict) or "name" not in call:
                return [], f"{self.start}{text}{self.end or ''}"
            arguments = call.get("arguments", {})
            calls.append({"index": self.count, "id": call.get("id") or "call_" + uuid.uuid4().hex[:24],
                          "type": "function",
                          "function": {"name": call["name"], "arguments": arguments if isinstance(arguments, str)
                                       else json.dumps(arguments, ensure_ascii=False)}})
            self.count += 1
        return calls, ""
