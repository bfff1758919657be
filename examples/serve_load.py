"""`ifprune serve` under load: throughput and time to first token at 1/4/8/16 streaming clients.

Starts the server in this process (uvicorn on 127.0.0.1, a free port) on the default model
(or --model) with a default density of DENSITY (0.7: the default model's own default is
1.0, dense, where every request has the one dense mask and "mixed tasks" would mean nothing),
then CLIENTS clients share REQUESTS streamed chat requests with the official openai client,
each client sending its next request when the last one ended. With 64 requests, 8 clients
send 8 each: the run is mostly the steady state of 8 clients, not the start (every client
sending at once) and the drain (the last answers finishing alone) of a run of 2 each. Every request
has a system message (the task instruction, from which the trained predictor selects the
mask) and a user question. "same task": one system prompt, so every request has one mask and
they decode in one batch; "mixed tasks": four system prompts, four masks, batches take turns.
Each run gets a fresh server (no KV caches from earlier runs), warmed by one request per
system prompt with a question of its own, so prefix caches hold the system prompts only.

Tokens per CPU-second (the CPU time of this process: server and clients) shows what batching
saves when the machine is shared and wall-clock throughput mostly measures the neighbours.
The 1-client run of a workload is the sequential reference: with greedy decoding, every
request of the other runs is checked to give the same text as there (the table says how many
did). Writes a markdown table (stdout, and with --out into docs/SERVER.md between its
markers), with the machine's load average before and after.

    python -m examples.serve_load                     # make serve-load
    python -m examples.serve_load --clients 1 8 --requests 16 --max-tokens 32 --density 0.9

On Linux CPU preload OpenBLAS (see the Makefile's WITH_BLAS).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue
import statistics
import threading
import time
from pathlib import Path

import openai

from ifprune_mlx.blas import serving_threads, set_threads
from ifprune_mlx.bundle import PREFILLS

SYSTEMS = [
    "Translate the user's sentence into French. Answer with the translation only.",
    "Summarize the user's text in one short sentence.",
    "Rewrite the user's sentence in a formal tone.",
    "List three keywords of the user's text, separated by commas.",
]
QUESTIONS = [
    "The weather was cold, so we stayed home and read books all afternoon.",
    "Our team shipped the new release two days before the deadline.",
    "The museum opens at nine and closes early on Sundays.",
    "She learned to play the piano by practicing every evening for a year.",
    "The train was late because of snow on the tracks near the mountains.",
    "Fresh bread from the bakery on the corner sells out before noon.",
    "The committee will meet next week to discuss the budget for schools.",
    "He repaired the old bicycle and rode it to work the next morning.",
    "Scientists observed a rare bird nesting on the cliffs this spring.",
    "The library added a quiet room for students preparing for exams.",
    "Heavy rain flooded the streets, and the buses stopped running.",
    "The chef changed the menu to use vegetables from local farms.",
    "Two friends walked along the river and talked about their plans.",
    "The company opened a new office in a city by the sea.",
    "A small café downstairs serves the best coffee in the neighborhood.",
    "The children built a snowman in the park after school.",
]
BEGIN, END = "<!-- serve-load begin -->", "<!-- serve-load end -->"


WARM_UP = "Hello."
DENSITY = 0.7  # where pruning pays on this model (decode ~1.2x dense, docs/BENCHMARKS.md); its default is 1.0
REQUESTS = 64


def request_prompt(j: int, mixed: bool, question: str | None = None) -> list[dict]:
    system = SYSTEMS[j % len(SYSTEMS)] if mixed else SYSTEMS[0]
    return [{"role": "system", "content": system}, {"role": "user", "content": question or QUESTIONS[j % len(QUESTIONS)]}]


def drive(url: str, clients: int, requests: int, mixed: bool, max_tokens: int,
          in_process: bool = False, cpu_split: dict | None = None) -> tuple[dict, float, float]:
    """`requests` requests over `clients` clients; returns {j: record}, wall seconds and the CPU
    seconds used by the server and the clients. Each client is a process of its own (as real
    clients are), or with `in_process` a thread of this one (sharing the server's GIL).
    `cpu_split`, if given, gets the client processes' CPU seconds ("clients")."""
    if in_process:
        return _drive_threads(url, clients, requests, mixed, max_tokens)
    context = multiprocessing.get_context("spawn")  # no fork of a process running MLX and uvicorn threads
    todo, results, go = context.Queue(), context.Queue(), context.Event()
    for j in range(requests):
        todo.put(j)
    for _ in range(clients):
        todo.put(None)
    workers = [context.Process(target=client_process, args=(url, mixed, max_tokens, todo, results, go), daemon=True)
               for _ in range(clients)]
    for w in workers:
        w.start()
    try:
        for _ in workers:  # every client has imported openai and built its connection pool
            _receive(results, workers, "ready")
        start, cpu = time.perf_counter(), time.process_time()
        go.set()
        records, clients_cpu, errors = {}, 0.0, []
        done = 0
        while done < clients:
            kind, j, payload = _receive(results, workers)
            if kind == "record":
                records[j] = payload
            elif kind == "error":
                errors.append(payload)
            else:  # "cpu": this client has ended
                done, clients_cpu = done + 1, clients_cpu + payload
        wall, server_cpu = time.perf_counter() - start, time.process_time() - cpu
        if cpu_split is not None:
            cpu_split["clients"] = clients_cpu
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
    if errors:
        raise SystemExit(f"{len(errors)} clients failed, e.g. {errors[0]}")
    return records, wall, server_cpu + clients_cpu


def _receive(results, workers, expected: str | None = None, timeout: float = 600) -> tuple:
    """The next message of a client process (bounded wait; a client that died is an error)."""
    try:
        message = results.get(timeout=timeout)
    except queue.Empty:
        alive = sum(w.is_alive() for w in workers)
        raise SystemExit(f"no word from the clients for {timeout:.0f} s ({alive} of {len(workers)} alive)") from None
    if expected and message[0] != expected:
        raise SystemExit(f"a client said {message[0]!r} before it was ready: {message[2]}")
    return message


def client_process(url: str, mixed: bool, max_tokens: int, todo, results, go) -> None:
    """One client (a process of its own): takes request numbers from `todo` until None, sends
    each and reports its record; at the end, the CPU seconds it used."""
    api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    api.models.list()  # connect before the clock starts
    results.put(("ready", None, None))
    if not go.wait(600):  # the parent is gone
        return
    cpu = time.process_time()
    while (j := todo.get(timeout=600)) is not None:
        try:
            results.put(("record", j, one(api, request_prompt(j, mixed), max_tokens)))
        except Exception as e:  # reported by the parent
            results.put(("error", j, repr(e)))
            break
    results.put(("cpu", None, time.process_time() - cpu))


def _drive_threads(url: str, clients: int, requests: int, mixed: bool, max_tokens: int) -> tuple[dict, float, float]:
    """drive() with the clients as threads of this process (the server's): CPU time is the process's."""
    records, errors, lock = {}, [], threading.Lock()
    todo = iter(range(requests))

    def client():
        api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        while True:
            with lock:
                j = next(todo, None)
            if j is None:
                return
            try:
                records[j] = one(api, request_prompt(j, mixed), max_tokens)
            except Exception as e:  # reported below
                errors.append(repr(e))
                return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} clients failed, e.g. {errors[0]}")
    return records, time.perf_counter() - start, time.process_time() - cpu


