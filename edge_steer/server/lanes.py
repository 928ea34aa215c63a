"""The engine thread: every request of the server decoded on one llama.cpp context.

A lane is one sequence of that context (`engine.batching`): each step is one `llama_decode`
holding the next token of every running request and a prompt chunk of a new one, each row
under its request's own steering (llama.cpp's control vector when they all agree, the
per-row eval callback when they differ). On a CPU a decode is memory-bound, so four requests
in one decode cost far less than four decodes: throughput grows with concurrency, as in
llama-server. A new request never stalls a running stream for longer than one step, and a
lane's cached KV prefix is reused only under identical steering.

A request naming a built-in concept not trained yet waits on the trainer thread, not on a
lane: running streams keep streaming while it trains (their decodes and the trainer's take
turns, one llama.cpp call at a time, engine.Model.lock), then it joins the queue again.
"""

from __future__ import annotations

import codecs
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

from ..chat import until_stop
from ..engine import Model, Sampler
from ..engine.batching import Batcher, Slot
from ..errors import EdgeSteerError, EngineError
from .api_error import shutting_down
from .pool import VectorPool
from .requests import Job

IDLE_WAIT = 0.1  # seconds the idle engine thread blocks on the queue between checks


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" or "length", as OpenAI names them
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: EdgeSteerError


@dataclass(frozen=True)
class Training:
    """The request waits for `vector` to be trained on first use: how far that has got."""

    vector: str
    stage: str  # training.STAGES: "reading prompts", "calibrating"
    done: int
    total: int


Event = Piece | Finished | Failed | Training


class Busy(Exception):
    """Every lane is taken and the queue is full: answer 503 with Retry-After."""


@dataclass
class Ticket:
    """A job in flight: events go to `deliver` (thread-safe); `cancel` frees its lane."""

    job: Job
    deliver: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Lane:
    """One sequence of the engine's context, and the request on it."""

    slot: Slot
    ticket: Ticket | None = None
    steps: Generator[str, None, tuple[str, int]] | None = None  # returns (finish, generated)
    held: list[str] = field(default_factory=list)  # a whole answer's text, sent at its end


