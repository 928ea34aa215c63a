"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every mistake a client can make is a 4xx, because the `openai` client retries 5xx answers.
A refused request is logged as one line: method, path, status and reason.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.responses import Response

from ..errors import EdgeSteerError

RETRY_AFTER_SECONDS = 2
LOG_CHARS = 200  # of a reason in the log: messages may quote what the client sent
log = logging.getLogger("edge_steer.server")


class ApiError(EdgeSteerError):
    """An error answered as OpenAI does: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.http_status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def as_api_error(exc: EdgeSteerError) -> ApiError:
    """Any of our errors in OpenAI's shape, keeping its class's HTTP status."""
    if isinstance(exc, ApiError):
        return exc
    kind = "invalid_request_error" if exc.http_status < 500 else "server_error"
    return ApiError(str(exc), status=exc.http_status, code=type(exc).__name__, kind=kind)


def shutting_down() -> ApiError:
    return ApiError(
        "the server is shutting down", status=503, code="shutting_down", kind="server_error"
    )


def refuse(exc: EdgeSteerError, method: str, path: str) -> Response:
    """The answer to a refused request, logged as one line. ASCII JSON, so no text a client
    sent can fail to encode."""
    error = as_api_error(exc)
    log.info("%s %s %d %s", method, one_line(path), error.http_status, one_line(str(error)))
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.http_status == 503 else None
    return Response(
        json.dumps(error.body()),
        status_code=error.http_status,
        headers=headers,
        media_type="application/json",
    )


def one_line(text: str) -> str:
    """`text` for the log: one line, at most LOG_CHARS, whatever a client put in it."""
    text = " ".join(text.split())
    return text if len(text) <= LOG_CHARS else text[:LOG_CHARS] + "..."