def one(api, messages: list[dict], max_tokens: int, **options) -> dict:
    """One streamed request: its text, TTFT, tokens and the server's report."""
    start = time.perf_counter()
    first, pieces, report, tokens = None, [], None, 0
    stream = api.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens, temperature=0,
                                         stream=True, stream_options={"include_usage": True}, **options)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            report = chunk.model_extra["ifprune"]
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"text": "".join(pieces), "ttft": (first or end) - start, "latency": end - start, "tokens": tokens,
            "sent": start, "first": first or end,  # perf_counter: one clock for every process on Linux and macOS
            "batch": report["batch"], "reused": report["reused_tokens"]}


def decode_rate(records: dict) -> float:
    """Aggregate decode tokens/s: the tokens after each request's first, over the time in which
    at least one request was decoding (the union of the spans first token -> last token), so
    prefill and queueing between them do not count (the issue's "aggregate decode tokens/s")."""
    spans = sorted((r["first"], r["sent"] + r["latency"]) for r in records.values() if r["tokens"] > 1)
    covered, reach = 0.0, float("-inf")
    for start, end in spans:
        covered += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return sum(r["tokens"] - 1 for r in records.values() if r["tokens"] > 1) / covered if covered else 0.0


def row(name: str, clients: int, records: dict, wall: float, cpu: float,
        reference: dict) -> tuple[str, float, float, float]:
    n = len(records)
    ttft = sorted(r["ttft"] * 1000 for r in records.values())
    tokens = sum(r["tokens"] for r in records.values())
    same = sum(records[j]["text"] == reference[j]["text"] for j in records)
    p95 = statistics.quantiles(ttft, n=20)[-1] if n > 1 else ttft[0]
    tps, decode = tokens / wall, decode_rate(records)
    line = (f"| {name} | {clients} | {n} | {statistics.median(ttft):.0f} / {p95:.0f} | {tps:.1f} | {decode:.1f} "
            f"| {tokens / cpu:.1f} "
            f"| {statistics.mean(r['batch'] for r in records.values()):.1f} "
            f"| {statistics.mean(r['reused'] for r in records.values()):.0f} | {same}/{n} |")
    return line, tps, statistics.median(ttft), decode


