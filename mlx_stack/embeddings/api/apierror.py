"""The one error type of the HTTP API, mapped to a status and an OpenAI error body here only.

Handlers raise :class:`ApiError`; nothing else builds an error response. Each
:class:`ErrorKind` names an HTTP status and OpenAI's ``error.type``, so a new failure mode is
one enum member, not another hand-written response.
"""

from __future__ import annotations

from enum import Enum

from starlette.responses import JSONResponse


class ErrorKind(Enum):
    """(HTTP status, OpenAI ``error.type``)."""

    INVALID_REQUEST = (400, "invalid_request_error")
    MODEL_NOT_FOUND = (404, "invalid_request_error")
    NOT_FOUND = (404, "invalid_request_error")
    METHOD_NOT_ALLOWED = (405, "invalid_request_error")
    PAYLOAD_TOO_LARGE = (413, "invalid_request_error")
    UNSUPPORTED_MEDIA_TYPE = (415, "invalid_request_error")
    OVERLOADED = (429, "rate_limit_error")
    INTERNAL = (500, "server_error")
    LOADING = (503, "server_error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def error_type(self) -> str:
        return self.value[1]


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

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = (
            {"Retry-After": "1"} if self.kind in (ErrorKind.LOADING, ErrorKind.OVERLOADED) else None
        )
        return JSONResponse(self.body(), status_code=self.kind.status, headers=headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    """Shorthand for the commonest error: a 400 naming the offending field."""
    return ApiError(ErrorKind.INVALID_REQUEST, message, param=param, code="invalid_value")
