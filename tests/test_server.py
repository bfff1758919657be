"""`ifprune serve`: the OpenAI-compatible server, driven with the official `openai` client.

Most tests share one server: the real command (`ifprune serve`) in a subprocess on 127.0.0.1
and a free port, serving a tiny bundle whose greedy answers never end early. Outputs are
compared with engine.generate on the same model, loaded here. The scheduler's mask affinity
and the full queue are tested in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import mlx.core as mx  # noqa: E402

import ifprune_mlx as ifp  # noqa: E402
from ifprune_mlx import server  # noqa: E402
from ifprune_mlx.scheduler import LET_IN_ROUNDS, MAX_OVERTAKES, Job, Scheduler  # noqa: E402
from ifprune_mlx.chat import mask_key  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
TASK = "Write a Python function that reverses a list."
START_TIMEOUT = 120  # seconds for the server to load and answer /health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A running server: its base URL, an openai client and raw httpx access."""

    def __init__(self, url: str, key: str | None, retries: int = 0):
        self.url, self.key = url, key
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=retries, timeout=60)

    def headers(self, key: str | None = "") -> dict:
        key = self.key if key == "" else key
        return {} if key is None else {"Authorization": f"Bearer {key}"}

    def health(self) -> dict:
        r = httpx.get(self.url + "/health", headers=self.headers(), timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, content: bytes, key: str | None = "", **headers) -> httpx.Response:
        return httpx.post(self.url + path, content=content, timeout=30,
                          headers={"Content-Type": "application/json", **self.headers(key), **headers})


