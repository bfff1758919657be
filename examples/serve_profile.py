"""Where the time to first token of `ifprune serve` goes, at 1 and 8 streaming clients.

Runs `make serve-load`'s same-task workload (examples/serve_load.py: one system prompt, its
density and BLAS threads; 16 greedy streamed requests here unless --requests, clients in
processes of their own unless --in-process) with the
worker thread instrumented: each of its calls below is timed as a segment of a timeline
(nested calls split their parent's segment, so the segments never overlap):

    wait       _schedule: waiting for work, deciding what runs
    tokenize   chat template and encoding of arrivals
    select     the trained predictor's mask (cached after the first request)
    apply      putting a mask in place (row swaps)
    insert     MaskBatch.add: the prefix cache's lookup and copy, BatchGenerator.insert
    prefill    PromptProcessingBatch.prompt: a chunk of prompt tokens (all prompts of the chunk)
    decode     PrimedGeneration.next: a decode step (its eval waits for work queued before it)
    first step PrimingPrompts.generate: the new prompts become rows of the batch (primed.py);
               with --plain-join, mlx-lm's PromptProcessingBatch.generate: a forward pass of
               the new prompts' last token, queued (async)
    deliver    MaskBatch._token: detokenize, stop strings, hand the event to the HTTP loop
    step       the rest of MaskBatch.step

For every request, its TTFT window (the client sending it to the client reading its first
token) is cut into: HTTP in (sent -> queued), queued (-> its MaskBatch.add begins), in
batch (-> the worker emits its first token), delivery (-> the client has it); and the
worker's time inside the window is attributed to the segment kinds above (what the worker
was doing while this request waited for its first token). Medians over the requests.

    python -m examples.serve_profile                   # 1 and 8 clients, processes
    python -m examples.serve_profile --in-process      # the clients as threads of the server
    python -m examples.serve_profile --floor           # the worker alone: 1 and 8 prompts at once, no HTTP
    python -m examples.serve_profile --cpu             # where the CPU goes per decode step (Linux)
    python -m examples.serve_profile --cpu --plain-join   # ... with mlx-lm's own first step per join
    python -m examples.serve_profile --no-gather       # ... without waiting for requests still arriving

--cpu runs the same workload and reads each thread's CPU time (/proc) before and after: the
worker thread (Python: building each step's graph, handing tokens out), the HTTP event loop,
the other threads of the server's process (MLX's and OpenBLAS's compute), and the client
processes; each divided by the decode steps the worker ran, beside the wall time per step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import threading
import time
from collections import defaultdict

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch

from examples import serve_load
from ifprune_mlx import batching, engine, primed, scheduler

KINDS = ["wait", "tokenize", "select", "apply", "insert", "prefill", "first step", "decode", "deliver", "step"]
WORKER = "ifprune-engine"


class Timeline:
    """Non-overlapping segments (kind, start, end) of the worker thread, and per-job marks."""

    def __init__(self):
        self.segments: list[tuple[str, float, float]] = []
        self.marks: dict[tuple[int, str], float] = {}
        self.prefills: list[tuple[int, int]] = []   # (prompts, tokens of the longest) per prefill chunk
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []

    def reset(self) -> None:
        self.segments.clear()
        self.marks.clear()
        self.prefills.clear()
        self.calls.clear()

    def enter(self, kind: str) -> None:
        now = time.perf_counter()
        self.calls[kind] += 1
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
                              (primed.PrimingPrompts, "generate", "first step"), (primed.PrimedGeneration, "next", "decode"),
                              (PromptProcessingBatch, "generate", "first step"), (GenerationBatch, "next", "decode"),
                              (batching.MaskBatch, "_token", "deliver"), (batching.MaskBatch, "step", "step")]:
        setattr(owner, name, _timed(kind, getattr(owner, name)))

    prompt, step = PromptProcessingBatch.prompt, GenerationBatch._step

    def counted_prompt(self, tokens):
        if tokens and threading.current_thread().name == WORKER:
            TIMELINE.prefills.append((len(tokens), max(len(t) for t in tokens)))
        return prompt(self, tokens)

    def counted_step(self):  # every forward pass of one token per sequence (decode, and mlx-lm's first step)
        TIMELINE.calls["forward pass (decode)"] += 1
        return step(self)
    PromptProcessingBatch.prompt, GenerationBatch._step = counted_prompt, counted_step

    begin, emit = scheduler.Scheduler._begin, batching.MaskBatch._emit

    def marked_begin(self, job):
        TIMELINE.marks[(id(job), "begin")] = time.perf_counter()
        return begin(self, job)

    def marked_emit(self, job, kind, payload=None):
        if kind == "start":
            TIMELINE.marks[(id(job), "start")] = time.perf_counter()
            TIMELINE.marks[(id(job), "enqueued")] = job.enqueued
            TIMELINE.marks[("question", job.prompt[-1]["content"])] = id(job)
        return emit(self, job, kind, payload)
    scheduler.Scheduler._begin, batching.MaskBatch._emit = marked_begin, marked_emit


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


class _Arrival:
    """What MaskBatch needs of a scheduler.Job, for the worker-only measurement."""

    def __init__(self, ids: list[int], max_tokens: int):
        self.ids, self.stop, self.constraint = ids, [], None
        self.sampling = {"max_tokens": max_tokens, "temp": 0.0, "top_p": 1.0, "seed": None}
        self.cancelled, self.first = threading.Event(), None

    def emit(self, kind: str, payload=None) -> None:
        if kind == "start":
            self.first = time.perf_counter()


class _LocalBatch(batching.MaskBatch):
    """A MaskBatch whose events go straight to its _Arrival jobs (no event loop)."""

    def _emit(self, job, kind: str, payload=None) -> None:
        job.emit(kind, payload)


def _first_tokens(eng, prompts: list[list[int]], warm: list[int]) -> tuple[float, object]:
    """The server's path without HTTP: `prompts` arrive at once in an empty batch whose prefix
    caches hold `warm` only (serve_load's warm-up); seconds until every one has its first
    token, and the generator's counters (prompt tokens, prompt and decode time)."""
    caches = batching.PrefixCaches(4)
    batch = _LocalBatch(eng, caches, len(prompts), stream=mx.default_stream(mx.default_device()))
    batch.add(_Arrival(warm, 2), "task", {})
    while batch.active:
        batch.step()
    arrivals = [_Arrival(ids, 2) for ids in prompts]
    start = time.perf_counter()
    with batch.generator.stats() as stats:
        for a in arrivals:
            batch.add(a, "task", {})
        while any(a.first is None for a in arrivals):
            batch.step()
    seconds = time.perf_counter() - start
    while batch.active:
        batch.step()
    batch.close()
    return seconds, stats


def _sgemm_gflops(rows: int, d_model: int, d_ffn: int, repeats: int = 5) -> float:
    """The machine's float32 matrix product at the FFN's shapes: GFLOP/s, the best of `repeats`."""
    x, w = mx.random.normal((rows, d_model)), mx.random.normal((d_ffn, d_model))
    mx.eval(x, w)
    best = min(_timed_once(lambda: mx.eval(x @ w.T)) for _ in range(repeats))
    return 2 * rows * d_model * d_ffn / best / 1e9


def _timed_once(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def compute_floor(model: str | None, clients: list[int], repeats: int = 5) -> list[str]:
    """Worker-only time to first tokens of 1 and of 8 arrivals at once (the ideal gather: one
    prefill batch), the FLOPs they need and the machine's measured GFLOP/s at these shapes."""
    from ifprune_mlx.opener import open_model

    eng = open_model(model)
    eng.apply(eng.select(serve_load.SYSTEMS[0], serve_load.DENSITY))  # the per-task mask: the system message
    warm = eng.prompt_tokens(serve_load.request_prompt(0, False, serve_load.WARM_UP))
    prompts = [eng.prompt_tokens(serve_load.request_prompt(j, False)) for j in range(max(clients))]
    d_model, kept = eng.config["hidden_size"], eng.applied.kept_counts
    per_token = sum(2 * p.size for _, p in _attention_parameters(eng)) + sum(2 * 3 * d_model * k for k in kept)
    lines = []
    for n in clients:
        runs = [_first_tokens(eng, prompts[:n], warm) for _ in range(repeats)]
        seconds = statistics.median(r[0] for r in runs)
        prompt_tokens = runs[0][1].prompt_tokens
        prompt_ms = statistics.median(r[1].prompt_time for r in runs) * 1000
        gflop = prompt_tokens * per_token / 1e9
        lines.append(f"{n} arrival{'s' * (n > 1)} at once: first tokens after {seconds * 1000:.0f} ms (median of {repeats}); "
                     f"prefill {prompt_tokens} new tokens, {gflop:.1f} GFLOP in {prompt_ms:.0f} ms "
                     f"({gflop / prompt_ms * 1000:.0f} GFLOP/s)")
    gflops = _sgemm_gflops(max(clients) * 16, d_model, max(kept))
    lines.append(f"the machine's float32 matrix product at the FFN's shape ({max(clients) * 16} x {d_model} x {max(kept)}): "
                 f"{gflops:.0f} GFLOP/s (best of 5)")
    return lines


def _attention_parameters(eng):
    """(name, array) of the attention projections of every layer (their FLOPs per token: 2 x size)."""
    from mlx.utils import tree_flatten

    return [(n, p) for n, p in tree_flatten(eng.model.parameters()) if ".self_attn." in n and n.endswith("weight")]


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by native thread id (Linux)."""
    ticks, out = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_per_step(clients: int, requests: int, max_tokens: int, model: str | None) -> dict[str, float]:
    """One same-task run: ms per decode step of wall time, of the worker's segments, and of CPU
    time by thread group (worker, HTTP loop and other Python threads, MLX/BLAS threads, clients)."""
    with serve_load.fresh_server(model, clients, False) as url:
        TIMELINE.reset()
        split, before = {}, thread_cpu()
        records, wall, _ = serve_load.drive(url, clients, requests, False, max_tokens, cpu_split=split)
        after = thread_cpu()
        python = {t.native_id: t.name for t in threading.enumerate()}
    groups = defaultdict(float)
    for tid, seconds in after.items():
        name = python.get(tid)
        group = ("worker thread" if name == WORKER else "benchmark's main thread" if tid == threading.main_thread().native_id
                 else "HTTP event loop (and other Python threads)" if name else "MLX and OpenBLAS threads")
        groups[group] += seconds - before.get(tid, 0.0)
    groups["client processes"] = split["clients"]
    steps = TIMELINE.calls["decode"]
    out = {"decode steps": steps, "tokens": sum(r["tokens"] for r in records.values()),
           "forward passes: one token per sequence": TIMELINE.calls["forward pass (decode)"],
           "forward passes: prefill": len(TIMELINE.prefills), "wall ms per step": wall * 1000 / steps}
    totals = overlap(TIMELINE.segments, min(r["sent"] for r in records.values()),
                     max(r["sent"] + r["latency"] for r in records.values()))  # the run's window only
    out.update({f"worker {k} (wall)": totals[k] * 1000 / steps for k in KINDS})
    out.update({f"CPU: {g}": v * 1000 / steps for g, v in sorted(groups.items())})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bundle or model folder (default: the default chat model)")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--in-process", action="store_true", help="clients as threads of the server's process")
    parser.add_argument("--floor", action="store_true",
                        help="instead: the worker alone (no HTTP) with the clients' prompts arriving at once")
    parser.add_argument("--cpu", action="store_true", help="instead: CPU time per decode step, by thread (Linux)")
    parser.add_argument("--plain-join", action="store_true",
                        help="joining requests get mlx-lm's forward pass of their own (no primed.py), for comparison")
    parser.add_argument("--no-gather", action="store_true",
                        help="a batch from idle and joiners do not wait for requests still arriving, for comparison")
    args = parser.parse_args()
    if args.requests > len(serve_load.QUESTIONS):  # requests are told apart by their question
        parser.error(f"--requests is at most {len(serve_load.QUESTIONS)} here (one per distinct question)")
    if args.plain_join:
        batching.primed_generator = BatchGenerator
    if args.no_gather:
        scheduler.GATHER_SECONDS = scheduler.JOIN_HOLD_SECONDS = 0.0
    if args.cpu:
        instrument()
        load = os.getloadavg()
        columns = {c: cpu_per_step(c, args.requests, args.max_tokens, args.model) for c in args.clients}
        after = os.getloadavg()
        print("| ms per decode step | " + " | ".join(f"{c} client{'s' * (c > 1)}" for c in columns) + " |")
        print("|---|" + "---|" * len(columns))
        for k in next(iter(columns.values())):
            print(f"| {k} | " + " | ".join(f"{col[k]:.1f}" if isinstance(col[k], float) else str(col[k]) for col in columns.values()) + " |")
        print(f"\nload average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, after {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f}")
        return
    if args.floor:
        load = os.getloadavg()
        print("The worker alone, no HTTP (examples.serve_profile --floor):")
        print("\n".join(f"- {line}" for line in compute_floor(args.model, args.clients)))
        after = os.getloadavg()
        print(f"load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, after {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f}")
        return
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