def grammar_overhead(url: str, max_tokens: int, n: int = 6) -> str:
    """Decode ms per token of one client, plain and with response_format json_object."""
    api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    per_token = {}
    for name, options in (("plain", {}), ("json_object", {"response_format": {"type": "json_object"}})):
        times = []
        for j in range(n):
            r = one(api, request_prompt(j, False), max_tokens, **options)
            if r["tokens"] > 1:
                times.append((r["latency"] - r["ttft"]) / (r["tokens"] - 1) * 1000)
        per_token[name] = statistics.median(times)
    return (f"Constrained decoding (1 client, {n} requests each, median decode ms per token): plain "
            f"{per_token['plain']:.1f}, json_object {per_token['json_object']:.1f} "
            f"({per_token['json_object'] - per_token['plain']:+.1f} ms per token).")


@contextlib.contextmanager
def fresh_server(model: str | None, clients: int, mixed: bool, density: float | None = DENSITY,
                 blas_threads: int | None = None, prefill: str | None = None):
    """A new server on `model` (default: the default chat model) whose requests run at `density`
    (None: the model's default), with `ifprune serve`'s default OpenBLAS threads (or
    `blas_threads`) and the model's prefill (or `prefill`), warmed up; yields its /v1 URL."""
    from ifprune_mlx import server  # not in the client processes
    from ifprune_mlx.opener import open_model

    def load():
        engine = open_model(model)
        engine.set_prefill(prefill)  # as `ifprune serve --prefill` does
        return engine

    set_threads(serving_threads(blas_threads))  # as `ifprune serve` does
    running = server.BackgroundServer(load, server.ServerConfig(model_id="default", density=density),
                                      max_queue=max(64, clients))
    try:
        url = running.url + "/v1"
        warm = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        for j in range(len(SYSTEMS) if mixed else 1):
            one(warm, request_prompt(j, mixed, WARM_UP), 4)
        yield url
    finally:
        running.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bundle or model folder (default: the default chat model)")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=REQUESTS, help="requests per run")
    parser.add_argument("--density", type=float, default=DENSITY,
                        help="the server's default density (every request's; 1.0: dense)")
    parser.add_argument("--blas-threads", type=int, help="OpenBLAS threads (default: `ifprune serve`'s, the cores but one)")
    parser.add_argument("--prefill", choices=PREFILLS,
                        help="what the trained predictor's requests prefill with (default: the model's)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--in-process", action="store_true",
                        help="clients as threads of the server's process (sharing its GIL), not processes of their own")
    parser.add_argument("--out", type=Path, help="write the table into this markdown file, between its markers")
    args = parser.parse_args()
    load = os.getloadavg()
    lines = ["| workload | clients | requests | TTFT median / p95 ms | tokens/s (all clients) "
             "| decode tokens/s (all clients) | tokens per CPU-s "
             "| batch size at first token (mean) | prompt tokens reused (mean) | same text as 1 client |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    summary = []
    for mixed in (False, True):
        name = "mixed tasks (4 masks)" if mixed else "same task (1 mask)"
        reference, base = None, None
        for clients in sorted(args.clients):
            with fresh_server(args.model, clients, mixed, args.density, args.blas_threads, args.prefill) as url:
                records, wall, cpu = drive(url, clients, args.requests, mixed, args.max_tokens, args.in_process)
            reference = reference or records
            line, tps, ttft, decode = row(name, clients, records, wall, cpu, reference)
            base = base or (tps, ttft, decode)
            lines.append(line)
            print(line, flush=True)
            summary.append(f"{name}, {clients} clients: {tps / base[0]:.2f}x the tokens/s of 1 client, "
                           f"{decode / base[2]:.2f}x its decode tokens/s, median TTFT {ttft / base[1]:.2f}x")
    with fresh_server(args.model, 1, False, args.density, args.blas_threads, args.prefill) as url:
        summary.append(grammar_overhead(url, args.max_tokens))
    after = os.getloadavg()
    notes = [f"Load average (1/5/15 min) before: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
             f"after: {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f} on {os.cpu_count()} cores. "
             f"Greedy, at most {args.max_tokens} tokens per answer, {args.requests} requests per run, density {args.density}, "
             f"{serving_threads(args.blas_threads)} OpenBLAS thread(s), prefill {args.prefill or 'as the model has it'}."]
    notes += [f"- {s}" for s in summary]
    print("\n" + "\n".join(notes))
    if args.out:
        text = args.out.read_text()
        block = "\n".join([BEGIN, "", *lines, "", *notes, "", END])
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        args.out.write_text(head + block + tail)


if __name__ == "__main__":
    main()
