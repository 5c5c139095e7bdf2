"""The continuous-batching Scheduler without HTTP: rows that share decode steps give what each gives alone
(greedy and seeded sampling, stop strings / tokens, repetition penalty), the checks at submit, the queue
bound, a failed model step, shutdown, and the grow binding served one request at a time."""

from __future__ import annotations

import queue

import pytest

from twophase.compiler.errors import ContextLengthError, TwophaseError
from twophase.runtime.engine import Engine
from twophase.runtime.sampler import SamplingParams
from twophase.serve.scheduler import (
    Failed,
    Finished,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    TextDelta,
)

from .conftest import CONTEXT, slow_decode, wait_until

PROMPTS = ["a", "hello there", "the quick brown fox jumps", "xyz" * 9, "q", "mm mm mm"]


class Collector:
    """on_event callback: the request's text and final event."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def __call__(self, event) -> None:
        self.events.put(event)

    def result(self, timeout: float = 20.0) -> tuple[str, Finished | Failed]:
        parts = []
        while True:
            ev = self.events.get(timeout=timeout)
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
            else:
                return "".join(parts), ev


def request(engine: Engine, prompt: str, n: int, **kwargs) -> GenerationRequest:
    stop = tuple(kwargs.pop("stop", ()))
    return GenerationRequest(tuple(engine.tokenizer.encode(prompt)), n, SamplingParams(**kwargs), stop)


@pytest.fixture
def scheduler(serve_artifact):
    s = Scheduler(Engine.load(serve_artifact("bound")), max_batch=4)
    s.start()
    yield s
    s.close()


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=5),
                                      dict(temperature=0.0, repetition_penalty=1.3)])
def test_rows_give_what_they_give_alone(scheduler, reference, sampling):
    jobs = [(p, 5 + 4 * i) for i, p in enumerate(PROMPTS)]  # 6 requests, 4 slots: two wait, all leave at different steps
    collectors = [Collector() for _ in jobs]
    for (p, n), c in zip(jobs, collectors):
        scheduler.submit(request(scheduler.engine, p, n, **sampling), c)
    for (p, n), c in zip(jobs, collectors):
        text, end = c.result()
        assert text == reference.generate(p, max_new_tokens=n, stream=False, **sampling)
        assert isinstance(end, Finished) and end.prompt_tokens == len(reference.tokenizer.encode(p))
        assert end.reason in (FinishReason.LENGTH, FinishReason.EOS) and 1 <= end.completion_tokens <= n
    assert 1 < scheduler.stats.peak_batch <= 4


def test_stop_strings_and_tokens(scheduler, reference):
    full = reference.generate("hello there", max_new_tokens=30, stream=False)
    ids = list(reference.generate_ids(reference.tokenizer.encode("hello there"), max_new_tokens=30))
    a, b = Collector(), Collector()
    scheduler.submit(request(scheduler.engine, "hello there", 30, stop=[full[3:5]]), a)
    scheduler.submit(request(scheduler.engine, "hello there", 30, stop_token_ids=(ids[4],)), b)
    text, end = a.result()
    assert text == full[: full.index(full[3:5])] and end.reason is FinishReason.STOP_STRING
    text, end = b.result()
    want = reference.generate("hello there", max_new_tokens=30, stop_token_ids=[ids[4]], stream=False)
    assert text == want and end.reason is FinishReason.STOP_TOKEN and end.completion_tokens == ids.index(ids[4]) + 1


def test_submit_checks_before_queueing(scheduler):
    engine = scheduler.engine
    with pytest.raises(ContextLengthError, match=str(CONTEXT)):
        scheduler.submit(GenerationRequest((5,) * 500, 100), Collector())
    with pytest.raises(TwophaseError, match="empty prompt"):
        scheduler.submit(GenerationRequest((), 4), Collector())
    with pytest.raises(TwophaseError, match="vocab|token ids"):
        scheduler.submit(GenerationRequest((engine.facts.vocab_size,), 4), Collector())
    with pytest.raises(TwophaseError, match="max_new_tokens"):
        scheduler.submit(GenerationRequest((5,), 0), Collector())
    assert scheduler.waiting == 0 and scheduler.stats.admitted == 0


def test_queue_is_bounded(serve_artifact):
    s = Scheduler(Engine.load(serve_artifact("bound")), max_batch=1, max_queue=2)
    collectors = [Collector(), Collector()]
    for c in collectors:  # not started yet: both wait
        s.submit(request(s.engine, "abc", 3), c)
    with pytest.raises(QueueFullError):
        s.submit(request(s.engine, "abc", 3), Collector())
    s.start()
    try:
        assert all(isinstance(c.result()[1], Finished) for c in collectors)
    finally:
        s.close()


def test_cancel_frees_the_slot(scheduler):
    with slow_decode(scheduler.engine, 0.01):
        c = Collector()
        ticket = scheduler.submit(request(scheduler.engine, "abc", 400), c)
        assert wait_until(lambda: scheduler.running == 1)
        ticket.cancel()
        _, end = c.result()
        assert end.reason is FinishReason.CANCELLED and end.completion_tokens < 400
        assert scheduler.running == 0


def test_a_failed_step_fails_its_batch_and_the_server_goes_on(scheduler, reference):
    engine = scheduler.engine
    fast = engine.decode_one_token

    def broken(*args, **kwargs):
        del engine.decode_one_token  # fail once
        raise RuntimeError("device lost")

    engine.decode_one_token = broken
    c = Collector()
    scheduler.submit(request(engine, "abc", 10), c)
    _, end = c.result()
    assert isinstance(end, Failed) and "device lost" in end.message
    assert engine.decode_one_token == fast
    c = Collector()
    scheduler.submit(request(engine, "abc", 10), c)
    assert c.result()[0] == reference.generate("abc", max_new_tokens=10, stream=False)


def test_close_fails_what_is_left(serve_artifact):
    s = Scheduler(Engine.load(serve_artifact("bound")), max_batch=1)
    s.start()
    with slow_decode(s.engine, 0.01):
        running, waiting = Collector(), Collector()
        s.submit(request(s.engine, "abc", 400), running)
        s.submit(request(s.engine, "abc", 400), waiting)
        assert wait_until(lambda: s.running == 1)
        s.close()
    assert not s.alive
    for c in (running, waiting):
        _, end = c.result()
        assert isinstance(end, Failed) and "shutting down" in end.message
    with pytest.raises(SchedulerClosedError):
        s.submit(request(s.engine, "abc", 3), Collector())


def test_grow_binding_serves_one_request_at_a_time(serve_artifact, reference):
    engine = Engine.load(serve_artifact("grow"))
    assert not engine.bound
    s = Scheduler(engine, max_batch=8)
    assert s.max_batch == 1
    s.start()
    try:
        collectors = [Collector() for _ in PROMPTS[:3]]
        for p, c in zip(PROMPTS, collectors):
            s.submit(request(engine, p, 12), c)
        for p, c in zip(PROMPTS, collectors):
            assert c.result()[0] == reference.generate(p, max_new_tokens=12, stream=False)
        assert s.stats.peak_batch == 1
    finally:
        s.close()


def test_scheduler_needs_a_tokenizer(serve_artifact):
    engine = Engine.load(serve_artifact("bound"))
    engine.tokenizer = None
    with pytest.raises(TwophaseError, match="no tokenizer"):
        Scheduler(engine)
    engine = Engine.load(serve_artifact("bound"))
    with pytest.raises(TwophaseError, match="at least 1"):
        Scheduler(engine, max_batch=0)


def test_prefill_budget_spreads_a_burst_over_steps(serve_artifact):
    """With a budget of one prompt per step, the first request decodes before the next is prefilled."""
    order = []

    def log(i):
        return lambda ev: order.append(i)

    prompts = ["hello there", "abc", "the quick brown fox", "q"]
    for budget, spread in ((1, True), (10_000, False)):
        s = Scheduler(Engine.load(serve_artifact("bound")), max_batch=4, prefill_budget=budget)
        order.clear()
        for i, p in enumerate(prompts):  # queued before the loop starts: one burst
            s.submit(request(s.engine, p, 6), log(i))
        s.start()
        try:
            assert wait_until(lambda: s.stats.finished == 4)
        finally:
            s.close()
        first_of_second = order.index(1)
        assert (order[:first_of_second].count(0) >= 2) is spread, order
        assert s.stats.admitted == 4
