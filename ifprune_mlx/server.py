"""`ifprune serve`: an OpenAI-compatible HTTP API over one Engine (Starlette + uvicorn).

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions
(streamed as server-sent events or not), GET /health, and GET /live (liveness, no key).
Requests may add `density`, `selector`, `dense` and `policy`; every response carries an
`ifprune` object saying what ran. The worker that runs them is scheduler.py with batching.py
(no HTTP), the request schemas and response objects are openai_api.py, structured output
grammar.py and tool calls tools.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .batching import check_request_sampling
from .errors import IFPruneError, SamplingError, SelectionError
from .openai_api import APIError, ChatRequest, CompletionRequest, Reply, _Request, parse_request, sampling
from .scheduler import Job, QueueFull, RequestError, Scheduler, WorkerStopped
from .selectors import check_density
from .tools import ToolCallText, supports_tools, template_message

log = logging.getLogger("ifprune.serve")


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
    read_timeout: float = 30.0        # seconds the body may pause while it arrives (408 after)
    keepalive: float = 10.0           # seconds between SSE comments while a stream waits for its first token
    cors: list[str] = field(default_factory=list)  # origins allowed to call from a browser ("*": any)


def _valid_text(text: str) -> str:
    """The text with lone surrogates (valid JSON escapes, not characters) made U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _task(messages, policy: str):
    """What the trained predictor selects a chat's mask from: per task, the system message
    (the task instruction) when there is one, else the first user message; per turn, the
    last user message (as engine.generate). A completion's text is its own task."""
    if not isinstance(messages, list):
        return messages
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise APIError(400, "the messages hold no user message to select channels from", param="messages")
    if policy == "per-turn":
        return users[-1]
    system = [m["content"] for m in messages if m["role"] in ("system", "developer") and m["content"].strip()]
    return system[0] if system else users[0]


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse({"error": e.body()}, status_code=e.status, headers=e.headers)


class _Disconnected(Exception):
    """The client went away."""


