"""A request as the worker runs it (Job), its token ids, and how its events reach the HTTP loop.

The worker thread hands events to the jobs' asyncio queues with post(): one
call_soon_threadsafe per event loop for all the events of a decode step (one wake-up of the
loop per step, not one per token), in order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from .chat import mask_key
from .errors import IFPruneError
from .selectors import Selection


@dataclass
class Job:
    """One request: what to run, and how its events reach the event loop."""

    prompt: object                   # chat messages (list of dicts) or the completion's text
    ids: list[int] | None            # the whole prompt's token ids (None: tokenized by the worker)
    task: object                     # what the trained predictor selects from
    sampling: dict                   # max_tokens, temp, top_p, top_k, min_p, seed, penalties, logprobs
    density: float | None
    selector: str                    # effective selector name ("" when dense)
    dense: bool
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    selection: Selection | None = None
    selected: bool = False           # selection known (computed, or dense)
    select_ms: float = 0.0
    error: Exception | None = None
    overtaken: int = 0
    constraint: object = None        # grammar.JsonConstraint of a response_format, made by the worker
    tools: list | None = None        # OpenAI tools the chat template renders

    @property
    def griffin(self) -> bool:
        """Selected by the training-free selector: the mask comes out of the dense prefill."""
        return not self.dense and self.selector == "activations"

    @property
    def solo(self) -> bool:
        """Runs alone: a mask known only after its own prefill, or a seeded draw (MLX's seed is global)."""
        return self.griffin or (self.sampling.get("seed") is not None and self.sampling["temp"] > 0)

    @property
    def key(self) -> str:
        """mask_key of its selection (known once selected)."""
        return mask_key(self.selection)

    def emit(self, kind: str, payload=None) -> None:
        """Hand an event to the request's handler (from the worker thread)."""
        post([(self, kind, payload)])

    def cancel(self) -> None:
        self.cancelled.set()


class RequestError(IFPruneError, ValueError):
    """A request the worker refuses (found when tokenizing): `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def prompt_ids(engine, prompt, tools: list | None = None) -> list[int]:
    """A job's token ids: chat messages through the chat template (with `tools`, if any), a
    completion's text as is.

    Raises RequestError for what the model cannot take (a template refusing the messages, an
    empty prompt, a prompt as long as the context)."""
    try:
        if tools:
            ids = engine.tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True)
        else:
            ids = engine.prompt_tokens(prompt) if isinstance(prompt, list) else engine.tokenizer.encode(prompt)
    except Exception as e:  # the chat template refuses these messages (jinja raises many types)
        raise RequestError(f"the chat template refuses these messages: {e}", "messages") from None
    if not ids:
        raise RequestError("the prompt is empty", "prompt")
    context = engine.context_length
    if context and len(ids) >= context:
        raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {context}",
                           "messages" if isinstance(prompt, list) else "prompt", "context_length_exceeded")
    return list(ids)


def post(events: list[tuple["Job", str, object]]) -> None:
    """Hand (job, kind, payload) events to their jobs' event loops, in order: one
    call_soon_threadsafe per loop (from the worker thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, kind, payload in events:
        by_loop.setdefault(job.loop, []).append((job.events, (kind, payload)))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: the server is going down
            pass


def _put_all(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
