"""The worker's hand-off of events (one per step and event loop) and its wait for requests
still arriving (scheduler.arriving): a batch starting from idle, or a request joining one,
prefills with the requests the HTTP side is still reading. Tiny model, no HTTP, bounded waits."""

from __future__ import annotations

import asyncio
import threading

import pytest

import ifprune_mlx as ifp
from ifprune_mlx import scheduler as scheduler_module
from ifprune_mlx.jobs import Job, post
from ifprune_mlx.scheduler import Scheduler

SYSTEM = {"role": "system", "content": "Answer in French."}
WAIT = 60  # seconds: a bound on every wait, never reached when the code is right


@pytest.fixture(scope="module")
def engine(endless_bundle):
    return ifp.load(endless_bundle)


def job_of(engine, question: str, loop, max_tokens: int = 6) -> Job:
    messages = [SYSTEM, {"role": "user", "content": question}]
    return Job(prompt=messages, ids=None, task=SYSTEM["content"],
               sampling={"max_tokens": max_tokens, "temp": 0.0, "top_p": 1.0, "seed": None},
               density=None, selector="predictor", dense=False, stop=[], loop=loop)


def reference(engine, job: Job) -> str:
    engine.apply(engine.select(job.task))
    try:
        return engine.generate(job.prompt, max_tokens=job.sampling["max_tokens"])
    finally:
        engine.apply("auto")


async def answer(job: Job) -> tuple[str, dict]:
    """The job's text and its report (the `ifprune` object), from its events."""
    pieces, report = [], None
    while (event := await asyncio.wait_for(job.events.get(), WAIT))[0] != "done":
        assert event[0] != "error", event
        if event[0] == "start":
            report = event[1]
        pieces += [event[1][0]] if event[0] == "text" else []
    return "".join(pieces), report


class CountingLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        super().__init__()
        self.threadsafe_calls = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.threadsafe_calls += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_post_hands_a_steps_events_over_in_one_call_per_loop_in_order():
    loops = [CountingLoop(), CountingLoop()]
    try:
        jobs = [Job(prompt="p", ids=None, task="p", sampling={}, density=None, selector="", dense=True, stop=[],
                    loop=loops[i % 2]) for i in range(4)]
        events = [(jobs[i % 4], "text", (str(i), None)) for i in range(12)]
        post(events)
        assert [loop.threadsafe_calls for loop in loops] == [1, 1]
        for loop in loops:
            loop.run_until_complete(asyncio.sleep(0))
        for j, job in enumerate(jobs):
            got = [job.events.get_nowait() for _ in range(job.events.qsize())]
            assert got == [("text", (str(i), None)) for i in range(12) if i % 4 == j]
        post([])  # nothing: no call
        assert [loop.threadsafe_calls for loop in loops] == [1, 1]
    finally:
        for loop in loops:
            loop.close()
    post([(jobs[0], "text", ("late", None))])  # a closed loop: the server is going down; no error


def test_gather_waits_for_requests_still_arriving_and_no_longer(engine):
    scheduler = Scheduler(lambda: engine)  # not started: _gather and submit need no worker
    scheduler._gather(WAIT)  # nothing arriving: returns at once
    loop = asyncio.new_event_loop()
    try:
        with scheduler.arriving() as arrival:
            gathering = threading.Thread(target=scheduler._gather, args=(WAIT,))
            gathering.start()
            gathering.join(0.05)
            assert gathering.is_alive()  # a request is being read: the batch waits for it
            scheduler.submit(job_of(engine, "Q", loop), arrival)
            gathering.join(WAIT / 2)
            assert not gathering.is_alive()  # it is queued: the wait ends before its bound
        assert scheduler._arriving == 0  # submit ended the arrival; leaving the block changes nothing
        with pytest.raises(ValueError):
            with scheduler.arriving():
                raise ValueError("a refused request (400)")
        assert scheduler._arriving == 0
    finally:
        loop.close()


def served(endless_bundle, scenario):
    """Run the coroutine function scenario(scheduler) with a started worker; its result."""
    scheduler = Scheduler(lambda: ifp.load(endless_bundle))
    scheduler.start()
    try:
        return asyncio.run(scenario(scheduler))
    finally:
        scheduler.stop()


def test_a_batch_starting_from_idle_waits_for_a_request_still_being_read(endless_bundle, engine, monkeypatch):
    # A arrives at an idle worker while B is still being read (its arrival open): they prefill
    # in one batch, and each answer is the one it gets alone.
    monkeypatch.setattr(scheduler_module, "GATHER_SECONDS", WAIT)

    async def scenario(scheduler):
        loop = asyncio.get_running_loop()
        a, b = job_of(engine, "Question A", loop), job_of(engine, "Question B, a longer one", loop)
        with scheduler.arriving() as arrival:
            scheduler.submit(a)
            await asyncio.sleep(0.2)  # the worker is gathering: B is still arriving
            scheduler.submit(b, arrival)
        return [a, b], await asyncio.gather(answer(a), answer(b))

    jobs, answers = served(endless_bundle, scenario)
    assert [report["batch"] for _, report in answers] == [2, 2]  # both first tokens in one step
    assert [text for text, _ in answers] == [reference(engine, job) for job in jobs]


def test_a_joiner_waits_for_a_request_still_being_read_and_they_join_together(endless_bundle, engine, monkeypatch):
    # A decodes; B queues to join while C is still being read: B is held until C is queued,
    # then both join in one step (one prefill), and every answer is the one it gets alone.
    monkeypatch.setattr(scheduler_module, "JOIN_HOLD_SECONDS", WAIT)

    async def scenario(scheduler):
        loop = asyncio.get_running_loop()
        a = job_of(engine, "Question A", loop, max_tokens=100_000)  # as long as the context: cancelled below
        b, c = job_of(engine, "Question B", loop), job_of(engine, "Question C, longer", loop)
        scheduler.submit(a)
        while (await asyncio.wait_for(a.events.get(), WAIT))[0] != "start":
            pass  # A decodes
        with scheduler.arriving() as arrival:
            scheduler.submit(b)
            await asyncio.sleep(0.2)  # steps pass: B waits for C
            scheduler.submit(c, arrival)
        answers = await asyncio.gather(answer(b), answer(c))
        a.cancel()
        return [b, c], answers

    jobs, answers = served(endless_bundle, scenario)
    assert [report["batch"] for _, report in answers] == [3, 3]  # B and C got their first tokens together
    assert [text for text, _ in answers] == [reference(engine, job) for job in jobs]
