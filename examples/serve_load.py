"""`ifprune serve` under load: concurrent streaming conversations, with and without mask affinity.

Starts the server in this process (uvicorn on 127.0.0.1, a free port) on the demo bundle
(trained predictor: each skill gets its own mask), then CLIENTS threads each hold a
conversation of ROUNDS streamed requests with the official openai client, all at once. One
client in eight asks for the dense model. Each conversation is on one of the demo's skills and
keeps the mask its first message selects (the per-task policy), so queued requests of the same
skill can run back to back. The same workload runs with affinity off (plain FIFO) and on, and
a markdown table gives per request: rows swapped, apply ms, prompt tokens reused from the
per-mask caches; and latency, time to first token and throughput as the clients saw them.

    python -m examples.serve_load                       # 32 clients x 2 requests, then 64 x 4
    python -m examples.serve_load --clients 32 --rounds 2 --model path/to/bundle

On Linux CPU preload OpenBLAS (see the Makefile's WITH_BLAS).
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from pathlib import Path

import openai

import ifprune_mlx as ifp
from examples.train_tiny import data
from ifprune_mlx import server
from ifprune_mlx.resolve import checkpoint_bundle


def run_server(model: Path, affinity: bool, max_queue: int, prompt_caches: int) -> server.BackgroundServer:
    return server.BackgroundServer(lambda: ifp.load(model), server.ServerConfig(model_id=model.name),
                                   affinity=affinity, max_queue=max_queue, prompt_caches=prompt_caches)


def conversations(clients: int, rounds: int, seed: int = 0) -> list[tuple[list[str], dict]]:
    """Per client: the user messages of its conversation (one skill) and its extra fields."""
    rng = random.Random(seed)
    out = []
    for i in range(clients):
        skill = data.SKILLS[i % len(data.SKILLS)]
        texts = [data.sample(rng, "test", skill).prompt for _ in range(rounds)]
        out.append((texts, {"dense": True} if i % 8 == 7 else {}))
    return out


def drive(url: str, work, max_tokens: int) -> tuple[list[dict], float]:
    """All conversations at once, one thread each; returns per-request records and wall seconds."""
    records, errors = [], []

    def client(texts, extra):
        api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        messages = []
        try:
            for text in texts:
                messages.append({"role": "user", "content": text})
                start = time.perf_counter()
                first, pieces, report = None, [], None
                stream = api.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens,
                                                     temperature=0, stream=True, extra_body=extra or None,
                                                     stream_options={"include_usage": True})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        pieces.append(chunk.choices[0].delta.content)
                    if chunk.choices and chunk.choices[0].finish_reason:
                        report = chunk.model_extra["ifprune"]
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
                end = time.perf_counter()
                records.append({"latency": end - start, "ttft": (first or end) - start, "tokens": tokens, **report})
                messages.append({"role": "assistant", "content": "".join(pieces)})
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=w) for w in work]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} clients failed, e.g. {errors[0]}")
    return records, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def row(name: str, records: list[dict], wall: float) -> str:
    n = len(records)
    swaps = sum(r["swaps"] for r in records) / n
    apply_ms = sum(r["apply_ms"] for r in records) / n
    reused = sum(r["reused_tokens"] for r in records) / n
    lat = [r["latency"] * 1000 for r in records]
    ttft = [r["ttft"] * 1000 for r in records]
    tokens = sum(r["tokens"] for r in records)
    return (f"| {name} | {n} | {swaps:.0f} | {apply_ms:.2f} | {reused:.1f} | {pct(ttft, 50):.0f} / {pct(ttft, 95):.0f} "
            f"| {pct(lat, 50):.0f} / {pct(lat, 95):.0f} | {n / wall:.1f} | {tokens / wall:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a bundle with a trained predictor (default: the demo bundle)")
    parser.add_argument("--clients", type=int, nargs="*", default=[32, 64])
    parser.add_argument("--rounds", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-caches", type=int, default=16, help="as ifprune serve --prompt-caches")
    args = parser.parse_args()
    model = args.model or checkpoint_bundle(Path(__file__).resolve().parents[1] / "examples" / "train_tiny" / "checkpoint")
    print("| workload | requests | rows swapped / request | apply ms / request | prompt tokens reused "
          "/ request | TTFT p50 / p95 ms | latency p50 / p95 ms | requests/s | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for clients, rounds in zip(args.clients, args.rounds):
        work = conversations(clients, rounds)
        for affinity in (False, True):
            running = run_server(model, affinity, clients, args.prompt_caches)
            try:
                records, wall = drive(running.url + "/v1", work, args.max_tokens)
            finally:
                running.stop()
            name = f"{clients} clients x {rounds}, affinity {'on' if affinity else 'off'}"
            print(row(name, records, wall), flush=True)


if __name__ == "__main__":
    main()