class Lanes:
    """The batcher's sequences, driven by one thread, fed from a queue of at most
    `queue_size` jobs. `n_ctx`: tokens one request may hold (prompt and reply)."""

    def __init__(
        self,
        batcher: Batcher,
        pool: VectorPool,
        *,
        n_ctx: int,
        queue_size: int = 32,
        batch_invariant: bool = True,
    ):
        self.batcher = batcher
        self.lanes = [Lane(slot) for slot in batcher.slots]
        self.pool = pool
        self.n_ctx = n_ctx
        self.batch_invariant = batch_invariant  # a reply is as alone, whatever else runs
        self.queue_size = queue_size
        self.waiting: queue.Queue[Ticket] = queue.Queue()
        self._stop = threading.Event()
        self._admitting = threading.Lock()  # no ticket slips in while stopping
        self._thread = threading.Thread(target=self._run, name="edge-steer-engine", daemon=True)
        self.training: queue.Queue[Ticket] = queue.Queue()  # waiting for vectors to train
        self.in_training: Ticket | None = None  # the one whose vectors train now
        self._trainer = threading.Thread(target=self._train, name="edge-steer-trainer", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._trainer.start()

    def stop(self) -> None:
        """Stop after the step in progress (one token or prompt chunk); every ticket, on a
        lane or waiting, is answered "the server is shutting down" (503). Idempotent."""
        with self._admitting:
            self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for waiting in (self.waiting, self.training):  # training is not waited for
            while not waiting.empty():
                waiting.get_nowait().deliver(Failed(shutting_down()))
        if (ticket := self.in_training) is not None:
            ticket.deliver(Failed(shutting_down()))

    def submit(self, ticket: Ticket) -> None:
        """Queue `ticket`, or raise Busy when every lane is taken and `queue_size` wait
        (ApiError 503 once stopping)."""
        with self._admitting:
            if self._stop.is_set():
                raise shutting_down()
            held = self.waiting.qsize() + self.training.qsize() + self.busy_lanes()
            if held >= len(self.lanes) + self.queue_size:
                raise Busy
            self.waiting.put_nowait(ticket)

    def busy_lanes(self) -> int:
        return sum(lane.ticket is not None for lane in self.lanes)

    # -- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit()
            self._drop_cancelled()
            if self.busy_lanes():
                self._step()
        for lane in self.lanes:
            if lane.ticket is not None:
                self._finish(lane, Failed(shutting_down()))

    def _admit(self) -> None:
        """Start waiting jobs on free lanes; block briefly only when nothing runs."""
        while (free := [lane for lane in self.lanes if lane.ticket is None]) and not (
            self._stop.is_set()
        ):
            idle = len(free) == len(self.lanes)
            try:
                ticket = self.waiting.get(timeout=IDLE_WAIT) if idle else self.waiting.get_nowait()
            except queue.Empty:
                return
            if not ticket.cancelled.is_set():
                self._start(ticket, free)

    def _start(self, ticket: Ticket, free: list[Lane]) -> None:
        job = ticket.job
        if self.pool.untrained(job.steering):
            self.training.put_nowait(ticket)  # the lane stays free for others meanwhile
            return
        key = steering_key(job.steering)
        lane = max(free, key=lambda lane: self.batcher.reusable(lane.slot, job.prompt, key))
        try:
            rows = self.pool.rows(job.steering)
            sampler = Sampler(self.batcher.ctx.model, job.settings)
            self.batcher.start(lane.slot, job.prompt, sampler, key, rows, reuse=job.cache_prompt)
        except Exception as exc:  # the engine thread must outlive any one request
            ticket.deliver(Failed(_as_error(exc)))
            return
        room = self.n_ctx - len(job.prompt)
        lane.ticket, lane.steps = ticket, _steps(self.batcher.ctx.model, lane.slot, job, room)

    def _drop_cancelled(self) -> None:
        for lane in self.lanes:
            if lane.ticket is not None and lane.ticket.cancelled.is_set():
                self._finish(lane, None)  # the client went away: free the lane now

    def _step(self) -> None:
        """One decode for every running request; then each one that sampled a token
        turns it into text."""
        try:
            sampled = self.batcher.step()
        except Exception as exc:  # the engine thread must outlive any one decode
            for lane in self.lanes:
                if lane.ticket is not None:
                    self.batcher.forget(lane.slot)
                    self._finish(lane, Failed(_as_error(exc)))
            return
        for slot in sampled:
            self._advance(self.lanes[slot.seq])

    def _advance(self, lane: Lane) -> None:
        """Text for the token the lane just sampled, until it asks for another token (or
        ends: end of generation, a stop string, max_tokens, a full context)."""
        assert lane.ticket is not None and lane.steps is not None
        while True:
            try:
                text = next(lane.steps)
            except StopIteration as done:
                reason, generated = done.value
                self._finish(lane, Finished(reason, len(lane.ticket.job.prompt), generated))
                return
            except Exception as exc:  # the engine thread must outlive any one request
                self.batcher.forget(lane.slot)
                self._finish(lane, Failed(_as_error(exc)))
                return
            if text and lane.ticket.job.stream:
                lane.ticket.deliver(Piece(text))
            elif text:  # one event at the end: fewer wake-ups of the event loop
                lane.held.append(text)
            if lane.slot.next_token is not None:
                return  # decoded at the next step

    def _finish(self, lane: Lane, event: Event | None) -> None:
        """Free the lane, then tell the client: once it has its answer, its next request
        must find the lane free (with --queue 0 it would otherwise get a 503)."""
        assert lane.ticket is not None and lane.steps is not None
        ticket, held = lane.ticket, "".join(lane.held)
        lane.steps.close()
        self.batcher.release(lane.slot)
        lane.ticket = lane.steps = None
        lane.held = []
        if held and isinstance(event, Finished):
            ticket.deliver(Piece(held))
        if event is not None:
            ticket.deliver(event)

    # -- the trainer thread -----------------------------------------------------------------
    def _train(self) -> None:
        """Train what waiting requests name, one request at a time, then queue them again."""
        while not self._stop.is_set():
            try:
                self.in_training = ticket = self.training.get(timeout=IDLE_WAIT)
            except queue.Empty:
                continue
            try:
                for name in self.pool.untrained(ticket.job.steering):
                    if ticket.cancelled.is_set() or self._stop.is_set():
                        break
                    self.pool.train(name, self._reporter(ticket, name))
                self.pool.check_layers(ticket.job.steering)
            except Exception as exc:  # this thread must outlive any one request
                ticket.deliver(Failed(_as_error(exc)))
                continue
            finally:
                self.in_training = None
            with self._admitting:  # stop() has answered it if it is stopping
                if not (self._stop.is_set() or ticket.cancelled.is_set()):
                    self.waiting.put_nowait(ticket)

    def _reporter(self, ticket: Ticket, vector: str) -> Callable[[str, int, int], None]:
        """Training progress for the request that waits on it, and for every request
        queued behind it (they wait on it too): each stream gets bytes while it waits, so
        that no proxy's read timeout gives up on it."""

        def report(stage: str, done: int, total: int) -> None:
            with self.training.mutex:  # a snapshot of who waits
                behind = list(self.training.queue)
            for waiting in (ticket, *behind):
                waiting.deliver(Training(vector, stage, done, total))

        return report


def _as_error(exc: Exception) -> EdgeSteerError:
    return exc if isinstance(exc, EdgeSteerError) else EngineError(f"generation failed: {exc}")


def steering_key(steering: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """What makes two requests' steering the same: the vectors they really use."""
    return tuple(sorted((name, strength) for name, strength in steering.items() if strength))


def _steps(model: Model, slot: Slot, job: Job, room: int) -> Generator[str, None, tuple[str, int]]:
    """Text of `job` as its lane samples tokens; returns the finish reason and the tokens
    generated. `room`: tokens left in the lane's context after the prompt."""
    count = [0]
    hit_stop = yield from until_stop(_pieces(model, slot, job.max_tokens, room, count), job.stops)
    generated = count[0]
    stopped = hit_stop or not (generated >= room or generated >= job.max_tokens)
    return ("stop" if stopped else "length"), generated


def _pieces(
    model: Model, slot: Slot, max_tokens: int, room: int, count: list[int]
) -> Iterator[str]:
    """The text of each token `slot` samples, as `Context.generate` makes it; between
    tokens it sets `slot.next_token` and yields "" (wait for the next step)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while room > 0:
        token = slot.sampled
        assert token is not None
        if model.is_eog(token):
            break
        count[0] += 1
        yield decoder.decode(model.piece(token))
        if count[0] >= max_tokens or count[0] >= room:
            break
        slot.next_token = token
        yield ""
    # a character the last token left incomplete is dropped, not sent as U+FFFD
