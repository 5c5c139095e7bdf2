"""Continuous batching (vLLM-lite): one thread owns the Engine and runs every model step.

    scheduler = Scheduler(engine, max_batch=8)
    scheduler.start()                                   # allocates the slots, starts the thread
    ticket = scheduler.submit(GenerationRequest(...), on_event)   # any thread; checked here, then queued
    ticket.cancel()                                     # any thread: the row is freed before the next step
    scheduler.close()                                   # stops the thread; queued or running requests fail

Each turn of the loop (on the scheduler thread):
  1. retire rows whose request was cancelled (the client went away);
  2. admit waiting requests into free slots (up to `prefill_budget` prompt tokens per turn, so a burst of
     arrivals does not stall the running rows for long): `Engine.prefill_slot`, then sample the first token;
  3. one batched `Engine.decode_one_token` over the running rows (free slots masked idle);
  4. per row: sample with the request's own Sampler, detokenize incrementally, match stop strings,
     send the text delta, retire the row when it stops.
A request's output depends only on its own row (its cache row, sampler and seed), so it gets the same
tokens however many others share the batch. Events reach the caller through its `on_event` callback,
called on the scheduler thread; the HTTP layer hands them to its event loop (call_soon_threadsafe).

An artifact with the "grow" KV binding has no slots: it is served with a batch of one (requests queue
and run one after another).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from twophase.compiler.errors import TwophaseError
from twophase.runtime.engine import Engine, StopStrings
from twophase.runtime.sampler import Sampler, SamplingParams, seen_mask
from twophase.runtime.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 256
DEFAULT_PREFILL_BUDGET = 512  # prompt tokens prefilled per step before the running rows decode again
INITIAL_CAPACITY = 256  # cache positions per slot at start; the bound cache doubles as rows grow


class FinishReason(enum.Enum):
    EOS = "eos"
    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete: token ids, how many tokens at most, how to sample, where to stop."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # stop strings: the text ends right before the first one found


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # sampled tokens, a final eos / stop token included


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str


Event = TextDelta | Finished | Failed
EventCallback = Callable[[Event], None]


class SchedulerClosedError(TwophaseError):
    """A request submitted to a scheduler that is shutting down."""


class QueueFullError(TwophaseError):
    """More requests waiting than the scheduler's max_queue."""


class Ticket:
    """The caller's handle on a submitted request."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating for this request (a no-op once it finished); its slot is freed before the next step."""
        self.cancelled = True
        self._scheduler._wake()


@dataclasses.dataclass(eq=False)
class _Sequence:
    """A request's run state: its sampler, seen-token mask, detokenizer, stop matcher and slot."""

    request: GenerationRequest
    on_event: EventCallback
    ticket: Ticket
    sampler: Sampler
    seen: np.ndarray | None  # (1, V) bool, only with a repetition penalty
    detok: IncrementalDetokenizer
    stops: StopStrings
    slot: int = -1
    generated: int = 0
    last_token: int = 0  # fed to the next decode step


@dataclasses.dataclass
class SchedulerStats:
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # running rows summed over decode steps (mean batch = decode_rows / decode_steps)
    peak_batch: int = 0
    prefill_s: float = 0.0  # time in the model, per phase
    decode_s: float = 0.0
    busy_s: float = 0.0  # time in steps (model + sampling, detokenization, handing out events)


