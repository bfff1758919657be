"""`ifprune serve`: the command around ifprune_mlx.server (Starlette and uvicorn are imported
only when it runs: they are the optional extra `serve`)."""

from __future__ import annotations

import socket
from typing import Optional

import typer

from .blas import serving_threads
from .blas import set_threads as set_blas_threads
from .console import (MAX_DENSITY_OPTION, MODEL_ARGUMENT, PREFILL_OPTION, RESIDENT_OPTION, checked_prefill, fail,
                      friendly_errors, load_resolved, resident_options, resolve_with_progress)
from .selectors import check_density

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@friendly_errors
def serve(
    model: Optional[str] = MODEL_ARGUMENT,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (another than 127.0.0.1 exposes the server: use --api-key)."),
    port: int = typer.Option(8080, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="IFPRUNE_API_KEY", help="Require `Authorization: Bearer KEY` on every route (or set $IFPRUNE_API_KEY)."),
    density: Optional[float] = typer.Option(None, help="Default fraction of FFN channels kept, in (0, 1]; requests may override it. Default: the model's."),
    selector: Optional[str] = typer.Option(None, "--selector", help="Default selector: predictor (trained; default where the model has one) or activations (training-free)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait; more get 503 with Retry-After."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Largest max_tokens a request may ask for."),
    prompt_caches: int = typer.Option(16, "--prompt-caches", help="KV caches of finished requests kept (LRU, per mask), so a request prefills only what no cache holds (a shared system prompt, a conversation's earlier turns)."),
    affinity: bool = typer.Option(True, "--affinity/--no-affinity", help="Let queued requests of the running mask join its batch ahead of others, and start the batch that swaps the fewest rows next (--no-affinity: plain FIFO)."),
    max_body_mb: float = typer.Option(2.0, "--max-body-mb", help="Largest request body, in MB (413 above)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Requests of one mask decoded together (continuous batching)."),
    cors: Optional[list[str]] = typer.Option(None, "--cors", help="Allow browsers of this origin to call (repeatable; \"*\": any)."),
    max_connections: Optional[int] = typer.Option(None, "--max-connections", help="Connections served at once; more get 503 (default: no cap)."),
    read_timeout: float = typer.Option(30.0, "--read-timeout", help="Seconds a request body may pause while it arrives (408 after)."),
    keepalive: float = typer.Option(10.0, "--keepalive", help="Seconds between SSE keep-alive comments while a stream waits for its first token."),
    blas_threads: Optional[int] = typer.Option(None, "--blas-threads", help="OpenBLAS threads (Linux CPU; nothing elsewhere). Default: one core fewer than the machine has, left to the HTTP loop and the worker's Python (on 2 cores: 8 clients about as fast on far less CPU, one client ~10% slower; docs/SERVER.md)."),
    prefill: Optional[str] = PREFILL_OPTION,
    resident: Optional[str] = RESIDENT_OPTION,
    max_density: Optional[float] = MAX_DENSITY_OPTION,
):
    """Serve MODEL over an OpenAI-compatible HTTP API (chat/completions, completions, models)."""
    try:
        from . import server
    except ImportError as e:
        missing = (e.name or "starlette").split(".")[0]
        fail(f"ifprune serve needs {missing}: pip install 'ifprune-mlx[serve]'")
    if density is not None:
        check_density(density)
    checked_prefill(prefill)
    for name, value in (("--max-queue", max_queue), ("--max-tokens", max_tokens), ("--prompt-caches", prompt_caches),
                        ("--max-batch", max_batch), ("--max-connections", 1 if max_connections is None else max_connections),
                        ("--blas-threads", 1 if blas_threads is None else blas_threads)):
        if value < 1:
            fail(f"{name} must be at least 1, got {value}")
    for name, value in (("--max-body-mb", max_body_mb), ("--read-timeout", read_timeout), ("--keepalive", keepalive)):
        if value <= 0:
            fail(f"{name} must be positive, got {value}")
    load_options = resident_options(resident, max_density)
    sock = _listen(host, port)
    threads = serving_threads(blas_threads)
    blas_note = "" if set_blas_threads(threads) is None else f"; OpenBLAS threads: {threads}"
    found = resolve_with_progress(model)

    def load():
        engine = load_resolved(found, **load_options)
        engine.get_selector(selector)  # an unknown selector fails before serving
        engine.set_prefill(prefill)
        return engine

    config = server.ServerConfig(model_id=found.path.resolve().name, api_key=api_key, density=density,
                                 selector=selector, max_tokens=max_tokens, max_body=int(max_body_mb * 1e6),
                                 read_timeout=read_timeout, keepalive=keepalive, cors=list(cors or []))
    app = server.start(load, config, max_queue=max_queue, affinity=affinity, prompt_caches=prompt_caches,
                       max_batch=max_batch)
    bound_host, bound_port = sock.getsockname()[:2]
    typer.echo(f"serving {config.model_id} at http://{bound_host}:{bound_port}/v1 (OpenAI API{blas_note}; Ctrl-C stops)",
               err=True)
    if host not in LOOPBACK and not api_key:
        typer.secho(f"warning: listening on {host} without --api-key: anyone who reaches it can use it",
                    fg=typer.colors.YELLOW, err=True)
    try:
        server.uvicorn_server(app, sock, max_connections=max_connections).run(sockets=[sock])
    finally:
        app.scheduler.stop()


def _listen(host: str, port: int) -> socket.socket:
    """Bind the port now, so a busy port is one line, not a traceback after loading."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    return sock
