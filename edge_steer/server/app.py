"""The HTTP side: Starlette routes in OpenAI's shapes, SSE streaming, the playground page.

Requests are checked here (a client's mistake is a 4xx before anything is queued), then
handed to the engine thread (`lanes.py`) as a ticket whose events come back through an
asyncio queue. A client that goes away cancels its ticket, which frees its lane at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import EdgeSteerError
from .api_error import ApiError, as_api_error
from .lanes import Busy, Event, Failed, Finished, Lanes, Piece, Ticket
from .requests import Job, Kind, Served, parse

RETRY_AFTER_SECONDS = 2
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there


@dataclass
class ServerState:
    """What the routes share; `served` and `lanes` appear once loading has finished."""

    api_key: str | None = None
    served: Served | None = None
    lanes: Lanes | None = None
    error: EdgeSteerError | None = None

    def running(self) -> tuple[Served, Lanes]:
        if self.served is None or self.lanes is None:
            raise ApiError(
                "the model is still loading: retry in a moment (GET /health says when)",
                status=503,
                code="loading",
                kind="server_error",
            )
        return self.served, self.lanes


def create_app(state: ServerState, lifespan: Callable | None = None) -> Starlette:
    routes = [
        Route("/", playground),
        Route("/health", health),
        Route("/v1/models", list_models),
        Route("/v1/vectors", list_vectors),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={EdgeSteerError: _api_error, HTTPException: _http_error},
    )
    app.state.server = state
    return app


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    if request.url.path.startswith("/v1/") and state.api_key:
        given = request.headers.get("authorization", "")
        if given != f"Bearer {state.api_key}":
            raise ApiError(
                "missing or wrong API key: send `Authorization: Bearer KEY` (the --api-key)",
                status=401,
                code="invalid_api_key",
            )
    return state


# -- routes -------------------------------------------------------------------------------


async def playground(_request: Request) -> Response:
    page = resources.files("edge_steer.server").joinpath("playground.html").read_text("utf-8")
    return HTMLResponse(page)


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if state.error is not None:
        return JSONResponse({"status": "failed", "error": str(state.error)}, status_code=503)
    if state.lanes is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    lanes = state.lanes
    return JSONResponse(
        {
            "status": "ok",
            "lanes": len(lanes.lanes),
            "busy": lanes.busy_lanes(),
            "queued": lanes.waiting.qsize(),
        }
    )


async def list_models(request: Request) -> Response:
    served, _ = _state(request).running()
    entries = [_model_entry(served.model_id, {})]
    entries += [_model_entry(name, spec) for name, spec in served.pool.presets.items()]
    return JSONResponse({"object": "list", "data": entries})


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
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError("the request body is not valid JSON", code="invalid_json") from None
    job = parse(body, kind, served)
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
                return Response(status_code=499)  # nobody is listening any more
            if isinstance(event, Piece):
                pieces.append(event.text)
            elif isinstance(event, Failed):
                raise as_api_error(event.error)
            else:
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
            elif isinstance(event, Failed):
                yield _sse(as_api_error(event.error).body())
                return
            else:
                yield _sse(reply.chunk(None, event.reason))
                if reply.job.include_usage:
                    yield _sse(reply.usage_chunk(event))
                yield "data: [DONE]\n\n"
                return
    finally:
        ticket.cancel()  # after the end a no-op; before it, frees the lane of a client gone


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class _Reply:
    """Response bodies for one job, in OpenAI's shapes for its kind."""

    job: Job
    kind: Kind
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

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


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgeSteerError)
    exc = as_api_error(exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.http_status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=headers)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = ApiError(str(exc.detail), status=exc.status_code, code=f"http_{exc.status_code}")
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)