class Scheduler:
    """Waiting queue + running slots over one Engine; all model work on one thread (module doc)."""

    def __init__(self, engine: Engine, *, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                 prefill_budget: int = DEFAULT_PREFILL_BUDGET) -> None:
        if engine.tokenizer is None:
            raise TwophaseError(f"{engine.root}: the artifact ships no tokenizer, so it cannot serve text")
        if max_batch < 1 or max_queue < 1:
            raise TwophaseError(f"max_batch and max_queue must be at least 1, got {max_batch} and {max_queue}")
        self.engine = engine
        if not engine.bound and max_batch > 1:
            log.warning("%s has the 'grow' KV binding (no slots): serving one request at a time", engine.root)
        self.max_batch = max_batch if engine.bound else 1
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget  # prompt tokens admitted per step (a longer prompt still goes alone)
        self.stats = SchedulerStats()
        self._stop_ids = frozenset(engine.eos_token_ids)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()  # guarded by _cond
        self._slots: list[_Sequence | None] = [None] * self.max_batch  # scheduler thread only
        self._closing = False
        self._thread: threading.Thread | None = None

    # --- any thread -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise TwophaseError("the scheduler is already started")
        if self.engine.bound:
            self.engine.start_slots(self.max_batch, INITIAL_CAPACITY)
        self._thread = threading.Thread(target=self._run, name="twophase-scheduler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> Ticket:
        """Queue a request; raises (ContextLengthError, TwophaseError, QueueFullError, ...) before queueing."""
        self._check(request)
        ticket = Ticket(self)
        params = request.params
        seq = _Sequence(
            request=request,
            on_event=on_event,
            ticket=ticket,
            sampler=Sampler(params),
            seen=seen_mask(np.asarray(request.prompt_ids)[None], self.engine.facts.vocab_size)
            if params.uses_penalty else None,
            detok=self.engine.tokenizer.detokenizer(),
            stops=StopStrings(request.stop),
        )
        with self._cond:
            if self._closing:
                raise SchedulerClosedError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:  # forget requests whose clients left before their turn
                self._waiting = collections.deque(s for s in self._waiting if not s.ticket.cancelled)
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (max_queue); retry later")
            self._waiting.append(seq)
            self._cond.notify()
        return ticket

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the loop after its current step; requests still queued or running get a Failed event."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _check(self, request: GenerationRequest) -> None:
        ids = request.prompt_ids
        if not ids:
            raise TwophaseError("empty prompt: generation needs at least one prompt token")
        vocab = self.engine.facts.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise TwophaseError(f"prompt token ids must be in [0, {vocab})")
        if request.max_new_tokens < 1:
            raise TwophaseError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if not all(isinstance(s, str) and s for s in request.stop):
            raise TwophaseError(f"stop strings must be non-empty strings, got {request.stop!r}")
        self.engine.check_context(len(ids), request.max_new_tokens)

    # --- the scheduler thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._waiting and not self.running:
                        self._cond.wait()
                    if self._closing:
                        return
                    admit = self._admissible()
                try:
                    t0 = time.perf_counter()
                    self._step(admit)
                    self.stats.busy_s += time.perf_counter() - t0
                except Exception as e:  # an engine failure fails this batch, not the server
                    log.exception("model step failed")
                    hit = {id(s): s for s in admit + self._slots if s is not None}
                    for seq in hit.values():
                        self._fail(seq, f"model step failed: {e}")
                    if self.engine.bound:
                        self.engine.start_slots(self.max_batch, INITIAL_CAPACITY)
        finally:
            with self._cond:
                self._closing = True
                pending = list(self._waiting) + [s for s in self._slots if s is not None]
                self._waiting.clear()
            for seq in pending:
                self._fail(seq, "the server is shutting down")

    def _admissible(self) -> list[_Sequence]:
        """Waiting requests for the free slots (lowest first), up to prefill_budget prompt tokens (at least one
        request): a burst of arrivals is prefilled over several steps, between which the running rows decode."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        admit: list[_Sequence] = []
        tokens = 0
        while free and self._waiting:
            seq = self._waiting[0]
            if admit and tokens + len(seq.request.prompt_ids) > self.prefill_budget:
                break
            self._waiting.popleft()
            if not seq.ticket.cancelled:
                seq.slot = free.pop(0)
                admit.append(seq)
                tokens += len(seq.request.prompt_ids)
        return admit

    def _step(self, admit: list[_Sequence]) -> None:
        for seq in self._slots:
            if seq is not None and seq.ticket.cancelled:
                self._retire(seq, FinishReason.CANCELLED)
        engine = self.engine
        for seq in admit:
            self._slots[seq.slot] = seq
            self.stats.admitted += 1
            ids = np.asarray(seq.request.prompt_ids, dtype=np.int64)
            t0 = time.perf_counter()
            if engine.bound:
                logits = engine.prefill_slot(seq.slot, ids)[None]  # (1, V); the cache grows as the row does
            else:
                logits = engine.prefill(ids[None], reserve=seq.request.max_new_tokens)  # (1, V)
            self.stats.prefill_s += time.perf_counter() - t0
            self._accept(seq, logits)
        rows = [s for s in self._slots if s is not None]
        if not rows:
            return
        active = np.array([s is not None for s in self._slots])  # (B,)
        tokens = np.array([0 if s is None else s.last_token for s in self._slots], dtype=np.int64)  # (B,)
        t0 = time.perf_counter()
        logits = engine.decode_one_token(tokens, active=active if engine.bound else None)  # (B, V)
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        self.stats.peak_batch = max(self.stats.peak_batch, len(rows))
        for seq in rows:
            self._accept(seq, logits[seq.slot : seq.slot + 1])

    def _accept(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Sample the row's next token from (1, V) logits, send its text, retire the row when it stops."""
        tok = int(seq.sampler.sample(logits, seq.seen)[0])
        seq.generated += 1
        self.stats.generated_tokens += 1
        if tok in self._stop_ids or tok in seq.request.params.stop_token_ids:
            reason = FinishReason.EOS if tok in self._stop_ids else FinishReason.STOP_TOKEN
            self._retire(seq, reason)  # the stop token itself is not part of the text
            return
        if seq.seen is not None:
            seq.seen[0, tok] = True
        piece = seq.detok.add(tok)
        if piece:
            out, hit = seq.stops.feed(piece)
            if out:
                self._emit(seq, TextDelta(out))
            if hit:
                self._retire(seq, FinishReason.STOP_STRING, flush=False)
                return
        if seq.generated >= seq.request.max_new_tokens:
            self._retire(seq, FinishReason.LENGTH)
        else:
            seq.last_token = tok

    def _retire(self, seq: _Sequence, reason: FinishReason, flush: bool = True) -> None:
        """Free the row's slot and send its last text and Finished (as Engine._text_stream ends a stream)."""
        if flush and reason is not FinishReason.CANCELLED:
            out, hit = seq.stops.feed(seq.detok.flush())
            if hit:
                reason = FinishReason.STOP_STRING
            else:
                out += seq.stops.flush()
            if out:
                self._emit(seq, TextDelta(out))
        self._slots[seq.slot] = None
        if reason is FinishReason.CANCELLED:
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        self._emit(seq, Finished(reason, len(seq.request.prompt_ids), seq.generated))

    def _fail(self, seq: _Sequence, message: str) -> None:
        if 0 <= seq.slot < len(self._slots) and self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
        self.stats.failed += 1
        self._emit(seq, Failed(message))

    def _emit(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a consumer that cannot take events (its event loop closed) is gone
            log.debug("dropping an event for a closed consumer", exc_info=True)
            seq.ticket.cancelled = True
