"""The one error type of the HTTP API, mapped to a status and an OpenAI error body here only.

Handlers raise :class:`ApiError`; nothing else builds an error response (the connection layer,
which answers before any handler runs, writes the same body and headers). Each
:class:`ErrorKind` names an HTTP status, OpenAI's ``error.type`` and its label in
``/metrics``, so a new failure mode is one enum member, not another hand-written response.
"""

from __future__ import annotations

import reprlib
from enum import Enum, unique
from typing import Any

from starlette.responses import JSONResponse


@unique
class ErrorKind(Enum):
    """(HTTP status, OpenAI ``error.type``, label in ``/metrics``); the label keeps them unique."""

    INVALID_REQUEST = (400, "invalid_request_error", "invalid_request")
    UNAUTHORIZED = (401, "authentication_error", "unauthorized")
    FORBIDDEN_HOST = (403, "invalid_request_error", "forbidden_host")
    FORBIDDEN_ORIGIN = (403, "invalid_request_error", "forbidden_origin")
    MODEL_NOT_FOUND = (404, "invalid_request_error", "model_not_found")
    NOT_FOUND = (404, "invalid_request_error", "not_found")
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", "method_not_allowed")
    REQUEST_TIMEOUT = (408, "invalid_request_error", "request_timeout")
    PAYLOAD_TOO_LARGE = (413, "invalid_request_error", "payload_too_large")
    OVERLOADED = (429, "rate_limit_error", "overloaded")
    CLIENT_CLOSED = (499, "invalid_request_error", "client_closed")
    """nginx's status for a client that went away before the answer; it is never received."""
    INTERNAL = (500, "server_error", "internal")
    TOO_MANY_CONNECTIONS = (503, "server_error", "too_many_connections")
    LOADING = (503, "server_error", "loading")

    @property
    def status(self) -> int:
        return int(self.value[0])

    @property
    def error_type(self) -> str:
        return str(self.value[1])

    @property
    def label(self) -> str:
        return str(self.value[2])


_RETRY = {ErrorKind.LOADING, ErrorKind.OVERLOADED, ErrorKind.TOO_MANY_CONNECTIONS}
"""Transient: the client should come back (``Retry-After: 1``)."""
_CLOSE = {
    ErrorKind.FORBIDDEN_HOST,
    ErrorKind.FORBIDDEN_ORIGIN,
    ErrorKind.REQUEST_TIMEOUT,
    ErrorKind.TOO_MANY_CONNECTIONS,
}
"""The connection is not worth keeping: a refused browser or a client too slow to send."""


class ApiError(Exception):
    """A request that cannot be served; ``message`` says why and what to change."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with the keyword arguments (errors come back from the body parser process)."""
        return (_rebuild, (self.kind, self.message, self.param, self.code))

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": "1"} if self.kind in _RETRY else {}
        if self.kind in _CLOSE:
            headers["Connection"] = "close"
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.kind.status, headers=self.headers)


def _rebuild(kind: ErrorKind, message: str, param: str | None, code: str | None) -> ApiError:
    return ApiError(kind, message, param=param, code=code)


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80


def shown(value: object) -> str:
    """A client's value for a message: cut to a few levels and 80 characters (it may be huge)."""
    return _SHOWN.repr(value)


def invalid(message: str, param: str | None = None) -> ApiError:
    """Shorthand for the commonest error: a 400 naming the offending field."""
    return ApiError(ErrorKind.INVALID_REQUEST, message, param=param, code="invalid_value")
