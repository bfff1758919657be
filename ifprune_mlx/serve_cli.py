"""`ifprune serve`: the command around ifprune_mlx.server (Starlette and uvicorn are imported
only when it runs: they are the optional extra `serve`)."""

from __future__ import annotations

import socket
from typing import Optional

import typer

from .console import (MAX_DENSITY_OPTION, MODEL_ARGUMENT, RESIDENT_OPTION, fail, friendly_errors, load_resolved,
                      resident_options, resolve_with_progress)
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
    prompt_caches: int = typer.Option(16, "--prompt-caches", help="KV caches kept (LRU; one per conversation and mask) so a conversation's next request prefills only what is new."),
    affinity: bool = typer.Option(True, "--affinity/--no-affinity", help="Run queued requests whose mask is in place first (fewer row swaps)."),
    max_body_mb: float = typer.Option(2.0, "--max-body-mb", help="Largest request body, in MB (413 above)."),
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
    for name, value in (("--max-queue", max_queue), ("--max-tokens", max_tokens), ("--prompt-caches", prompt_caches)):
        if value < 1:
            fail(f"{name} must be at least 1, got {value}")
    if max_body_mb <= 0:
        fail(f"--max-body-mb must be positive, got {max_body_mb}")
    load_options = resident_options(resident, max_density)
    sock = _listen(host, port)
    found = resolve_with_progress(model)

    def load():
        engine = load_resolved(found, **load_options)
        engine.get_selector(selector)  # an unknown selector fails before serving
        return engine

    config = server.ServerConfig(model_id=found.path.resolve().name, api_key=api_key, density=density,
                                 selector=selector, max_tokens=max_tokens, max_body=int(max_body_mb * 1e6))
    app = server.start(load, config, max_queue=max_queue, affinity=affinity, prompt_caches=prompt_caches)
    bound_host, bound_port = sock.getsockname()[:2]
    typer.echo(f"serving {config.model_id} at http://{bound_host}:{bound_port}/v1 (OpenAI API; Ctrl-C stops)",
               err=True)
    if host not in LOOPBACK and not api_key:
        typer.secho(f"warning: listening on {host} without --api-key: anyone who reaches it can use it",
                    fg=typer.colors.YELLOW, err=True)
    try:
        server.uvicorn_server(app, sock).run(sockets=[sock])
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
