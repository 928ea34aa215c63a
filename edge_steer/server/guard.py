"""What a connection and a request must satisfy before the app sees them.

- Host and Origin: a loopback server answers only requests addressed to loopback names, so
  a web page on another site cannot drive it (a simple cross-site POST) nor read its answers
  (DNS rebinding: the page's own name resolving to 127.0.0.1).
- POSTs carry `Content-Type: application/json`: a page can send a "simple" text/plain POST
  across sites without asking, never a JSON one.
- A body is at most `max_body` bytes and arrives within `body_seconds`; a request's headers
  arrive within HEADER_SECONDS of the connection or the previous answer (slowloris).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .api_error import ApiError, refuse

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_BODY = 4 * 1024 * 1024  # bytes; a 4096-token prompt is ~20 kB of JSON
BODY_SECONDS = 20.0  # to receive a whole body, from its headers
HEADER_SECONDS = 10.0  # to receive a request's headers


@dataclass(frozen=True)
class Admission:
    """The limits `Guard` enforces. `hosts` None: any Host and Origin (no check)."""

    port: int
    hosts: frozenset[str] | None = LOOPBACK_NAMES
    max_body: int = MAX_BODY
    body_seconds: float = BODY_SECONDS


def allowed_hosts(bound: str, extra: list[str]) -> frozenset[str] | None:
    """The Host names to accept: the loopback names on a loopback bind, plus `extra`
    (--allow-host); no check ('*', or another bind without --allow-host)."""
    if "*" in extra or (bound not in LOOPBACK_NAMES and not extra):
        return None
    return LOOPBACK_NAMES | {name.lower().strip("[]") for name in extra}


class Guard:
    """ASGI middleware: refuse what `Admission` does not allow, in OpenAI's error shape."""

    def __init__(self, app: ASGIApp, admission: Admission):
        self.app, self.admission = app, admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check(Headers(scope=scope), scope["method"])
        except ApiError as exc:
            await refuse(exc, scope["method"], scope["path"])(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _check(self, headers: Headers, method: str) -> None:
        hosts = self.admission.hosts
        if hosts is not None and not self._allowed("//" + headers.get("host", ""), hosts):
            raise ApiError(
                "this server answers only requests to its own address (Host header); "
                "behind a proxy, start it with --allow-host NAME",
                status=403,
                code="forbidden_host",
            )
        origin = headers.get("origin")
        if hosts is not None and origin is not None and not self._allowed(origin, hosts):
            raise ApiError(
                "requests from web pages of other sites are refused (Origin header)",
                status=403,
                code="forbidden_origin",
            )
        if method == "POST":
            _check_post(headers, self.admission.max_body)

    def _allowed(self, url: str, hosts: frozenset[str]) -> bool:
        """Whether `url` ("//HOST[:PORT]" or an Origin) names an allowed host; a loopback
        name only with this server's port, or none."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # a port that is no number, a bracket left open
            return False
        extra = "@" in parts.netloc or parts.path or parts.query or parts.fragment
        if parts.scheme not in ("", "http", "https") or extra:
            return False
        if parts.hostname in LOOPBACK_NAMES:
            return port in (None, self.admission.port)
        return parts.hostname in hosts

    def _limited(self, receive: Receive) -> Receive:
        """`receive`, refusing a body past `max_body` bytes (413) or `body_seconds` (408)."""
        deadline = time.monotonic() + self.admission.body_seconds
        received, complete = 0, False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # what follows the body: only a disconnect, never timed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise ApiError(
                    f"the request body did not arrive within {self.admission.body_seconds:g} s",
                    status=408,
                    code="request_timeout",
                ) from None
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > self.admission.max_body:
                raise _too_large(self.admission.max_body)
            return message

        return limited


def _check_post(headers: Headers, max_body: int) -> None:
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            "send the body as JSON with `Content-Type: application/json`",
            status=415,
            code="unsupported_media_type",
        )
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ApiError(
            f"`Content-Encoding: {encoding}` is not supported: send the body uncompressed",
            status=415,
            code="unsupported_media_type",
        )
    length = headers.get("content-length", "")
    if length.isdigit() and (len(length) > 18 or int(length) > max_body):
        raise _too_large(max_body)


def _too_large(max_body: int) -> ApiError:
    return ApiError(
        f"the request body is larger than {max_body // 1024 // 1024} MiB",
        status=413,
        code="request_too_large",
    )


class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol, closing a connection whose next request's headers take
    longer than HEADER_SECONDS to arrive (uvicorn times out only idle keep-alive
    connections, not a request's headers sent a byte at a time)."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(HEADER_SECONDS, self._expire, self.cycle)

    def _expire(self, cycle: object) -> None:
        """Close if no new request began since `cycle` (None: since the connection opened)."""
        waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.transport.close()