def wait_healthy(served: Served, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"ifprune serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            served.health()
            return
        except (httpx.HTTPError, AssertionError):
            time.sleep(0.2)
    pytest.fail(f"ifprune serve did not answer within {START_TIMEOUT} s")


@pytest.fixture(scope="module")
def api(endless_bundle, tmp_path_factory):
    """`ifprune serve BUNDLE --api-key KEY` in a subprocess."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ifprune_mlx.cli", "serve", str(endless_bundle), "--port", str(port),
             "--api-key", KEY, "--max-tokens", "4096", "--max-body-mb", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Served(f"http://127.0.0.1:{port}", KEY)
    try:
        wait_healthy(served, process, log)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="module")
def engine(endless_bundle):
    """The same model, loaded here: the reference the server's answers are compared with."""
    return ifp.load(endless_bundle)


def reference(engine, prompt, *, task: str | None = None, **options) -> str:
    """engine.generate at temperature 0. dense=True: the full model; task: the mask the
    predictor selects from `task` is pinned (the server's per-task policy)."""
    dense = options.pop("dense", False)
    if dense or task is not None:
        engine.apply(None if dense else engine.select(task, options.pop("density", None)))
        try:
            return engine.generate(prompt, **options)
        finally:
            engine.apply("auto")
    return engine.generate(prompt, **options)


def raw(engine, text: str) -> list[int]:
    """A completion's prompt tokens: the text as is, no chat template."""
    return engine.tokenizer.encode(text)


def chat(served, messages, stream=False, **options):
    """(text, finish_reason, ifprune report, usage) of a chat completion."""
    extra = {k: options.pop(k) for k in ("density", "selector", "dense", "policy") if k in options}
    options.setdefault("temperature", 0)
    response = served.client.chat.completions.create(
        model="default", messages=messages, stream=stream, extra_body=extra or None, **options)
    if not stream:
        choice = response.choices[0]
        return choice.message.content, choice.finish_reason, response.model_extra["ifprune"], response.usage
    pieces, finish, report, usage = [], None, None, None
    for chunk in response:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                finish, report = chunk.choices[0].finish_reason, chunk.model_extra["ifprune"]
        if chunk.usage:
            usage = chunk.usage
    return "".join(pieces), finish, report, usage


def complete(served, prompt, stream=False, **options):
    extra = {k: options.pop(k) for k in ("density", "selector", "dense") if k in options}
    options.setdefault("temperature", 0)
    response = served.client.completions.create(model="default", prompt=prompt, stream=stream,
                                                extra_body=extra or None, **options)
    if not stream:
        return response.choices[0].text, response.choices[0].finish_reason, response.model_extra["ifprune"]
    pieces, finish, report = [], None, None
    for chunk in response:
        pieces.append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason:
            finish, report = chunk.choices[0].finish_reason, chunk.model_extra["ifprune"]
    return "".join(pieces), finish, report


# -- what it answers -----------------------------------------------------------------------

def test_models(api, endless_bundle):
    assert [m.id for m in api.client.models.list()] == [endless_bundle.name]
    assert api.client.models.retrieve("default").id == endless_bundle.name
    with pytest.raises(openai.NotFoundError):
        api.client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_matches_engine_generate(api, engine, stream):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": TASK}]
    text, finish, report, usage = chat(api, messages, stream, max_tokens=12,
                                       stream_options={"include_usage": True} if stream else None)
    # per task: the system message (the task instruction) selects the mask
    assert text == reference(engine, messages, task="Answer briefly.", max_tokens=12)
    assert finish == "length"
    assert usage.prompt_tokens == len(engine.prompt_tokens(messages)) and usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12
    sel = engine.select("Answer briefly.")
    assert report["mask"] == mask_key(sel)
    assert report["selector"] == "predictor" and report["kept"] == sel.kept_counts
    assert report["density"] == pytest.approx(sel.density)
    assert report["reused_tokens"] + report["prefill_tokens"] == usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_match_engine_generate_on_the_raw_text(api, engine, stream):
    prompt = "Once upon a time a small model"
    text, finish, report = complete(api, prompt, stream, max_tokens=10)
    assert text == reference(engine, prompt, tokens=raw(engine, prompt), max_tokens=10)
    assert finish == "length" and report["selector"] == "predictor"


@pytest.mark.parametrize("fields", [{"density": 0.5}, {"dense": True}, {"selector": "activations"},
                                    {"selector": "activations", "density": 0.75}])
def test_extension_fields_prune_as_the_engine_does(api, engine, fields):
    text, _, report, _ = chat(api, [{"role": "user", "content": TASK}], max_tokens=8, **fields)
    assert text == reference(engine, TASK, max_tokens=8, **fields)
    if fields.get("dense"):
        assert report["selector"] is None and report["density"] == 1.0
        assert report["kept"] == [engine.d_ffn] * engine.n_layers
    else:
        assert report["selector"] == fields.get("selector", "predictor")
        assert report["kept"] == [engine.kept_count(fields.get("density"))] * engine.n_layers
    prompt = "Sort these numbers: 5 3 9 1."
    text, _, report = complete(api, prompt, max_tokens=8, **fields)
    assert text == reference(engine, prompt, tokens=raw(engine, prompt), max_tokens=8, **fields)


def test_a_conversation_keeps_its_mask_and_reuses_its_prefix(api, engine):
    task = "Translate the sentence into French, please."
    messages = [{"role": "user", "content": task}]
    first, _, first_report, _ = chat(api, messages, max_tokens=6)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And into Spanish?"}]
    text, _, report, usage = chat(api, messages, max_tokens=6)
    assert report["mask"] == first_report["mask"]  # per task: the first user message selects
    assert report["reused_tokens"] > first_report["prefill_tokens"] // 2 and report["swaps"] == 0
    assert report["reused_tokens"] + report["prefill_tokens"] == usage.prompt_tokens
    assert text == reference(engine, messages, task=task, max_tokens=6)
    # per turn: the last user message selects, as engine.generate does
    text, _, report, _ = chat(api, messages, max_tokens=6, policy="per-turn")
    assert report["mask"] == mask_key(engine.select("And into Spanish?"))
    assert text == reference(engine, messages, max_tokens=6)


def test_sse_stream_ends_with_done_and_usage(api):
    body = {"model": "default", "messages": [{"role": "user", "content": TASK}], "max_tokens": 4,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, headers=api.headers(), timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith(("data: ", ": keepalive")) for line in lines)  # SSE comments while waiting
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and "ifprune" in chunks[-2]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_cuts_at_the_first_stop_string(api, engine, stream):
    whole = reference(engine, TASK, max_tokens=16)
    stop = whole[6:8]
    text, finish, *_ = chat(api, [{"role": "user", "content": TASK}], stream, max_tokens=16, stop=[stop, "never"])
    assert text == whole[:whole.index(stop)] and finish == "stop"


def test_seeded_sampling_is_reproducible(api, engine):
    options = dict(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a, *_ = chat(api, [{"role": "user", "content": TASK}], **options)
    b, *_ = chat(api, [{"role": "user", "content": TASK}], **options)
    assert a == b == engine.generate(TASK, max_tokens=8, temp=1.0, top_p=0.9, seed=7)
    others = {chat(api, [{"role": "user", "content": TASK}], **dict(options, seed=seed))[0] for seed in (1, 2, 3)}
    assert others - {a}  # the seed is what makes them equal


# -- bad requests ----------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]
BAD = [
    # (name, path, body, key, status, code or param)
    ("not json", "/v1/chat/completions", b"{nope", "", 400, "invalid_json"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", "", 400, "invalid_json"),
    ("no messages", "/v1/chat/completions", {"model": "default"}, "", 422, "missing"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, "", 422, "too_short"),
    ("messages a string", "/v1/chat/completions", {"messages": "hi"}, "", 422, "list_type"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "", 422, "literal_error"),
    ("max_tokens a string", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "5"}, "", 422, "int_type"),
    ("max_tokens 0", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "", 422, "greater_than_equal"),
    ("max_tokens too many", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**6}, "", 400, "max_tokens"),
    ("temperature a string", "/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, "", 422, "float_type"),
    ("density 0", "/v1/chat/completions", {"messages": MESSAGES, "density": 0}, "", 400, "density"),
    ("density 1.5", "/v1/chat/completions", {"messages": MESSAGES, "density": 1.5}, "", 400, "density"),
    ("density a string", "/v1/chat/completions", {"messages": MESSAGES, "density": "half"}, "", 422, "float_type"),
    ("bad policy", "/v1/chat/completions", {"messages": MESSAGES, "policy": "often"}, "", 422, "literal_error"),
    ("no user message", "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, "", 400,
     "messages"),
    ("dense and density", "/v1/chat/completions", {"messages": MESSAGES, "dense": True, "density": 0.5}, "", 400, "dense"),
    ("unknown selector", "/v1/chat/completions", {"messages": MESSAGES, "selector": "oracle"}, "", 400, "selector"),
    ("n 2", "/v1/chat/completions", {"messages": MESSAGES, "n": 2}, "", 400, "unsupported"),
    ("tools", "/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "", 400, "tools"),
    ("unknown field", "/v1/chat/completions", {"messages": MESSAGES, "temprature": 0}, "", 400, "unknown_field"),
    ("top_logprobs alone", "/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "", 400, "top_logprobs"),
    ("logit_bias not a token", "/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"x": 1}}, "", 400,
     "logit_bias"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}, "", 404, "model_not_found"),
    ("prompt too long", "/v1/completions", {"prompt": "x " * 3000}, "", 400, "context_length_exceeded"),
    ("prompt missing", "/v1/completions", {"max_tokens": 3}, "", 422, "missing"),
    ("prompt tokens", "/v1/completions", {"prompt": [1, 2, 3]}, "", 422, "string_type"),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, "", 400, "prompt"),
    ("unknown route", "/v1/embeddings", {"input": "x"}, "", 404, "not_found"),
    ("no key", "/v1/chat/completions", {"messages": MESSAGES}, None, 401, "invalid_api_key"),
    ("wrong key", "/v1/chat/completions", {"messages": MESSAGES}, "guess", 401, "invalid_api_key"),
    ("huge body", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 1_500_000}]}, "", 413,
     "request_too_large"),
]


