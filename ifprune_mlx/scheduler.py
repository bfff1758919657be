"""The worker of `ifprune serve`: one thread owns the Engine and runs queued jobs (no HTTP).

One worker thread owns the Engine (it is not thread-safe, and MLX work stays on one thread);
every tokenizer call happens on it too. Requests wait in a bounded FIFO queue (full:
QueueFull, with a Retry-After). The requests that run form one batch under one applied mask
(batching.MaskBatch): queued requests whose mask equals the batch's join it between decode
steps; the others wait until the batch has drained. Then, with mask affinity, the worker
selects the masks of the oldest queued requests and starts the batch whose mask swaps the
fewest rows from those in place (the same mask swaps none). A request is passed over at most
MAX_OVERTAKES times: once the oldest has been, nothing joins the batch and it runs next.
Only masks known before running take part (the trained predictor's, dense); the
training-free selector's mask comes out of the prompt's own dense prefill, so such a request
keeps its FIFO place and runs alone, as does a seeded sampled one (the seed is global to MLX).
Requests sent together prefill together: the HTTP side counts the requests it is still
reading (arriving()); a batch starting from idle waits for them (at most GATHER_SECONDS), a
request about to join a running batch is held for them (at most JOIN_HOLD_SECONDS, the batch
decoding meanwhile). Events reach the caller's event loop through an asyncio queue per job
(jobs.post: a step's events in one call per loop); a cancelled job leaves the batch at the
next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from typing import Callable

import mlx.core as mx

from .batching import Decoding, MaskBatch, PrefixCaches
from .chat import cache_key, mask_key
from .errors import IFPruneError
from .grammar import GrammarError, Grammars
from .jobs import Job, RequestError, prompt_ids
from .selectors import Selection

__all__ = ["Job", "QueueFull", "RequestError", "Scheduler", "WorkerStopped", "prompt_ids"]

log = logging.getLogger("ifprune.serve")

AFFINITY_WINDOW = 16   # queued requests the scheduler looks at for a matching mask
MAX_OVERTAKES = 16     # how often a queued request may be passed over for a matching one
MAX_BATCH = 16         # sequences decoded together
LET_IN_ROUNDS = 4      # event-loop iterations a batch starting from idle lets pass first (see _let_in)
LET_IN_SECONDS = 0.05  # ... waiting at most this long
GATHER_SECONDS = 0.1   # most a batch starting from idle waits for requests still arriving (see _gather)
JOIN_HOLD_SECONDS = 0.1  # most a joiner waits for requests still arriving, to prefill with them


class WorkerStopped(RuntimeError):
    """The worker thread has ended (stopped, or died of a bug): nothing more will run."""


class _Arrival:
    """A request the HTTP side is reading (Scheduler.arriving); over once queued or refused."""

    over = False


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after



class Scheduler:
    """The worker thread that owns the Engine and runs queued jobs in batches of one mask.

    Args:
        load: called on the worker thread to make the Engine.
        max_queue: most jobs waiting (those running not counted).
        affinity: start the batch whose rows are in place first (see the module's doc).
        prompt_caches: KV caches kept (LRU) of finished requests, per mask.
        max_batch: most sequences decoded together.
    """

    def __init__(self, load: Callable[[], object], *, max_queue: int = 64, affinity: bool = True,
                 prompt_caches: int = 16, max_batch: int = MAX_BATCH):
        self.max_queue, self.affinity, self.prompt_caches = max_queue, affinity, prompt_caches
        self.max_batch = max_batch
        self.engine = None
        self.batch: MaskBatch | None = None
        self.caches = PrefixCaches(prompt_caches)
        self.grammars: Grammars | None = None  # made on first use of response_format
        self._load = load
        self._pending: deque[Job] = deque()
        self._arriving = 0                 # HTTP requests being read and checked, not yet submitted
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "swaps": 0, "batches": 0}
        self.last: dict | None = None      # result of the last finished job
        self._job_seconds = 1.0            # moving average of a job's time, for Retry-After
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
            for d in list(self.batch.active.values()) if self.batch else []:  # the worker's; read only
                d.job.cancel()
            self._cond.notify_all()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        """Requests in the batch."""
        return len(self.batch) if self.batch is not None else 0

    @property
    def state(self) -> str:
        """The worker's state: "loading", "idle", "busy", "dead" (its thread ended)."""
        if not self._ready.is_set():
            return "loading"
        if not self._thread.is_alive():
            return "dead"
        return "busy" if self.running else "idle"

    @contextlib.contextmanager
    def arriving(self):
        """Around the HTTP side's reading and checking of a request, up to its submit(job,
        arrival): a batch about to start, or a request about to join one, waits a little for
        the requests still arriving, so that prompts sent together prefill together.

            with scheduler.arriving() as arrival:
                job = ...                        # read and check the request
                scheduler.submit(job, arrival)
        """
        arrival = _Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield arrival
        finally:
            with self._cond:
                self._arrived(arrival)

    def _arrived(self, arrival: "_Arrival | None") -> None:
        """(with the lock) The request is queued or refused: it is no more arriving."""
        if arrival is not None and not arrival.over:
            arrival.over = True
            self._arriving -= 1
            self._cond.notify_all()

    def submit(self, job: Job, arrival: "_Arrival | None" = None) -> None:
        """Queue a job; raises QueueFull (with a Retry-After in seconds) when the queue is full.
        `arrival` (from arriving()) ends with it."""
        with self._cond:
            self._arrived(arrival)
            if self._ready.is_set() and not self._thread.is_alive():
                raise WorkerStopped("the engine's worker has stopped; the server must be restarted")
            if len(self._pending) >= self.max_queue or self._stopping or self._load_error is not None:
                wait = self._job_seconds * (len(self._pending) + 1) / self.max_batch
                raise QueueFull(max(1, min(60, math.ceil(wait))))
            self._pending.append(job)
            self._cond.notify()

    # -- worker thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._work()
        finally:
            # A thread's MLX streams must end with it: left to the process's exit they abort it
            # now and then ("terminate called without an active exception"; 2 runs in 12 here).
            mx.clear_streams()

    def _work(self) -> None:
        try:
            self.engine = self._load()
            self.batch = self._new_batch()
        except BaseException as e:  # reported by start()
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._schedule():
                if self.batch.active:
                    self._step()
        except BaseException:
            log.exception("the engine's worker stopped")
            raise
        finally:
            self._abandon()

    def _abandon(self) -> None:
        """The worker ends: every job still waiting or running gets an error (none hangs)."""
        with self._cond:
            jobs = [d.job for d in self.batch.active.values()] + list(self._pending)
            self._pending.clear()
        for job in jobs:
            if not job.cancelled.is_set():
                self._fail(job, WorkerStopped("the engine's worker stopped; the server must be restarted"))
        self.batch.close()

    def _new_batch(self) -> MaskBatch:
        # the worker's own stream, as mlx_lm.server's: generation and row swaps synchronize on it
        return MaskBatch(self.engine, self.caches, self.max_batch, stream=mx.default_stream(mx.default_device()))

    def _step(self) -> None:
        try:
            finished = self.batch.step()
        except Exception as e:  # a bug or an engine failure: the batch fails, the server goes on
            log.exception("generation failed")
            for d in self.batch.active.values():
                self._fail(d.job, e)
            self.batch.close()
            self.batch = self._new_batch()
            return
        for d, finish in finished:
            self._finish(d, finish)

    def _finish(self, d: Decoding, finish: str) -> None:
        job = d.job
        self.stats["cancelled" if finish == "cancelled" else "served"] += 1
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": d.tokens,
                 "total_tokens": len(job.ids) + d.tokens}
        self.last = {"finish_reason": finish, "usage": usage, "ifprune": d.report}
        job.emit("done", self.last)
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - job.enqueued)

    def _fail(self, job: Job, e: Exception) -> None:
        self.stats["failed"] += 1
        job.emit("error", e)

    def _schedule(self) -> bool:
        """Start or join what can run now; waits while there is nothing to do. False: stopping."""
        with self._cond:
            while True:
                for job in [j for j in self._pending if j.cancelled.is_set()]:
                    self._pending.remove(job)
                    self.stats["cancelled"] += 1
                if self._stopping:
                    return False
                if self._pending and (not self.batch.active or self.batch.room()):
                    break
                if self.batch.active:
                    return True
                self._cond.wait()
            starting = None if self.batch.active else self._pending[0].loop
        if starting is not None:
            self._let_in(starting)
            self._gather(GATHER_SECONDS)
        with self._cond:
            fresh = [j for j in self._pending if j.ids is None]
            window = list(self._pending)[:AFFINITY_WINDOW]
        for job in fresh:  # tokenize every arrival at once: a bad prompt is answered without waiting
            self._tokenize(job)
        for job in window:  # the masks of queued jobs, where they are known before running
            self._select(job)
        with self._cond:  # decide here; the engine's work runs outside the lock (submit takes it)
            for job in [j for j in self._pending if j.error is not None]:
                self._pending.remove(job)
                self._fail(job, job.error)
            first = self._pick(window) if not self.batch.active and self._pending else None
            if first is not None:
                self._dequeue(first)
        if first is not None:
            self._begin(first)
        with self._cond:
            joiners = self._joiners(window)
            if joiners and self._arriving and time.perf_counter() - joiners[0].enqueued < JOIN_HOLD_SECONDS:
                joiners = []  # hold them a step or two for those arriving: one prefill for all
            for job in joiners:
                self._dequeue(job)
        for job in joiners:
            self._begin(job)
        return True

    def _let_in(self, loop: asyncio.AbstractEventLoop) -> None:
        """Before a batch starts from idle, let the HTTP event loop run a few iterations (at
        most LET_IN_SECONDS): requests it has already received but not yet queued (clients
        that all got their answers in one step send their next ones together) queue now, and
        their prompts prefill in one batch with the first, not after its prefill. Costs one
        round trip to an idle loop."""
        passed = threading.Event()

        def hop(rounds: int) -> None:
            if rounds:
                loop.call_soon(hop, rounds - 1)
            else:
                passed.set()
        try:
            loop.call_soon_threadsafe(hop, LET_IN_ROUNDS)
        except RuntimeError:  # the loop is closed: the server is going down
            return
        passed.wait(LET_IN_SECONDS)

    def _gather(self, seconds: float) -> None:
        """Wait (at most `seconds`) while requests are still being read by the HTTP side: they
        queue before the batch starts and prefill with the first (a lone client waits not at
        all: nothing else is arriving)."""
        deadline = time.perf_counter() + seconds
        with self._cond:
            while self._arriving and not self._stopping and (left := deadline - time.perf_counter()) > 0:
                self._cond.wait(left)

    def _dequeue(self, job: Job) -> None:
        """Take a job out of the queue to run it; those it passes over count it."""
        for other in self._pending:
            if other is job:
                break
            other.overtaken += 1
        self._pending.remove(job)

    def _pick(self, window: list[Job]) -> Job | None:
        """The job that starts the next batch: the head, or with affinity the cheapest swap
        (None: the head arrived after this round's preparation; the next round takes it)."""
        head = self._pending[0]
        if head.ids is None or not (head.selected or head.griffin):
            return None
        if not self.affinity or head.overtaken >= MAX_OVERTAKES or self._swap_cost(head) is None:
            return head
        costs = [(cost, i, job) for i, job in enumerate(window)
                 if job in self._pending and (cost := self._swap_cost(job)) is not None]
        return min(costs, key=lambda c: c[:2], default=(0, 0, head))[2]

    def _joiners(self, window: list[Job]) -> list[Job]:
        """Queued jobs that join the running batch now: those of its mask, in queue order,
        while there is room. With affinity they may pass others, but none more than
        MAX_OVERTAKES times in all; without, only the queue's head may join (plain FIFO)."""
        batch = self.batch
        if not batch.active or not batch.room():
            return []
        key = next(iter(batch.active.values())).job.key
        chosen, passed = [], []
        for job in window:
            if job not in self._pending:
                continue
            if not (job.selected and not job.solo and job.key == key):
                if not self.affinity:
                    break
                passed.append(job)
                continue
            if len(chosen) == batch.room() or any(o.overtaken + len(chosen) >= MAX_OVERTAKES for o in passed):
                break
            chosen.append(job)
        return chosen

    def _begin(self, job: Job) -> None:
        """Put a dequeued job into the batch (applying its mask if the batch is empty)."""
        queue_ms = (time.perf_counter() - job.enqueued) * 1000
        try:
            if job.griffin:
                self._begin_griffin(job, queue_ms)
                return
            stats = None
            if not self.batch.active:
                stats = self.engine.apply(job.selection)
                self.stats["batches"] += 1
                self.stats["swaps"] += stats.swaps
                self.batch.closed = job.solo
                if job.solo:
                    mx.random.seed(job.sampling["seed"])
            dense_prefill = not job.dense and self.engine.prefills_dense(job.selector)
            self.batch.add(job, cache_key(job.key, dense_prefill),
                           self._report(job, job.selection, stats, queue_ms, job.select_ms))
        except Exception as e:  # an engine failure: this request fails, the server goes on
            if not isinstance(e, IFPruneError):
                log.exception("generation failed")
            self._fail(job, e)

    def _begin_griffin(self, job: Job, queue_ms: float) -> None:
        """The training-free selector: a dense pass over the prompt scores the channels and
        fills the KV cache; the mask is applied and the job decodes alone (GRIFFIN)."""
        engine = self.engine
        engine.apply("auto")
        before = engine.last_apply
        prefilled = engine.prefill_dense(job.prompt, job.ids, job.density, job.selector)
        if prefilled is None:  # a one-token prompt: select on it, prefill pruned
            job.selection = engine.select(job.prompt, job.density, job.selector)
            engine.apply(job.selection)
            cache, reused, select_ms = None, 0, job.selection.seconds * 1000
        else:
            cache, seconds = prefilled
            job.selection, reused, select_ms = engine.applied, len(job.ids) - 1, seconds * 1000
        engine.apply(job.selection)  # pinned, as engine.stream_responses does for the call
        stats = engine.last_apply if engine.last_apply is not before else None
        self.stats["batches"] += 1
        self.stats["swaps"] += 0 if stats is None else stats.swaps
        self.batch.closed = True
        report = self._report(job, job.selection, stats, queue_ms, select_ms)
        # its prompt's keys and values were computed densely: its cache serves no pruned request
        self.batch.add(job, cache_key(job.key, True), report, cache=cache, reused=reused)
        if cache is not None:  # the dense prefill is reported as prefill
            report.update(reused_tokens=0, prefill_tokens=len(job.ids))

    def _swap_cost(self, job: Job) -> int | None:
        """Rows running `job` would swap now (None: not known before it runs)."""
        if job.error is not None:
            return 0
        if not job.selected:
            return None
        return self.engine.swap_cost(job.selection)

    def _tokenize(self, job: Job) -> None:
        """Token ids and the grammar of a new job (the tokenizer is used on this thread only)."""
        try:
            job.ids = prompt_ids(self.engine, job.prompt, job.tools)
            if job.sampling.get("response_format"):
                job.constraint = self._grammars().constraint(job.sampling["response_format"])
            job.emit("queued")
        except RequestError as e:
            job.error = e
        except GrammarError as e:
            job.error = RequestError(str(e), "response_format")
        except Exception as e:  # a bug: this request fails, the worker goes on
            log.exception("preparing a request failed")
            job.error = e

    def _grammars(self) -> Grammars:
        if self.grammars is None:
            vocab = self.engine.config.get("vocab_size") or len(self.engine.tokenizer.vocab)
            self.grammars = Grammars(self.engine.tokenizer, vocab)
        return self.grammars

    def _select(self, job: Job) -> None:
        if job.selected or job.griffin or job.error is not None:
            return
        if job.dense:
            job.selection, job.selected = None, True
            return
        start = time.perf_counter()
        try:
            job.selection = self.engine.select(job.task, job.density, job.selector)
            job.selected = True
        except Exception as e:  # a bad request (IFPruneError), or a bug: this request fails, the worker goes on
            if not isinstance(e, IFPruneError):
                log.exception("selecting a request's mask failed")
            job.error = e
        job.select_ms = (time.perf_counter() - start) * 1000

    def _report(self, job: Job, selection: Selection | None, stats, queue_ms: float, select_ms: float) -> dict:
        """The `ifprune` object of a response: what ran and what it cost (MaskBatch adds the
        prompt tokens reused and prefilled, and the batch size at its first token)."""
        engine = self.engine
        return {
            "selector": None if selection is None else selection.source,
            "density": 1.0 if selection is None else round(selection.density, 6),
            "kept": [engine.d_ffn] * engine.n_layers if selection is None else selection.kept_counts,
            "mask": mask_key(selection),
            "select_ms": round(select_ms, 3),
            "apply_ms": round(0.0 if stats is None else stats.seconds * 1000, 3),
            "swaps": 0 if stats is None else stats.swaps,
            "queue_ms": round(queue_ms, 3),
        }
