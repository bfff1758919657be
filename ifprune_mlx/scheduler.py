"""The worker of `ifprune serve`: one thread owns the Engine and runs queued jobs (no HTTP).

One worker thread owns the Engine (it is not thread-safe, and MLX work stays on one thread);
every tokenizer call happens on it too. Requests wait in a bounded FIFO queue (full:
QueueFull, with a Retry-After). With mask affinity the worker selects the masks of the oldest
queued requests and runs first the one that swaps the fewest rows from those in place (the
same mask swaps none), so a mixed workload does not swap rows back and forth; a request is
passed over at most MAX_OVERTAKES times. Only masks known before running take part (the
trained predictor's, dense); the training-free selector's mask comes out of the prompt's own
dense prefill, so such a request runs in FIFO order. Events reach the caller's event loop
through an asyncio queue per job; a cancelled job stops at the next token. Per mask, a KV
cache (chat.MaskCaches, as in `ifprune chat`) lets a conversation's next request prefill only
what is new.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .chat import MaskCaches, mask_key
from .errors import IFPruneError
from .selectors import Selection

log = logging.getLogger("ifprune.serve")

AFFINITY_WINDOW = 16   # queued requests the scheduler looks at for a matching mask
MAX_OVERTAKES = 16     # how often a queued request may be passed over for a matching one

@dataclass
class Job:
    """One request: what to run, and how its events reach the event loop."""

    prompt: object                   # chat messages (list of dicts) or the completion's text
    ids: list[int] | None            # the whole prompt's token ids (None: tokenized by the worker)
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


class RequestError(IFPruneError, ValueError):
    """A request the worker refuses (found when tokenizing): `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def prompt_ids(engine, prompt) -> list[int]:
    """A job's token ids: chat messages through the chat template, a completion's text as is.

    Raises RequestError for what the model cannot take (a template refusing the messages, an
    empty prompt, a prompt as long as the context)."""
    try:
        ids = engine.prompt_tokens(prompt) if isinstance(prompt, list) else engine.tokenizer.encode(prompt)
    except Exception as e:  # the chat template refuses these messages (jinja raises many types)
        raise RequestError(f"the chat template refuses these messages: {e}", "messages") from None
    if not ids:
        raise RequestError("the prompt is empty", "prompt")
    context = engine.context_length
    if context and len(ids) >= context:
        raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {context}",
                           "messages" if isinstance(prompt, list) else "prompt", "context_length_exceeded")
    return list(ids)


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
        for job in window:  # tokens, and the masks where they are known before running
            self._prepare(job)
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

    def _prepare(self, job: Job) -> None:
        """Tokenize a job and select its mask (unless the mask comes out of its prefill)."""
        if job.error is not None:
            return
        if job.ids is None:
            try:
                job.ids = prompt_ids(self.engine, job.prompt)
            except RequestError as e:
                job.error = e
                return
        if not job.selected and not job.griffin:
            self._select(job)

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
        self._prepare(job)
        if job.error is not None:
            raise job.error
        if job.griffin:
            engine.apply("auto")
            before = engine.last_apply
            lease = None
            responses = engine.stream_responses(job.prompt, tokens=job.ids, density=job.density,
                                                selector=job.selector, **job.sampling)
        else:
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