@pytest.mark.parametrize("name,path,body,key,status,what", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_an_openai_error(api, name, path, body, key, status, what):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = api.post(path, content, key=key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert what in (error["code"], error["param"]) and error["message"] and "Traceback" not in r.text
    assert api.health()["status"] == "ok"


def test_bad_requests_through_the_openai_client(api):
    bad_key = openai.OpenAI(base_url=api.url + "/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        api.client.chat.completions.create(model="llama-70b", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="density"):
        api.client.chat.completions.create(model="default", messages=MESSAGES, extra_body={"density": 7})
    with pytest.raises(openai.UnprocessableEntityError):
        api.client.chat.completions.create(model="default", messages=MESSAGES, max_tokens="many")
    assert chat(api, MESSAGES, max_tokens=2)[1] == "length"  # still serving


def test_wrong_method_and_chunked_huge_body(api):
    r = httpx.get(api.url + "/v1/chat/completions", headers=api.headers(), timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        for _ in range(30):
            yield b" " * 65536

    r = httpx.post(api.url + "/v1/completions", content=chunks(), headers=api.headers(), timeout=30)
    assert r.status_code == 413


# -- under load and when clients leave ---------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_dropped_client_frees_the_engine_at_once(api, stream):
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 4000, "temperature": 0, "stream": stream}
    if stream:
        with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, headers=api.headers(),
                          timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
    else:  # the client gives up waiting for the whole answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(api.url + "/v1/chat/completions", json=body, headers=api.headers(),
                       timeout=httpx.Timeout(30, read=0.5))
    dropped = time.monotonic()
    while api.health()["busy"] and time.monotonic() - dropped < 1.0:
        time.sleep(0.02)
    health = api.health()
    assert not health["busy"], "the generation went on after the client left"
    assert health["last"]["finish_reason"] == "cancelled"
    assert 0 < health["last"]["usage"]["completion_tokens"] < 4000
    assert chat(api, MESSAGES, max_tokens=3)[1] == "length"


def _concurrent(served, clients: int, rounds: int, max_tokens: int, retries: int = 0) -> dict:
    """`clients` threads streaming `rounds` chats each (a conversation: each round adds a turn),
    with mixed masks; each client retries a 503 `retries` times, after its Retry-After.
    Returns {(client, round): (messages, options, text, finish)}."""
    results, errors = {}, []
    choices = [{}, {"density": 0.5}, {"dense": True}, {"density": 0.75}]

    def client(i):
        own = Served(served.url, served.key, retries)
        try:
            messages = [{"role": "user", "content": f"Request {i}: {TASK if i % 2 else 'Sort 5 3 9 1.'}"}]
            options = choices[i % len(choices)]
            for r in range(rounds):
                text, finish, _, usage = chat(own, messages, stream=True, max_tokens=max_tokens,
                                              stream_options={"include_usage": True}, **dict(options))
                assert usage.completion_tokens == max_tokens
                results[i, r] = ([dict(m) for m in messages], options, text, finish)
                messages = messages + [{"role": "assistant", "content": text},
                                       {"role": "user", "content": f"Round {r + 1} of client {i}."}]
        except Exception as e:  # reported by the test
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "clients still waiting after 180 s"
    assert not errors, errors
    assert len(results) == clients * rounds
    return results


def check_sequential(engine, results, max_tokens):
    for (i, r), (messages, options, text, finish) in results.items():
        assert finish == "length"
        task = None if options.get("dense") else messages[0]["content"]
        assert text == reference(engine, messages, task=task, max_tokens=max_tokens, **options), (i, r)


def test_32_concurrent_streaming_clients(api, engine):
    before = api.health()
    results = _concurrent(api, clients=32, rounds=2, max_tokens=8)
    check_sequential(engine, results, 8)
    after = api.health()
    assert after["served"] - before["served"] == 64 and after["failed"] == before["failed"]


@pytest.mark.slow
def test_96_concurrent_clients_4_rounds_beyond_the_queue(api, engine):
    # 96 clients, 64 places in the queue: the last ones get 503 and come back after Retry-After
    results = _concurrent(api, clients=96, rounds=4, max_tokens=24, retries=10)
    check_sequential(engine, results, 24)


# -- the scheduler, in-process -----------------------------------------------------------------

@pytest.fixture
def in_process(endless_bundle):
    """Start a server in this process: start(**options) -> (Served, Server), stopped after the test."""
    running = []

    def start(**options):
        background = server.BackgroundServer(lambda: ifp.load(endless_bundle), server.ServerConfig(model_id="m"),
                                             **options)
        running.append(background)
        served = Served(background.url, None)
        wait_healthy(served)
        return served, background.server

    yield start
    for background in running:
        background.stop()


def test_a_full_queue_answers_503_with_retry_after(in_process):
    served, app = in_process(max_queue=1)
    gate = threading.Event()  # holds the engine busy until the queue has been seen full
    entered = threading.Event()  # the worker took the first request and waits at the gate
    begin = app.scheduler._begin
    app.scheduler._begin = lambda job: (entered.set(), gate.wait(30), begin(job))
    statuses = []

    def post():
        r = httpx.post(served.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=60)
        statuses.append(r.status_code)

    def wait_for(what, value):
        deadline = time.monotonic() + 10
        while served.health()[what] != value and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.health()[what] == value

    first, second = threading.Thread(target=post), threading.Thread(target=post)
    first.start()
    assert entered.wait(10)
    second.start()
    wait_for("queued", 1)
    with pytest.raises(openai.InternalServerError) as e:
        served.client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    assert e.value.status_code == 503 and int(e.value.response.headers["Retry-After"]) >= 1
    assert e.value.code == "queue_full"
    gate.set()
    first.join(30)
    second.join(30)
    assert statuses == [200, 200]
    assert chat(served, MESSAGES, max_tokens=2)[1] == "length"


def mixed_workload(rounds: int) -> list[tuple]:
    """Four conversations (four masks: per task, the first message selects) and dense
    requests, interleaved turn by turn: the order a busy server sees them in."""
    tasks = [TASK, "Translate the sentence into French, please.", "Sort these numbers: 5 3 9 1.",
             "What is the sum of 12 and 30?"]
    work = []
    for r in range(rounds):
        for task in tasks:
            messages = [{"role": "user", "content": task}]
            for turn in range(r):
                messages += [{"role": "assistant", "content": f"answer {turn}"},
                             {"role": "user", "content": f"and then {turn}?"}]
            work.append((messages, {}))
        if r % 2:
            work.append(([{"role": "user", "content": f"dense {r}"}], {"dense": True}))
    return work


async def _run_queued(scheduler, engine, work, max_tokens=4, task_of=lambda messages: messages[0]["content"]):
    """Queue every job of `work` before the worker starts, run them all, return their outputs."""
    loop = asyncio.get_running_loop()
    jobs = []
    for messages, options in work:
        dense = options.get("dense", False)
        job = Job(prompt=messages, ids=engine.prompt_tokens(messages), task=task_of(messages),
                         sampling={"max_tokens": max_tokens, "temp": 0.0, "top_p": 1.0, "seed": None},
                         density=None, selector="" if dense else "predictor", dense=dense, stop=[], loop=loop)
        scheduler.submit(job)
        jobs.append(job)
    await asyncio.to_thread(scheduler.start)

    async def drain(job):
        text, report = [], None
        while True:
            kind, payload = await asyncio.wait_for(job.events.get(), 60)
            if kind == "start":
                report = payload
            elif kind == "text":
                text.append(payload[0])
            elif kind == "error":
                raise payload
            elif kind == "done":
                return "".join(text), report

    return await asyncio.gather(*(drain(j) for j in jobs))


def test_mask_affinity_swaps_fewer_rows_and_changes_no_answer(endless_bundle, engine):
    work = mixed_workload(rounds=4)
    swaps, texts = {}, {}
    for affinity in (False, True):
        scheduler = Scheduler(lambda: ifp.load(endless_bundle), affinity=affinity, max_queue=len(work))
        try:
            outputs = asyncio.run(_run_queued(scheduler, engine, work))
        finally:
            scheduler.stop()
        swaps[affinity] = sum(report["swaps"] for _, report in outputs) / len(work)
        texts[affinity] = [text for text, _ in outputs]
    assert texts[True] == texts[False]
    assert swaps[True] < swaps[False] / 2, swaps


@pytest.mark.parametrize("loads", [True, False])
def test_the_worker_destroys_its_mlx_streams_when_it_ends(endless_bundle, monkeypatch, loads):
    """Streams left to the process's exit abort it now and then; the worker clears its own,
    after serving and after a failed load alike."""
    cleared, clear = [], mx.clear_streams
    monkeypatch.setattr(mx, "clear_streams", lambda: (cleared.append(threading.current_thread().name), clear()))

    def load():
        if not loads:
            raise ValueError("no model")
        return ifp.load(endless_bundle)

    scheduler = Scheduler(load)
    try:
        scheduler.start()
    except ValueError:
        assert not loads
    scheduler.stop()
    assert cleared == ["ifprune-engine"]


def test_affinity_passes_a_request_over_a_bounded_number_of_times(endless_bundle, engine):
    # One request for mask B behind many for mask A: it still runs before all of A's are done.
    many = [([{"role": "user", "content": TASK}], {})] * (MAX_OVERTAKES + 8)
    work = [many[0], ([{"role": "user", "content": "Sort these numbers: 5 3 9 1."}], {}), *many[1:]]
    scheduler = Scheduler(lambda: ifp.load(endless_bundle), max_queue=len(work))
    order = []
    original = scheduler._begin
    scheduler._begin = lambda job: (order.append(job.prompt[0]["content"]), original(job))
    try:
        asyncio.run(_run_queued(scheduler, engine, work, max_tokens=1))
    finally:
        scheduler.stop()
    position = order.index("Sort these numbers: 5 3 9 1.")
    assert 1 < position <= MAX_OVERTAKES + 1


# -- the command -----------------------------------------------------------------------------

def test_serve_command_fails_in_one_line(bundle_dir, monkeypatch):
    from typer.testing import CliRunner

    from ifprune_mlx import serve_cli
    from ifprune_mlx.blas import serving_threads
    from ifprune_mlx.cli import app

    blas_threads = []  # process-wide: recorded, not set, in the test process
    monkeypatch.setattr(serve_cli, "set_blas_threads", lambda n: blas_threads.append(n))
    runner = CliRunner()
    assert "--api-key" in runner.invoke(app, ["serve", "--help"]).output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = [
            (["--density", "2"], "density must be in (0, 1]"),
            (["--selector", "oracle", "--port", str(free_port())], "unknown selector 'oracle'"),
            (["--port", str(busy.getsockname()[1])], "cannot listen on 127.0.0.1"),
            (["--max-queue", "0"], "--max-queue must be at least 1"),
            (["--max-batch", "0"], "--max-batch must be at least 1"),
            (["--max-connections", "0"], "--max-connections must be at least 1"),
            (["--blas-threads", "0"], "--blas-threads must be at least 1"),
            (["--read-timeout", "0"], "--read-timeout must be positive"),
            (["--prefill", "full"], "--prefill takes pruned or dense, got 'full'"),
        ]
        for args, message in cases:
            result = runner.invoke(app, ["serve", str(bundle_dir), *args])
            assert result.exit_code == 1 and message in result.output, (args, result.output)
            assert "Traceback" not in result.output
    assert blas_threads == [serving_threads()]  # set before loading: the unknown selector got that far
    # without the optional extra
    monkeypatch.delitem(sys.modules, "ifprune_mlx.server")
    monkeypatch.delattr(ifp, "server", raising=False)
    for name in [n for n in sys.modules if n == "starlette" or n.startswith("starlette.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    result = runner.invoke(app, ["serve", str(bundle_dir), "--max-queue", "0"])  # never serves
    assert result.exit_code == 1
    assert "ifprune serve needs starlette: pip install 'ifprune-mlx[serve]'" in result.output


def test_interleaved_conversations_under_one_mask_keep_their_own_caches(api, engine):
    """Two dense conversations, turn by turn: each next request reuses its own prefix."""
    talks = {name: [{"role": "user", "content": f"Conversation {name}: {TASK}"}] for name in "AB"}
    for name, messages in talks.items():
        text, *_ = chat(api, messages, max_tokens=5, dense=True)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on."}]
    for name, messages in talks.items():
        text, _, report, usage = chat(api, messages, max_tokens=5, dense=True)
        first_prompt = len(engine.prompt_tokens(messages[:1]))
        assert report["reused_tokens"] > first_prompt, (name, report)
        assert text == reference(engine, messages, max_tokens=5, dense=True)


def test_requests_sharing_a_system_prompt_decode_in_one_batch_as_they_would_alone(endless_bundle, engine):
    # Eight requests of one task (one system prompt: one mask) queued at once decode together;
    # each greedy answer equals the one it gets alone (float32 model: exactly equal, measured).
    system = {"role": "system", "content": "Answer in French."}
    work = [([system, {"role": "user", "content": f"Question {i}: {TASK[: 10 + 3 * i]}"}], {}) for i in range(8)]
    scheduler = Scheduler(lambda: ifp.load(endless_bundle), max_queue=len(work))
    try:
        together = asyncio.run(_run_queued(scheduler, engine, work, max_tokens=12, task_of=lambda m: m[0]["content"]))
    finally:
        scheduler.stop()
    assert max(report["batch"] for _, report in together) == len(work)
    assert len({report["mask"] for _, report in together}) == 1
    for (messages, _), (text, _) in zip(work, together):
        assert text == reference(engine, messages, task=system["content"], max_tokens=12)


def test_with_a_dense_prefill_requests_batch_reuse_dense_prefixes_and_answer_as_alone(endless_bundle, engine):
    # The model's prefill "dense": each request's prompt runs on every channel under the batch's
    # mask, then joins the batch pruned. Its answer is the one engine.generate gives with
    # prefill="dense"; one at a time (max_batch 1), a later request reuses the dense prefix an
    # earlier one left (the shared system prompt), and still answers the same.
    system = {"role": "system", "content": "Answer in French."}
    work = [([system, {"role": "user", "content": f"Question {i}: {TASK[: 10 + 3 * i]}"}], {}) for i in range(4)]

    def load():
        served = ifp.load(endless_bundle)
        served.prefill = "dense"
        return served

    runs = {}
    for max_batch in (len(work), 1):
        scheduler = Scheduler(load, max_queue=len(work), max_batch=max_batch)
        try:
            runs[max_batch] = asyncio.run(_run_queued(scheduler, engine, work, max_tokens=12,
                                                      task_of=lambda m: m[0]["content"]))
        finally:
            scheduler.stop()
    together, alone = runs[len(work)], runs[1]
    assert max(report["batch"] for _, report in together) == len(work)
    assert [report["reused_tokens"] > 0 for _, report in alone] == [False] + [True] * (len(work) - 1)
    expected = [reference(engine, messages, task=system["content"], max_tokens=12, prefill="dense")
                for messages, _ in work]
    assert [text for text, _ in together] == expected and [text for text, _ in alone] == expected
    assert expected != [reference(engine, messages, task=system["content"], max_tokens=12) for messages, _ in work]


def test_a_batch_starting_from_idle_takes_the_requests_the_event_loop_has_received(endless_bundle, engine):
    # A round of clients that got their answers in one step sends the next requests together: the
    # first wakes the idle worker, the others are still in the event loop (uvicorn hands a request
    # to its handler an iteration or two after its bytes arrive). They must prefill in one batch
    # with the first, not after it. Here B is submitted three loop iterations after A.
    system = {"role": "system", "content": "Answer in French."}
    prompts = [[system, {"role": "user", "content": f"Question {i}: {TASK}"}] for i in range(2)]
    scheduler = Scheduler(lambda: ifp.load(endless_bundle))
    scheduler.start()
    first_step = []
    step = scheduler._step
    scheduler._step = lambda: (first_step or first_step.append(len(scheduler.batch.active)), step())

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [Job(prompt=p, ids=None, task=system["content"], sampling={"max_tokens": 6, "temp": 0.0, "top_p": 1.0,
                    "seed": None}, density=None, selector="predictor", dense=False, stop=[], loop=loop) for p in prompts]
        scheduler.submit(jobs[0])
        after_iterations(loop, 3, scheduler.submit, jobs[1])

        async def text(job):
            pieces = []
            while (event := await asyncio.wait_for(job.events.get(), 60))[0] != "done":
                assert event[0] != "error", event
                pieces += [event[1][0]] if event[0] == "text" else []
            return "".join(pieces)
        return await asyncio.gather(*(text(j) for j in jobs))

    try:
        texts = asyncio.run(run())
    finally:
        scheduler.stop()
    assert first_step == [2]
    assert texts == [reference(engine, p, task=system["content"], max_tokens=6) for p in prompts]


def after_iterations(loop, n: int, f, *args) -> None:
    """Call f(*args) on `loop` n iterations from now (from its thread)."""
    if n:
        loop.call_soon(after_iterations, loop, n - 1, f, *args)
    else:
        f(*args)


def test_let_in_returns_after_the_event_loop_has_run_what_was_due(engine):
    # What a request needs to reach the queue once its bytes have arrived (uvicorn: an iteration
    # to parse it, one to run its handler), with a margin, has run when _let_in returns.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    scheduler = Scheduler(lambda: engine)  # not started: _let_in needs no worker
    try:
        for rounds in range(LET_IN_ROUNDS):
            arrived = threading.Event()
            loop.call_soon_threadsafe(after_iterations, loop, rounds, arrived.set)
            scheduler._let_in(loop)
            assert arrived.is_set(), rounds
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    scheduler._let_in(loop)  # a closed loop: the server is going down; no error, no wait
