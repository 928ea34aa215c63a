"""The engine thread: every llama.cpp context of the server, driven from one thread.

Contexts of one model must not decode from several threads at once, and each context carries
its own control vector, so per-request steering means one context per lane, all owned here.
Lanes take turns token by token, so a new request never stalls or cuts off a running stream
for longer than one token (or one prompt chunk). Steering is set once per request, when it
starts on a lane; a lane's cached KV prefix is reused only under identical steering.

A request naming a built-in concept not trained yet waits on the trainer thread, not on a
lane: running streams keep streaming while it trains (their decodes and the trainer's take
turns, one llama.cpp call at a time, engine.Model.lock), then it joins the queue again.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

from ..chat import until_stop
from ..engine import Context, Sampler
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
    stage: str  # "reading prompts", "choosing blocks", "calibrating"
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
    context: Context
    steering: dict[str, float] = field(default_factory=dict)
    ticket: Ticket | None = None
    steps: Generator[str, None, tuple[str, int]] | None = None  # returns (finish, generated)


class Lanes:
    """`contexts` driven by one thread, fed from a queue of at most `queue_size` jobs."""

    def __init__(
        self,
        contexts: Sequence[Context],
        pool: VectorPool,
        *,
        layers: tuple[int, int] | None = None,
        queue_size: int = 32,
    ):
        self.lanes = [Lane(context) for context in contexts]
        self.pool = pool
        first_last: tuple[int, int] = layers or (1, pool.model.n_layer - 1)
        self.first, self.last = first_last
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
            for lane in self.lanes:
                if lane.ticket is not None:
                    self._step(lane)
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
                self._start(_best_lane(free, ticket.job), ticket)

    def _start(self, lane: Lane, ticket: Ticket) -> None:
        if self.pool.untrained(ticket.job.steering):
            self.training.put_nowait(ticket)  # the lane stays free for others meanwhile
            return
        try:
            rows = self.pool.rows(ticket.job.steering)
            lane.context.set_steering(rows, self.first, self.last)  # empties the KV if changed
            if not ticket.job.cache_prompt:
                lane.context.forget(0)  # the prompt in one pass, exactly as the CLI decodes it
        except Exception as exc:  # the engine thread must outlive any one request
            ticket.deliver(Failed(_as_error(exc)))
            return
        lane.steering = dict(ticket.job.steering)
        lane.ticket, lane.steps = ticket, _steps(lane.context, ticket.job)

    def _step(self, lane: Lane) -> None:
        """One token (or one prompt chunk) for the lane's job."""
        assert lane.ticket is not None and lane.steps is not None
        if lane.ticket.cancelled.is_set():
            self._finish(lane, None)  # the client went away: free the lane now
            return
        try:
            text = next(lane.steps)
        except StopIteration as done:
            reason, generated = done.value
            self._finish(lane, Finished(reason, len(lane.ticket.job.prompt), generated))
            return
        except Exception as exc:  # the engine thread must outlive any one request
            lane.context.forget(0)
            self._finish(lane, Failed(_as_error(exc)))
            return
        if text:
            lane.ticket.deliver(Piece(text))

    def _finish(self, lane: Lane, event: Event | None) -> None:
        """Free the lane, then tell the client: once it has its answer, its next request
        must find the lane free (with --queue 0 it would otherwise get a 503)."""
        assert lane.ticket is not None and lane.steps is not None
        ticket = lane.ticket
        lane.steps.close()
        lane.ticket = lane.steps = None
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
                    self.pool.train(name, _reporter(ticket, name))
            except Exception as exc:  # this thread must outlive any one request
                ticket.deliver(Failed(_as_error(exc)))
                continue
            finally:
                self.in_training = None
            with self._admitting:  # stop() has answered it if it is stopping
                if not (self._stop.is_set() or ticket.cancelled.is_set()):
                    self.waiting.put_nowait(ticket)


def _reporter(ticket: Ticket, vector: str) -> Callable[[str, int, int], None]:
    """Training progress for the request that waits on it."""
    return lambda stage, done, total: ticket.deliver(Training(vector, stage, done, total))


def _as_error(exc: Exception) -> EdgeSteerError:
    return exc if isinstance(exc, EdgeSteerError) else EngineError(f"generation failed: {exc}")


def _best_lane(free: list[Lane], job: Job) -> Lane:
    """The free lane whose cache already holds most of this prompt under the same steering."""

    def reusable(lane: Lane) -> int:
        if lane.steering != job.steering:
            return -1
        return lane.context.cached_prefix(job.prompt)

    return max(free, key=reusable)


def _steps(ctx: Context, job: Job) -> Generator[str, None, tuple[str, int]]:
    """Text pieces of `job` on `ctx`, one token per step, after the prompt in n_batch chunks
    (the same chunks `generate` decodes, so the tokens match the CLI's); returns the finish
    reason and the tokens generated."""
    for end in range(ctx.n_batch, len(job.prompt), ctx.n_batch):
        ctx.ingest(job.prompt[:end])
        yield ""  # let the other lanes have a turn
    sampler = Sampler(ctx.model, job.settings)
    try:
        pieces = ctx.generate(job.prompt, sampler, max_tokens=job.max_tokens)
        hit_stop = yield from until_stop(pieces, job.stops)
    finally:
        sampler.close()
    full = len(ctx.tokens) >= ctx.n_ctx
    generated = pieces.stats.generated
    stopped = hit_stop or not (full or generated >= job.max_tokens)
    return ("stop" if stopped else "length"), generated