async def _read_json(request: Request, limit: int, timeout: float) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    body = request.stream()
    while True:  # each piece of the body must come within `timeout` seconds
        try:
            chunk = await asyncio.wait_for(body.__anext__(), timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="timeout") from None
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
            Route("/live", self.live, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={
            HTTPException: self._http_error, APIError: self._api_error, Exception: self._bug,
        })
        if config.api_key:
            self.app.add_middleware(_BearerAuth, key=config.api_key, open_paths=("/live",))
        if config.cors:  # outermost: a browser's preflight carries no key
            self.app.add_middleware(CORSMiddleware, allow_origins=config.cors, allow_methods=["GET", "POST"],
                                    allow_headers=["Authorization", "Content-Type"], max_age=600)

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
        state = s.state
        return JSONResponse({"status": "ok" if state != "dead" else "dead", "worker": state,
                             "model": self.config.model_id, "busy": s.running > 0, "running": s.running,
                             "queued": s.queued, "affinity": s.affinity, **s.stats, "last": s.last},
                            status_code=503 if state == "dead" else 200)

    async def live(self, request: Request) -> Response:
        """Liveness, without the key: the worker's state only (503 when its thread is dead)."""
        state = self.scheduler.state
        return JSONResponse({"status": "dead" if state == "dead" else "ok", "worker": state},
                            status_code=503 if state == "dead" else 200)

    async def chat_completions(self, request: Request) -> Response:
        with self.scheduler.arriving() as arrival:
            body = parse_request(ChatRequest, await _read_json(request, self.config.max_body, self.config.read_timeout))
            messages = [_message(m) for m in body.messages]
            max_tokens = body.max_completion_tokens or body.max_tokens
            job = self._submit(body, messages, max_tokens, arrival, tools=self._tools(body))
        return await self._serve(request, body, job, chat=True)

    def _tools(self, body: ChatRequest) -> list[dict] | None:
        """The tools the chat template renders (None: none); APIError for what cannot be honoured."""
        if not body.tools or body.tool_choice == "none":
            return None
        if body.tool_choice not in (None, "auto"):
            raise APIError(400, "tool_choice: only \"auto\" and \"none\" are supported (this server cannot force "
                                "a call)", param="tool_choice", code="unsupported")
        if body.parallel_tool_calls is False:
            raise APIError(400, "parallel_tool_calls: false is not supported (every call the model makes is "
                                "returned)", param="parallel_tool_calls", code="unsupported")
        if not supports_tools(self.engine.tokenizer):
            raise APIError(400, f"tools: the chat template of {self.config.model_id} renders no tools (or mlx-lm "
                                "knows no parser for its calls); send the request without tools",
                           param="tools", code="unsupported")
        return body.tools

    async def completions(self, request: Request) -> Response:
        with self.scheduler.arriving() as arrival:
            body = parse_request(CompletionRequest, await _read_json(request, self.config.max_body, self.config.read_timeout))
            prompt = body.prompt
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise APIError(400, "prompt: give one prompt (batches are not supported)", param="prompt")
                prompt = prompt[0]
            prompt = _valid_text(prompt)
            if body.echo:
                raise APIError(400, "echo is not supported by this server", param="echo", code="unsupported")
            job = self._submit(body, prompt, body.max_tokens, arrival)
        return await self._serve(request, body, job, chat=False)

    # -- one request -------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model not in (None, self.config.model_id, "default"):
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.config.model_id!r} (or say \"default\")",
                           param="model", code="model_not_found")

    def _job(self, body: _Request, prompt, max_tokens: int | None) -> Job:
        """Check what the engine would refuse, on the event loop, before the request queues
        (the worker tokenizes: the prompt's length is checked there)."""
        config = self.config
        self._check_model(body.model)
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
        task = _task(prompt, body.policy) if selector == "predictor" else prompt
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 sequences", param="stop")
        options = sampling(body, max_tokens, self.engine.config.get("vocab_size"))
        try:  # the engine's check, before the request queues
            check_request_sampling(options)
        except SamplingError as e:
            name = str(e).split()[0].rstrip(":")
            raise APIError(400, str(e), param={"temp": "temperature"}.get(name, name)) from None
        return Job(prompt=prompt, ids=None, task=task, sampling=options, density=density, selector=selector,
                   dense=body.dense, stop=stop, loop=asyncio.get_running_loop())

    def _submit(self, body: _Request, prompt, max_tokens, arrival, tools: list[dict] | None = None) -> Job:
        """Queue the request's job (APIError 503 when the queue is full or the worker has stopped)."""
        job = self._job(body, prompt, max_tokens)
        job.tools = tools
        try:
            self.scheduler.submit(job, arrival)
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({self.scheduler.max_queue} requests queued); retry later",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except WorkerStopped as e:
            raise APIError(503, str(e), type="server_error", code="worker_stopped") from None
        return job

    async def _serve(self, request: Request, body: _Request, job: Job, chat: bool) -> Response:
        tools = job.tools
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            kind, payload = await _next_event(job, gone, skip=("progress",))  # "queued" once tokenized
            if kind == "error":
                raise _engine_error(payload)
            reply = Reply(chat, self.config.model_id)
            calls = ToolCallText(self.engine.tokenizer, tools) if tools else None
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = self._stream(job, gone, reply, include_usage, calls)
                gone = None  # the stream owns it now
                return StreamingResponse(stream, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            pieces, logprobs = [], []
            while True:
                kind, payload = await _next_event(job, gone, skip=("queued", "progress", "start"))
                if kind == "text":
                    pieces.append(payload[0])
                    logprobs += payload[1] or []
                elif kind == "error":
                    raise _engine_error(payload)
                else:
                    text, tool_calls = "".join(pieces), []
                    if calls is not None:
                        content, tool_calls = calls.feed(text)
                        rest, more = calls.finish()
                        text, tool_calls = content + rest, tool_calls + more
                    return JSONResponse(reply.whole(text, payload, logprobs, tool_calls))
        except _Disconnected:
            return Response(status_code=499)
        finally:
            if gone is not None:
                job.cancel()
                gone.cancel()

    async def _stream(self, job: Job, gone: asyncio.Future, reply: "Reply", include_usage: bool,
                      calls: ToolCallText | None):
        """The SSE stream; until the first token, a comment every `keepalive` seconds and per
        prefill chunk keeps proxies from closing an idle connection. With tools, the text of a
        call is held until it has ended, then sent as a tool_calls delta."""
        started = False
        try:
            for chunk in reply.opening(include_usage):
                yield _sse(chunk)
            while True:
                wait = None if started else self.config.keepalive
                kind, payload = await _next_event(job, gone, timeout=wait)
                if kind in ("keepalive", "queued"):
                    yield ": keepalive\n\n"
                elif kind == "progress":
                    yield f": keepalive {payload[0]}/{payload[1]}\n\n"
                elif kind == "start":
                    started = True
                elif kind == "text":
                    for chunk in _pieces(reply, payload[0], payload[1], include_usage, calls.feed if calls else None):
                        yield chunk
                elif kind == "error":
                    yield _sse({"error": _engine_error(payload).body()})
                    return
                else:
                    if calls is not None:
                        for chunk in _pieces(reply, "", None, include_usage, lambda _: calls.finish()):
                            yield chunk
                    yield _sse(reply.last(payload, include_usage, called=bool(calls and calls.count)))
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
        return error_response(e)

    async def _http_error(self, request: Request, e: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(APIError(e.status_code, message, code=code, headers=e.headers))

    async def _bug(self, request: Request, e: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return error_response(APIError(500, "internal server error", type="server_error"))


def _pieces(reply: Reply, text: str, logprobs, include_usage: bool, split) -> list[str]:
    """SSE events of a piece of text: content (tool-call text split off by `split`), then calls."""
    found = []
    if split is not None:
        text, found = split(text)
    out = [_sse(reply.piece(text, include_usage, logprobs))] if text or logprobs else []
    if found:
        out.append(_sse(reply.calls(found, include_usage)))
    return out


def _message(m) -> dict:
    """A request's message as the chat template takes it (lone surrogates made U+FFFD)."""
    message = {"role": m.role, "content": _valid_text(m.text())}
    if m.tool_calls:
        message["tool_calls"] = m.tool_calls
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return template_message(message)


def _engine_error(e: Exception) -> APIError:
    if isinstance(e, WorkerStopped):
        return APIError(503, str(e), type="server_error", code="worker_stopped")
    if isinstance(e, RequestError):
        return APIError(400, str(e), param=e.param, code=e.code)
    if isinstance(e, IFPruneError):
        return APIError(400, str(e))
    return APIError(500, "internal server error: the generation failed", type="server_error")

async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(job: Job, gone: asyncio.Future, skip: tuple = (),
                      timeout: float | None = None) -> tuple[str, object]:
    """The job's next event not of the kinds in `skip`, or ("keepalive", None) after `timeout`
    seconds without one; raises _Disconnected (and cancels the job) if the client leaves first."""
    while True:
        if not job.events.empty():  # already there (the worker hands a step's events at once): no waiting
            kind, payload = job.events.get_nowait()
        else:
            get = asyncio.ensure_future(job.events.get())
            await asyncio.wait({get, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                if not gone.done():
                    return "keepalive", None
                job.cancel()
                raise _Disconnected
            kind, payload = get.result()
        if kind not in skip:
            return kind, payload


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer KEY` (but `open_paths`)."""

    def __init__(self, app, key: str, open_paths: tuple[str, ...] = ()):
        self.app, self.key, self.open_paths = app, key.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                what = "no API key given" if not given else "the API key is wrong"
                error = APIError(401, f"{what}: send the header `Authorization: Bearer KEY`",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- running it ----------------------------------------------------------------------------

def start(load: Callable[[], object], config: ServerConfig, **options) -> Server:
    """Load the engine on its worker thread and build the app (serve it with uvicorn).
    Options are Scheduler's: max_queue, affinity, prompt_caches, max_batch."""
    scheduler = Scheduler(load, **options)
    scheduler.start()
    return Server(scheduler, config)


def uvicorn_server(server: Server, sock, log_level: str = "info", max_connections: int | None = None,
                   idle_timeout: float = 5.0):
    """A uvicorn.Server for the app on an already bound socket (127.0.0.1 unless told otherwise).
    max_connections: connections served at once (uvicorn answers 503 beyond); idle_timeout:
    seconds a kept-alive connection may stay idle."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=3,
                            # uvicorn counts the connection being answered too
                            limit_concurrency=None if max_connections is None else max_connections + 1,
                            timeout_keep_alive=idle_timeout)
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
                 port: int = 0, log_level: str = "warning", max_connections: int | None = None, **options):
        self.server = start(load, config, **options)
        sock = socket.socket()
        sock.bind((host, port))
        self._uvicorn = uvicorn_server(self.server, sock, log_level=log_level, max_connections=max_connections)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        while not self._uvicorn.started and self._thread.is_alive():
            time.sleep(0.02)
        self.url = f"http://{host}:{sock.getsockname()[1]}"

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(10)
        self.server.scheduler.stop()
