"""`ifprune serve`: an OpenAI-compatible HTTP API over one Engine (Starlette + uvicorn).

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions
(streamed as server-sent events or not), GET /health. Requests may add `density`, `selector`
and `dense`; every response carries an `ifprune` object saying what ran.

One worker thread owns the Engine (it is not thread-safe, and MLX work stays on one thread).
Requests wait in a bounded FIFO queue (full: 503 + Retry-After). With mask affinity the worker
selects the masks of the oldest queued requests and runs first the one that swaps the fewest
rows from those in place (the same mask swaps none), so a mixed workload does not
swap rows back and forth; a request is passed over at most MAX_OVERTAKES times. Only masks
known before running take part (the trained predictor's, dense); the training-free selector's
mask comes out of the prompt's own dense prefill, so such a request runs in FIFO order.
Tokens go to the event loop through an asyncio queue per request; a client that disconnects
cancels its request, and a running generation stops at the next token. Per mask, a KV cache
(chat.MaskCaches, as in `ifprune chat`) lets a conversation's next request prefill only what
is new: by default a conversation keeps the mask its first user message selects (per task).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .chat import MaskCaches, mask_key
from .errors import IFPruneError, SelectionError
from .selectors import Selection, check_density

log = logging.getLogger("ifprune.serve")

AFFINITY_WINDOW = 16   # queued requests the scheduler looks at for a matching mask
MAX_OVERTAKES = 16     # how often a queued request may be passed over for a matching one


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

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=self.headers)


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


# -- jobs and the scheduler --------------------------------------------------------------------

@dataclass
class Job:
    """One request: what to run, and how its events reach the event loop."""

    prompt: object                   # chat messages (list of dicts) or the completion's text
    ids: list[int]                   # the whole prompt's token ids
    task: object                     # what the trained predictor selects from
    sampling: dict                   # max_tokens, temp, top_p, seed
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

    @property
    def griffin(self) -> bool:
        """Selected by the training-free selector: the mask comes out of the dense prefill."""
        return not self.dense and self.selector == "activations"

    def emit(self, kind: str, payload=None) -> None:
        """Hand an event to the request's handler (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is going down
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class Scheduler:
    """The worker thread that owns the Engine and runs queued jobs one at a time.

    Args:
        load: called on the worker thread to make the Engine.
        max_queue: most jobs waiting (the running one not counted).
        affinity: run queued jobs whose rows are in place first (see the module's doc).
        prompt_caches: KV caches kept (LRU), one per conversation and mask.
    """

    def __init__(self, load: Callable[[], object], *, max_queue: int = 64, affinity: bool = True,
                 prompt_caches: int = 16):
        self.max_queue, self.affinity, self.prompt_caches = max_queue, affinity, prompt_caches
        self.engine = None
        self.caches: MaskCaches | None = None
        self._load = load
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.running: Job | None = None
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "swaps": 0}
        self.last: dict | None = None      # result of the last finished job
        self._job_seconds = 1.0            # moving average, for Retry-After
        self._thread = threading.Thread(target=self._main, name="ifprune-engine", daemon=True)

    def start(self) -> None:
        """Start the worker and wait until the model is loaded; its load error is raised here."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the worker."""
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.cancel()
            if self.running is not None:
                self.running.cancel()
            self._cond.notify_all()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull (with a Retry-After in seconds) when the queue is full."""
        with self._cond:
            if len(self._pending) >= self.max_queue or self._stopping:
                wait = self._job_seconds * (len(self._pending) + 1)
                raise QueueFull(max(1, min(60, math.ceil(wait))))
            self._pending.append(job)
            self._cond.notify()

    # -- worker thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.engine = self._load()
            self.caches = MaskCaches(self.engine.model, self.prompt_caches, per_mask=self.prompt_caches)
        except BaseException as e:  # reported by start()
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._next()
            if job is None:
                return
            start = time.perf_counter()
            try:
                self._run(job)
            except Exception as e:  # a bug or an engine failure: this request fails, the server goes on
                if not isinstance(e, IFPruneError):
                    log.exception("generation failed")
                self.stats["failed"] += 1
                job.emit("error", e)
            finally:
                self.running = None
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - start)

    def _next(self) -> Job | None:
        """The next job to run (None: stopping). Cancelled queued jobs are dropped here."""
        with self._cond:
            while True:
                for job in [j for j in self._pending if j.cancelled.is_set()]:
                    self._pending.remove(job)
                    self.stats["cancelled"] += 1
                if self._stopping:
                    return None
                if self._pending:
                    break
                self._cond.wait()
            window = list(self._pending)[:AFFINITY_WINDOW] if self.affinity else []
        for job in window:  # the masks of queued jobs, where they are known before running
            if not job.selected and not job.griffin and job.error is None:
                self._select(job)
        with self._cond:
            head = self._pending[0]
            chosen = head
            if self.affinity and head.overtaken < MAX_OVERTAKES and self._swap_cost(head) is not None:
                costs = [(cost, i, job) for i, job in enumerate(window)
                         if job in self._pending and (cost := self._swap_cost(job)) is not None]
                chosen = min(costs, key=lambda c: c[:2])[2]
            for job in self._pending:
                if job is chosen:
                    break
                job.overtaken += 1
            self._pending.remove(chosen)
            self.running = chosen
            return chosen

    def _swap_cost(self, job: Job) -> int | None:
        """Rows running `job` would swap now (None: not known before it runs)."""
        if job.error is not None:
            return 0
        if not job.selected:
            return None
        return self.engine.swap_cost(job.selection)

    def _select(self, job: Job) -> None:
        if job.dense:
            job.selection, job.selected = None, True
            return
        start = time.perf_counter()
        try:
            job.selection = self.engine.select(job.task, job.density, job.selector)
            job.selected = True
        except IFPruneError as e:
            job.error = e
        job.select_ms = (time.perf_counter() - start) * 1000

    def _run(self, job: Job) -> None:
        engine = self.engine
        queue_ms = (time.perf_counter() - job.enqueued) * 1000
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            return
        if job.griffin:
            engine.apply("auto")
            before = engine.last_apply
            lease = None
            responses = engine.stream_responses(job.prompt, tokens=job.ids, density=job.density,
                                                selector=job.selector, **job.sampling)
        else:
            if not job.selected and job.error is None:
                self._select(job)
            if job.error is not None:
                raise job.error
            stats = engine.apply(job.selection)  # pinned: the lease's stream_responses uses it
            lease = self.caches.take(mask_key(job.selection), job.ids)
            responses = lease.stream(engine, job.prompt, **job.sampling)
        stopper = StopText(job.stop)
        finish, tokens, first = None, 0, None
        try:
            for response in responses:
                tokens = response.generation_tokens
                if first is None:
                    first = response
                    if job.griffin:  # select + apply happened inside the first step
                        stats = engine.last_apply if engine.last_apply is not before else None
                    report = self._report(job, stats, lease, queue_ms, first)
                    job.emit("start", report)
                text, stopped = stopper.feed(response.text)
                if text:
                    job.emit("text", text)
                if stopped:
                    finish = "stop"
                    break
                finish = response.finish_reason
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
        finally:
            responses.close()
        if first is None:
            raise RuntimeError("the engine produced no token")
        if finish != "stop":
            tail = stopper.flush()
            if tail:
                job.emit("text", tail)
        self.stats["swaps"] += report["swaps"]
        self.stats["cancelled" if finish == "cancelled" else "served"] += 1
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": tokens,
                 "total_tokens": len(job.ids) + tokens}
        self.last = {"finish_reason": finish, "usage": usage, "ifprune": report}
        job.emit("done", self.last)

    def _report(self, job: Job, stats, lease, queue_ms: float, first) -> dict:
        """The `ifprune` object of a response: what ran and what it cost."""
        engine = self.engine
        selection = None if job.dense else engine.applied
        if job.griffin and selection is not None:
            select_ms = selection.seconds * 1000  # the dense prefill that scores the channels
        else:
            select_ms = job.select_ms
        return {
            "selector": None if selection is None else selection.source,
            "density": 1.0 if selection is None else round(selection.density, 6),
            "kept": [engine.d_ffn] * engine.n_layers if selection is None else selection.kept_counts,
            "mask": mask_key(selection),
            "select_ms": round(select_ms, 3),
            "apply_ms": round(0.0 if stats is None else stats.seconds * 1000, 3),
            "swaps": 0 if stats is None else stats.swaps,
            "reused_tokens": 0 if lease is None else lease.reused,
            "prefill_tokens": first.prompt_tokens if lease is None else len(lease.feed),
            "queue_ms": round(queue_ms, 3),
        }


class StopText:
    """Cuts generated text at the first stop string; holds back what may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        self.held += text
        if not self.stops:
            out, self.held = self.held, ""
            return out, False
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[:min(hits)], ""
            return out, True
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# -- HTTP ----------------------------------------------------------------------------------

