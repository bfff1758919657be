"""`ifprune serve` at its edges: liveness, keep-alives while queued, CORS, odd JSON, slow
bodies, the connection cap, and the scheduler importable without the HTTP stack."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import ifprune_mlx as ifp  # noqa: E402
from ifprune_mlx import server  # noqa: E402

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def start(endless_bundle):
    """start(config options, **server options) -> a BackgroundServer, stopped after the test."""
    running = []

    def start(config: dict | None = None, **options):
        background = server.BackgroundServer(lambda: ifp.load(endless_bundle),
                                             server.ServerConfig(model_id="m", **(config or {})), **options)
        running.append(background)
        return background

    yield start
    for background in running:
        background.stop()


def gate_worker(scheduler) -> tuple[threading.Event, threading.Event]:
    """Hold the worker before it runs a request: (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    begin = scheduler._begin
    scheduler._begin = lambda job: (entered.set(), release.wait(30), begin(job))
    return entered, release


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker is killed
def test_liveness_needs_no_key_and_a_dead_worker_makes_it_503(start):
    running = start({"api_key": "k"})
    assert httpx.get(running.url + "/health", timeout=10).status_code == 401
    r = httpx.get(running.url + "/live", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok", "worker": "idle"}
    scheduler = running.server.scheduler

    def die(job):
        raise SystemExit("killed")  # what a bug escaping the worker's loop does to its thread

    scheduler._tokenize = die
    r = httpx.post(running.url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=30,
                   headers={"Authorization": "Bearer k"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_stopped"  # the request is not left hanging
    r = httpx.get(running.url + "/live", timeout=10)
    assert r.status_code == 503 and r.json() == {"status": "dead", "worker": "dead"}
    health = httpx.get(running.url + "/health", headers={"Authorization": "Bearer k"}, timeout=10)
    assert health.status_code == 503 and health.json()["worker"] == "dead"
    r = httpx.post(running.url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=30,
                   headers={"Authorization": "Bearer k"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_stopped"


def test_keepalive_comments_arrive_while_a_stream_is_queued(start):
    running = start({"keepalive": 0.05})
    entered, release = gate_worker(running.server.scheduler)
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    comments = 0
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while comments < 3:  # the worker holds the request: only comments can come
            line = next(lines)
            comments += line.startswith(": keepalive")
            assert not line.startswith("data: ") or json.loads(line[6:])["choices"][0]["delta"]["role"]
        assert entered.is_set()
        release.set()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"


def test_cors_preflight_and_header(start):
    running = start({"api_key": "k", "cors": ["http://app.test"]})
    preflight = httpx.options(running.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://app.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200  # a preflight carries no key
    assert preflight.headers["access-control-allow-origin"] == "http://app.test"
    r = httpx.get(running.url + "/v1/models", headers={"Origin": "http://app.test", "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.test"
    other = httpx.get(running.url + "/v1/models", headers={"Origin": "http://evil.test", "Authorization": "Bearer k"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("route,body", [
    ("completions", b'{"prompt": "a \\ud800 lone surrogate", "max_tokens": 2}'),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
    ("completions", b'{"prompt": "pair \\ud83d\\ude00 and \\u0000 nul", "max_tokens": 2, "stop": ["\\ud800"]}'),
])
def test_odd_but_valid_json_is_served(start, route, body):
    running = start()
    r = httpx.post(f"{running.url}/v1/{route}", content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_a_body_that_stalls_gets_408(start):
    running = start({"read_timeout": 0.3})
    host, port = running.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        answer = ""
        while '"code":"timeout"' not in answer and (chunk := s.recv(4096)):
            answer += chunk.decode()
    assert answer.startswith("HTTP/1.1 408") and '"code":"timeout"' in answer


def test_connections_over_the_cap_get_503(start):
    running = start(max_connections=1)
    entered, release = gate_worker(running.server.scheduler)
    body = {"messages": MESSAGES, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=30) as first:
        assert entered.wait(10)  # the first connection is open and waits for the worker
        assert httpx.get(running.url + "/v1/models", timeout=10).status_code == 503
        release.set()
        assert first.status_code == 200
        first.read()
    deadline = time.monotonic() + 10  # uvicorn counts the connection until it has closed
    while httpx.get(running.url + "/v1/models", timeout=10).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(running.url + "/v1/models", timeout=10).status_code == 200


def test_the_scheduler_imports_without_the_http_stack():
    code = ("import sys\nfor name in ('starlette', 'uvicorn', 'pydantic'): sys.modules[name] = None\n"
            "import ifprune_mlx.scheduler, ifprune_mlx.batching\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
