"""The HTTP side: Starlette routes in OpenAI's shapes, SSE streaming, the playground page.

Requests are checked here (a client's mistake is a 4xx before anything is queued), then
handed to the engine thread (`lanes.py`) as a ticket whose events come back through an
asyncio queue. A client that goes away cancels its ticket, which frees its lane at once.
Checking a body (JSON, tokenizing a prompt) runs in a worker thread: a big one never holds
up the event loop, so every other client and /health keep being answered meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import EdgeSteerError
from ..vectors import describe
from .api_error import ApiError, as_api_error, log, one_line, refuse, shutting_down
from .guard import Admission, Guard
from .lanes import Busy, Event, Failed, Finished, Lanes, Piece, Ticket, Training
from .requests import Job, Kind, Served, decode, parse, steering_of, unknown_model

DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there


@dataclass
class ServerState:
    """What the routes share; `served` and `lanes` appear once loading has finished."""

    api_key: str | None = None
    served: Served | None = None
    lanes: Lanes | None = None
    error: EdgeSteerError | None = None
    closing: bool = False  # shutting down: admit nothing new

    def running(self) -> tuple[Served, Lanes]:
        if self.closing:
            raise shutting_down()
        if self.served is None or self.lanes is None:
            raise ApiError(
                "the model is still loading: retry in a moment (GET /health says when)",
                status=503,
                code="loading",
                kind="server_error",
            )
        return self.served, self.lanes


def create_app(
    state: ServerState, admission: Admission, lifespan: Callable | None = None
) -> Starlette:
    routes = [
        Route("/", playground),
        Route("/health", health),
        Route("/v1/models", list_models),
        Route("/v1/models/{model_id:path}", get_model),
        Route("/v1/vectors", list_vectors),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, admission=admission)],
        lifespan=lifespan,
        exception_handlers={
            EdgeSteerError: _api_error,
            HTTPException: _http_error,
            ClientDisconnect: _gone,
        },
    )
    app.router.redirect_slashes = False  # a 307 that POST clients may not follow: a 404 says it
    app.state.server = state
    return app


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    if request.url.path.startswith("/v1/") and not _authorized(request, state):
        raise ApiError(
            "missing or wrong API key: send `Authorization: Bearer KEY` (the --api-key)",
            status=401,
            code="invalid_api_key",
        )
    return state


def _authorized(request: Request, state: ServerState) -> bool:
    if not state.api_key:
        return True
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    right = hmac.compare_digest(key.strip().encode(), state.api_key.encode())
    return scheme.lower() == "bearer" and right  # schemes ignore case (RFC 9110)


# -- routes -------------------------------------------------------------------------------


async def playground(_request: Request) -> Response:
    page = resources.files("edge_steer.server").joinpath("playground.html").read_text("utf-8")
    return HTMLResponse(page)


async def health(request: Request) -> Response:
    """The status, with details only for those who may use the API (under --api-key)."""
    state: ServerState = request.app.state.server
    body = _health(state)
    status = 200 if body["status"] == "ok" else 503
    if not _authorized(request, state):
        body = {"status": body["status"]}
    return JSONResponse(body, status_code=status)


def _health(state: ServerState) -> dict[str, Any]:
    if state.closing:
        return {"status": "shutting_down"}
    if state.error is not None:
        return {"status": "failed", "error": str(state.error)}
    if state.lanes is None:
        return {"status": "loading"}
    lanes = state.lanes
    return {
        "status": "ok",
        "lanes": len(lanes.lanes),
        "ctx_per_lane": lanes.n_ctx,  # tokens one request may hold, prompt and reply
        "batch": lanes.batcher.ctx.n_batch,  # tokens one decode takes, every lane's together
        "batch_invariant": lanes.batch_invariant,
        "busy": lanes.busy_lanes(),
        "queued": lanes.waiting.qsize(),
        "training": lanes.training.qsize() + (lanes.in_training is not None),
    }


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": _models(request)})


async def get_model(request: Request) -> Response:
    """One entry of /v1/models, as OpenAI's `client.models.retrieve` asks for it."""
    wanted = request.path_params["model_id"]
    if not wanted or wanted.endswith("/"):  # /v1/models/ is a path, as every trailing slash
        raise HTTPException(404)
    for entry in _models(request):
        if entry["id"] == wanted:
            return JSONResponse(entry)
    served, _ = _state(request).running()
    if "+" not in wanted:
        raise unknown_model(wanted, served)
    steering = await run_in_threadpool(steering_of, wanted, served)  # reads vector files
    return JSONResponse(_model_entry(wanted, steering))