@dataclass
class ServerConfig:
    """What `ifprune serve` was started with."""

    model_id: str
    api_key: str | None = None
    density: float | None = None      # default density of requests (None: the model's)
    selector: str | None = None       # default selector of requests (None: the engine's)
    max_tokens: int = 4096            # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_body: int = 2_000_000         # bytes


class _Disconnected(Exception):
    """The client went away."""


async def _read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _parse(schema: type[BaseModel], body: dict):
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


class Server:
    """The Starlette app of `ifprune serve` around a started Scheduler."""

    def __init__(self, scheduler: Scheduler, config: ServerConfig):
        self.scheduler, self.config = scheduler, config
        self.engine = scheduler.engine
        self.created = int(time.time())
        routes = [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={
            HTTPException: self._http_error, APIError: self._api_error, Exception: self._bug,
        })
        if config.api_key:
            self.app.add_middleware(_BearerAuth, key=config.api_key)

    # -- routes ------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "ifprune"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["model_id"])
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        s = self.scheduler
        return JSONResponse({"status": "ok", "model": self.config.model_id, "busy": s.running is not None,
                             "queued": s.queued, "affinity": s.affinity, **s.stats, "last": s.last})

    async def chat_completions(self, request: Request) -> Response:
        body = _parse(ChatRequest, await _read_json(request, self.config.max_body))
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:  # off the event loop: a long conversation takes a while to template and tokenize
            ids = await asyncio.to_thread(self.engine.prompt_tokens, messages)
        except Exception as e:  # the chat template refuses these messages (jinja raises many types)
            raise APIError(400, f"the chat template refuses these messages: {e}", param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._serve(request, body, messages, ids, max_tokens, chat=True)

    async def completions(self, request: Request) -> Response:
        body = _parse(CompletionRequest, await _read_json(request, self.config.max_body))
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: give one prompt (batches are not supported)", param="prompt")
            prompt = prompt[0]
        if body.echo:
            raise APIError(400, "echo is not supported by this server", param="echo", code="unsupported")
        ids = await asyncio.to_thread(self.engine.tokenizer.encode, prompt)
        return await self._serve(request, body, prompt, ids, body.max_tokens, chat=False)

    # -- one request -------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model not in (None, self.config.model_id, "default"):
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.config.model_id!r} (or say \"default\")",
                           param="model", code="model_not_found")

    def _job(self, body: _Request, prompt, ids: list[int], max_tokens: int | None) -> Job:
        """Check what the engine would refuse, on the event loop, before the request queues."""
        config = self.config
        self._check_model(body.model)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        context = self.engine.config.get("max_position_embeddings")
        if context and len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is {context}",
                           param="messages", code="context_length_exceeded")
        max_tokens = config.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > config.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {config.max_tokens}",
                           param="max_tokens")
        if body.dense and (body.density is not None or body.selector is not None):
            raise APIError(400, "dense runs the full model: give dense, or density/selector, not both",
                           param="dense")
        try:
            density = body.density if body.density is not None else config.density
            density = None if density is None else check_density(density)
        except SelectionError as e:
            raise APIError(400, str(e), param="density") from None
        try:
            selector = "" if body.dense else self.engine.get_selector(body.selector or config.selector).name
        except SelectionError as e:
            raise APIError(400, str(e), param="selector") from None
        task = prompt
        if isinstance(prompt, list) and selector == "predictor":
            users = [m["content"] for m in prompt if m["role"] == "user"]
            if not users:
                raise APIError(400, "the messages hold no user message to select channels from",
                               param="messages")
            task = users[0] if body.policy == "per-task" else users[-1]
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 sequences", param="stop")
        sampling = {"max_tokens": max_tokens, "temp": 1.0 if body.temperature is None else body.temperature,
                    "top_p": 1.0 if body.top_p is None else body.top_p, "seed": body.seed}
        return Job(prompt=prompt, ids=list(ids), task=task, sampling=sampling, density=density, selector=selector,
                   dense=body.dense, stop=stop, loop=asyncio.get_running_loop())

    async def _serve(self, request: Request, body: _Request, prompt, ids, max_tokens, chat: bool) -> Response:
        job = self._job(body, prompt, ids, max_tokens)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({self.scheduler.max_queue} requests queued); retry later",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            kind, payload = await _next_event(job, gone)
            if kind == "error":
                raise _engine_error(payload)
            report = payload
            reply = _Reply(chat, self.config.model_id, report)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = self._stream(job, gone, reply, include_usage)
                gone = None  # the stream owns it now
                return StreamingResponse(stream, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            pieces = []
            while True:
                kind, payload = await _next_event(job, gone)
                if kind == "text":
                    pieces.append(payload)
                elif kind == "error":
                    raise _engine_error(payload)
                else:
                    return JSONResponse(reply.whole("".join(pieces), payload))
        except _Disconnected:
            return Response(status_code=499)
        finally:
            if gone is not None:
                job.cancel()
                gone.cancel()

    async def _stream(self, job: Job, gone: asyncio.Future, reply: "_Reply", include_usage: bool):
        try:
            for chunk in reply.opening(include_usage):
                yield _sse(chunk)
            while True:
                kind, payload = await _next_event(job, gone)
                if kind == "text":
                    yield _sse(reply.piece(payload, include_usage))
                elif kind == "error":
                    yield _sse({"error": _engine_error(payload).body()})
                    return
                else:
                    yield _sse(reply.last(payload, include_usage))
                    if include_usage:
                        yield _sse(reply.usage(payload))
                    yield "data: [DONE]\n\n"
                    return
        except _Disconnected:
            return
        finally:
            job.cancel()
            gone.cancel()

    # -- errors ------------------------------------------------------------------------

    async def _api_error(self, request: Request, e: APIError) -> Response:
        return e.response()

    async def _http_error(self, request: Request, e: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, message, code=code, headers=e.headers).response()

    async def _bug(self, request: Request, e: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return APIError(500, "internal server error", type="server_error").response()


def _engine_error(e: Exception) -> APIError:
    if isinstance(e, IFPruneError):
        return APIError(400, str(e))
    return APIError(500, "internal server error: the generation failed", type="server_error")

async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(job: Job, gone: asyncio.Future) -> tuple[str, object]:
    """The job's next event; raises _Disconnected (and cancels the job) if the client leaves first."""
    get = asyncio.ensure_future(job.events.get())
    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    job.cancel()
    raise _Disconnected


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Reply:
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


class _BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                what = "no API key given" if not given else "the API key is wrong"
                error = APIError(401, f"{what}: send the header `Authorization: Bearer KEY`",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- running it ----------------------------------------------------------------------------

def start(load: Callable[[], object], config: ServerConfig, *, max_queue: int = 64,
          affinity: bool = True, prompt_caches: int = 16) -> Server:
    """Load the engine on its worker thread and build the app (serve it with uvicorn)."""
    scheduler = Scheduler(load, max_queue=max_queue, affinity=affinity, prompt_caches=prompt_caches)
    scheduler.start()
    return Server(scheduler, config)


def uvicorn_server(server: Server, sock, log_level: str = "info"):
    """A uvicorn.Server for the app on an already bound socket (127.0.0.1 unless told otherwise)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=3, lifespan="off")
    return uvicorn.Server(config)


class BackgroundServer:
    """A server in a thread of this process, e.g. for tests, benchmarks or an app embedding it.

        running = BackgroundServer(lambda: ifprune_mlx.load(path), ServerConfig(model_id="m"))
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none")
        ...
        running.stop()

    Options are those of start(); port 0 picks a free port.
    """

    def __init__(self, load: Callable[[], object], config: ServerConfig, *, host: str = "127.0.0.1",
                 port: int = 0, log_level: str = "warning", **options):
        self.server = start(load, config, **options)
        sock = socket.socket()
        sock.bind((host, port))
        self._uvicorn = uvicorn_server(self.server, sock, log_level=log_level)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        while not self._uvicorn.started and self._thread.is_alive():
            time.sleep(0.02)
        self.url = f"http://{host}:{sock.getsockname()[1]}"

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(10)
        self.server.scheduler.stop()
