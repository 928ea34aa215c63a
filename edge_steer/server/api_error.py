"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every mistake a client can make is a 4xx, because the `openai` client retries 5xx answers.
"""

from __future__ import annotations

from typing import Any

from ..errors import EdgeSteerError


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
