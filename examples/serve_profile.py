"""Where the time to first token of `ifprune serve` goes, at 1 and 8 streaming clients.

Runs `make serve-load`'s same-task workload (examples/serve_load.py: one system prompt, 16
greedy streamed requests, clients in processes of their own unless --in-process) with the
worker thread instrumented: each of its calls below is timed as a segment of a timeline
(nested calls split their parent's segment, so the segments never overlap):

    wait       _schedule: waiting for work, deciding what runs
    tokenize   chat template and encoding of arrivals
    select     the trained predictor's mask (cached after the first request)
    apply      putting a mask in place (row swaps)
    insert     MaskBatch.add: the prefix cache's lookup and copy, BatchGenerator.insert
    prefill    PromptProcessingBatch.prompt: a chunk of prompt tokens (all prompts of the chunk)
    decode     GenerationBatch.next: a decode step (its eval waits for work queued before it)
    first step PromptProcessingBatch.generate: the new prompts' last token, queued (async)
    deliver    MaskBatch._token: detokenize, stop strings, hand the event to the HTTP loop
    step       the rest of MaskBatch.step

For every request, its TTFT window (the client sending it to the client reading its first
token) is cut into: HTTP in (sent -> queued), queued (-> its MaskBatch.add begins), in
batch (-> the worker emits its first token), delivery (-> the client has it); and the
worker's time inside the window is attributed to the segment kinds above (what the worker
was doing while this request waited for its first token). Medians over the requests.

    python -m examples.serve_profile                   # 1 and 8 clients, processes
    python -m examples.serve_profile --in-process      # the clients as threads of the server
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import threading
import time
from collections import defaultdict

from mlx_lm.generate import GenerationBatch, PromptProcessingBatch

from examples import serve_load
from ifprune_mlx import batching, engine, scheduler

KINDS = ["wait", "tokenize", "select", "apply", "insert", "prefill", "first step", "decode", "deliver", "step"]
WORKER = "ifprune-engine"


class Timeline:
    """Non-overlapping segments (kind, start, end) of the worker thread, and per-job marks."""

    def __init__(self):
        self.segments: list[tuple[str, float, float]] = []
        self.marks: dict[tuple[int, str], float] = {}
        self.prefills: list[tuple[int, int]] = []   # (prompts, tokens of the longest) per prefill chunk
        self._stack: list[list] = []

    def reset(self) -> None:
        self.segments.clear()
        self.marks.clear()
        self.prefills.clear()

    def enter(self, kind: str) -> None:
        now = time.perf_counter()
        if self._stack:
            top = self._stack[-1]
            self.segments.append((top[0], top[1], now))
        self._stack.append([kind, now])

    def exit(self) -> None:
        now = time.perf_counter()
        kind, start = self._stack.pop()
        self.segments.append((kind, start, now))
        if self._stack:
            self._stack[-1][1] = now


TIMELINE = Timeline()


def _timed(kind: str, method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if threading.current_thread().name != WORKER:
            return method(*args, **kwargs)
        TIMELINE.enter(kind)
        try:
            return method(*args, **kwargs)
        finally:
            TIMELINE.exit()
    return wrapper


def instrument() -> None:
    """Wrap the worker's calls (see the module's doc) and mark each job's begin and first token."""
    for owner, name, kind in [(scheduler.Scheduler, "_schedule", "wait"), (scheduler.Scheduler, "_tokenize", "tokenize"),
                              (scheduler.Scheduler, "_select", "select"), (engine.Engine, "apply", "apply"),
                              (batching.MaskBatch, "add", "insert"), (PromptProcessingBatch, "prompt", "prefill"),
                              (PromptProcessingBatch, "generate", "first step"), (GenerationBatch, "next", "decode"),
                              (batching.MaskBatch, "_token", "deliver"), (batching.MaskBatch, "step", "step")]:
        setattr(owner, name, _timed(kind, getattr(owner, name)))

    prompt = PromptProcessingBatch.prompt

    def counted_prompt(self, tokens):
        if tokens and threading.current_thread().name == WORKER:
            TIMELINE.prefills.append((len(tokens), max(len(t) for t in tokens)))
        return prompt(self, tokens)
    PromptProcessingBatch.prompt = counted_prompt

    begin, emit = scheduler.Scheduler._begin, scheduler.Job.emit

    def marked_begin(self, job):
        TIMELINE.marks[(id(job), "begin")] = time.perf_counter()
        return begin(self, job)

    def marked_emit(self, kind, payload=None):
        if kind == "start":
            TIMELINE.marks[(id(self), "start")] = time.perf_counter()
            TIMELINE.marks[(id(self), "enqueued")] = self.enqueued
            TIMELINE.marks[("question", self.prompt[-1]["content"])] = id(self)
        return emit(self, kind, payload)
    scheduler.Scheduler._begin, scheduler.Job.emit = marked_begin, marked_emit


def overlap(segments, start: float, end: float) -> dict[str, float]:
    """Seconds of each kind of segment inside [start, end]."""
    out = defaultdict(float)
    for kind, a, b in segments:
        if b > start and a < end:
            out[kind] += min(b, end) - max(a, start)
    return out


def profile(records: dict, mixed: bool) -> dict[str, float]:
    """Median ms per phase and per worker activity of the requests' TTFT windows."""
    rows = defaultdict(list)
    for j, r in records.items():
        job = TIMELINE.marks[("question", serve_load.request_prompt(j, mixed)[-1]["content"])]
        enqueued, begin, start = (TIMELINE.marks[(job, k)] for k in ("enqueued", "begin", "start"))
        phases = {"TTFT": r["first"] - r["sent"], "HTTP in": enqueued - r["sent"], "queued": begin - enqueued,
                  "in batch": start - begin, "delivery": r["first"] - start}
        phases.update({f"worker: {k}": v for k, v in overlap(TIMELINE.segments, r["sent"], r["first"]).items()})
        for k in ["TTFT", "HTTP in", "queued", "in batch", "delivery"] + [f"worker: {k}" for k in KINDS]:
            rows[k].append(phases.get(k, 0.0) * 1000)
    return {k: statistics.median(v) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bundle or model folder (default: the default chat model)")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--in-process", action="store_true", help="clients as threads of the server's process")
    args = parser.parse_args()
    instrument()
    load = os.getloadavg()
    columns, prefills = {}, {}
    for clients in args.clients:
        with serve_load.fresh_server(args.model, clients, False) as url:
            TIMELINE.reset()
            records, wall, cpu = serve_load.drive(url, clients, args.requests, False, args.max_tokens, args.in_process)
            columns[clients] = profile(records, False)
            prefills[clients] = list(TIMELINE.prefills)
    after = os.getloadavg()
    print(f"| phase (median ms over {args.requests} requests) | " + " | ".join(f"{c} client{'s' * (c > 1)}" for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for k in next(iter(columns.values())):
        print(f"| {k} | " + " | ".join(f"{col[k]:.0f}" for col in columns.values()) + " |")
    for c, chunks in prefills.items():
        sizes = defaultdict(int)
        for n, _ in chunks:
            sizes[n] += 1
        print(f"\n{c} clients: {len(chunks)} prefill chunks; prompts per chunk: "
              + ", ".join(f"{n}: {sizes[n]}x" for n in sorted(sizes))
              + f"; tokens of the longest prompt (median) {statistics.median(t for _, t in chunks) if chunks else 0}")
    print(f"\nclients {'threads of the server process' if args.in_process else 'in processes of their own'}; "
          f"load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, after {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f}")


if __name__ == "__main__":
    main()