def _models(request: Request) -> list[dict[str, Any]]:
    served, _ = _state(request).running()
    entries = [_model_entry(served.model_id, {})]
    return entries + [_model_entry(name, spec) for name, spec in served.pool.presets.items()]


def _model_entry(name: str, steering: dict[str, float]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "edge-steer",
        "steering": steering,
    }


async def list_vectors(request: Request) -> Response:
    served, _ = _state(request).running()
    return JSONResponse({"object": "list", "data": served.pool.catalogue()})


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def completions(request: Request) -> Response:
    return await _generate(request, "completion")


async def _generate(request: Request, kind: Kind) -> Response:
    served, lanes = _state(request).running()
    raw = await request.body()  # at most Admission.max_body bytes, in time (guard.py)
    job = await run_in_threadpool(_check, raw, kind, served)
    events: asyncio.Queue[Event | None] = asyncio.Queue()  # None: the client went away
    ticket = Ticket(job, _deliverer(asyncio.get_running_loop(), events))
    try:
        lanes.submit(ticket)
    except Busy:
        raise ApiError(
            "every lane is busy and the queue is full: retry shortly",
            status=503,
            code="server_busy",
            kind="server_error",
        ) from None
    reply = _Reply(job, kind)
    if job.stream:
        return StreamingResponse(
            _stream(reply, events, ticket),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _collect(request, reply, events, ticket)


def _check(raw: bytes, kind: Kind, served: Served) -> Job:
    """The body as a job, or ApiError. What should never happen in checking (a bug of ours
    meeting some odd input) is still a JSON 400 and one log line, never a traceback."""
    try:
        return parse(decode(raw), kind, served)
    except EdgeSteerError:
        raise
    except Exception as exc:
        raise ApiError(
            f"the request could not be checked: {type(exc).__name__}: {exc}",
            code="invalid_request",
        ) from None


def _deliverer(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[Event], None]:
    """Hand events from the engine thread to the request's event loop."""

    def deliver(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: shutting down
            loop.call_soon_threadsafe(events.put_nowait, event)

    return deliver


async def _collect(
    request: Request, reply: _Reply, events: asyncio.Queue[Event | None], ticket: Ticket
) -> Response:
    pieces: list[str] = []
    watcher = asyncio.create_task(_watch_disconnect(request, events))
    try:
        while True:
            event = await events.get()
            if event is None:
                reply.log_unfinished(499, "the client went away")
                return Response(status_code=499)  # nobody is listening any more
            if isinstance(event, Piece):
                pieces.append(event.text)
            elif isinstance(event, Failed):
                raise as_api_error(event.error)
            elif isinstance(event, Finished):
                reply.log(event)
                return JSONResponse(reply.whole("".join(pieces), event))
    finally:
        watcher.cancel()
        ticket.cancel()


async def _watch_disconnect(request: Request, events: asyncio.Queue[Event | None]) -> None:
    """Tell `_collect` (with None) when a client waiting for a whole answer goes away."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL)
    events.put_nowait(None)


async def _stream(
    reply: _Reply, events: asyncio.Queue[Event | None], ticket: Ticket
) -> AsyncIterator[str]:
    try:
        if reply.kind == "chat":
            yield _sse(reply.chunk({"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Piece):
                yield _sse(reply.chunk(event.text))
            elif isinstance(event, Training):
                yield _training_comment(event)
            elif isinstance(event, Failed):  # also when the server shuts down
                error = as_api_error(event.error)
                reply.log_unfinished(error.http_status, one_line(str(error)))
                yield _sse(error.body())
                yield "data: [DONE]\n\n"
                return
            elif isinstance(event, Finished):
                reply.log(event)
                yield _sse(reply.chunk(None, event.reason))
                if reply.job.include_usage:
                    yield _sse(reply.usage_chunk(event))
                yield "data: [DONE]\n\n"
                return
    finally:
        reply.log_unfinished(499, "the client went away")  # unless it has its line
        ticket.cancel()  # after the end a no-op; before it, frees the lane of a client gone


def _training_comment(event: Training) -> str:
    """An SSE comment, which OpenAI clients skip: `: training 'happy': calibrating 3/12`,
    so a stream waiting for a vector trained on first use shows how far it has got (the
    playground shows it)."""
    return f": training {event.vector!r}: {event.stage} {event.done}/{event.total}\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class _Reply:
    """Response bodies for one job, in OpenAI's shapes for its kind."""

    job: Job
    kind: Kind
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    logged: bool = False  # its one log line is written

    def log(self, done: Finished) -> None:
        """One line per answered request, as llama-server and Ollama log them: which model
        and steering, how many tokens, how long, and why it ended."""
        self._log(
            200,
            f"{done.prompt_tokens} prompt + {done.completion_tokens} completion tokens · "
            f"{self._seconds():.2f} s · {done.reason}",
        )

    def log_unfinished(self, status: int, why: str) -> None:
        """The line of a request that got no answer: its client went away (499, as nginx
        logs it) or a stream ended in an error event (shutting down, a failed decode)."""
        self._log(status, f"{why} after {self._seconds():.2f} s")

    def _log(self, status: int, detail: str) -> None:
        if self.logged:
            return
        self.logged = True
        log.info(
            "POST /v1/%s %d %s · steering %s · %s%s",
            "chat/completions" if self.kind == "chat" else "completions",
            status,
            self.job.model,
            describe(self.job.steering),
            detail,
            " · streamed" if self.job.stream else "",
        )

    def _seconds(self) -> float:
        return time.monotonic() - self.started

    def _head(self, stream: bool) -> dict[str, Any]:
        chat = self.kind == "chat"
        obj = ("chat.completion" if chat else "text_completion") + (
            ".chunk" if stream and chat else ""
        )
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + self.id,
            "object": obj,
            "created": self.created,
            "model": self.job.model,
            "system_fingerprint": "edge-steer",
            "steering": self.job.steering,
        }

    def whole(self, text: str, done: Finished) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.reason, "logprobs": None}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._head(False) | {"choices": [choice], "usage": _usage(done)}

    def chunk(self, content: str | dict | None, finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.kind == "chat":
            delta = content if isinstance(content, dict) else {}
            if isinstance(content, str):
                delta = {"content": content}
            choice["delta"] = delta
        else:
            choice["text"] = content or ""
        return self._head(True) | {"choices": [choice]}

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        return self._head(True) | {"choices": [], "usage": _usage(done)}


def _usage(done: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


# -- errors -------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgeSteerError)
    return refuse(exc, request.method, request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = str(exc.detail)
    if exc.status_code == 404:
        message = (
            f"edge-steer serve has no {one_line(request.url.path)}: it serves "
            "/v1/chat/completions, /v1/completions, /v1/models and /v1/vectors "
            "(no embeddings, no Responses API)"
        )
    error = ApiError(message, status=exc.status_code, code=f"http_{exc.status_code}")
    response = refuse(error, request.method, request.url.path)
    response.headers.update(exc.headers or {})
    return response


async def _gone(request: Request, _exc: Exception) -> Response:
    """The client went away while sending its body: nobody to answer, nothing to log
    but a line."""
    log.info("%s %s: the client went away while sending the body", request.method, request.url.path)
    return Response(status_code=499)
