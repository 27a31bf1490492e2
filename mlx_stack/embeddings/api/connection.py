"""The HTTP connection layer: uvicorn's h11 protocol with deadlines and a connection cap.

uvicorn (h11) waits forever for a request head, so a client that connects and sends nothing,
or trickles a header byte every few seconds, holds a connection for good; and after an early
answer (413, 429, 404) it keeps reading a body nobody wants for as long as the client sends.
This subclass adds, per connection:

- a **head deadline**: the request head must be complete ``header_timeout`` s after its first
  byte (or after the connection opened); else a 408 (when part of a head came) and close;
- a **body backstop**: a body still arriving ``body_timeout`` s (+1 s) after its head is cut
  off. The handler that reads the body answers 408 itself at ``body_timeout``; the backstop
  catches bodies that nobody reads;
- a **cap**: connections beyond ``max_connections`` get a 503 for their request and are closed,
  before the app sees it;
- malformed HTTP (or a head over 16 KiB) answered with a 400 in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import http
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .apierror import ApiError, ErrorKind

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
MAX_CONNECTIONS = 256
KEEP_ALIVE_SECONDS = 5
"""uvicorn's default: an idle kept-alive connection is closed after this."""
MAX_HEAD_BYTES = 16 * 1024
"""h11's default limit on a request head, made explicit."""
BODY_BACKSTOP_GRACE = 1.0
"""The handler's own 408 comes first; the backstop closes what is left a second later."""


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take to send, and how many connections may be open."""

    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections: int = MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "max_connections"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


Refusal = Callable[[str], None]
"""Told the reason of each refusal: ``header_timeout``, ``body_timeout``, ``connection_limit``,
``invalid_http``."""


class GuardedH11Protocol(H11Protocol):
    """One client connection; build with :func:`protocol_factory`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
        on_refusal: Refusal,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._on_refusal = on_refusal
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._seen_cycle: object = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            self._on_refusal("connection_limit")
            self.app = ApiError(
                ErrorKind.TOO_MANY_CONNECTIONS,
                f"the server has {len(self.connections) - 1} open connections (maximum "
                f"{self._limits.max_connections}, --max-connections); retry shortly, or reuse "
                "connections",
                code="too_many_connections",
            ).response()
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_timer is None:
            self._arm_head_timer()  # the first byte of a request on a kept-alive connection
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    # --- uvicorn's hooks -------------------------------------------------------------------

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._seen_cycle:  # a request head arrived
            self._seen_cycle = self.cycle
            self._cancel(self._head_timer)
            self._head_timer = None
            if self.conn.their_state is h11.SEND_BODY:
                delay = self._limits.body_timeout + BODY_BACKSTOP_GRACE
                self._body_timer = self.loop.call_later(delay, self._body_overdue)
        if self.conn.their_state is not h11.SEND_BODY and self._body_timer is not None:
            self._cancel(self._body_timer)
            self._body_timer = None
        idle = self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None
        if idle and self._head_timer is None and not self.transport.is_closing():
            self._arm_head_timer()  # a drained body ended a cycle: no keep-alive timer runs

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP: the same answer as uvicorn's, in the API's error shape."""
        self._on_refusal("invalid_http")
        error = ApiError(
            ErrorKind.INVALID_REQUEST,
            f"the request is not valid HTTP/1.1, or its head is over {MAX_HEAD_BYTES} bytes "
            f"({msg})",
            code="invalid_http",
        )
        body = json.dumps(error.body(), separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers)))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response had already begun: nothing more to say
            pass
        self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn would warn that no WebSocket library is installed: there are no WebSocket
        routes here (``ws="none"``), so an upgrade request is plain HTTP, not news."""

    # --- deadlines -------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel(self._head_timer)
        self._head_timer = self.loop.call_later(self._limits.header_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self._on_refusal("header_timeout")
        if self.conn.trailing_data[0]:  # part of a head came: say why before closing
            self.transport.write(
                _raw_response(
                    ApiError(
                        ErrorKind.REQUEST_TIMEOUT,
                        f"the request head did not arrive within "
                        f"{self._limits.header_timeout:g} s (--header-timeout)",
                        code="header_timeout",
                    )
                )
            )
        self.transport.close()

    def _body_overdue(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            self._on_refusal("body_timeout")
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            self._cancel(timer)
        self._head_timer = self._body_timer = None

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()


def protocol_factory(limits: ConnectionLimits, on_refusal: Refusal) -> Callable[..., H11Protocol]:
    """What ``uvicorn.Config(http=...)`` takes: builds a protocol per connection."""

    def build(**kwargs: Any) -> H11Protocol:
        return GuardedH11Protocol(**kwargs, limits=limits, on_refusal=on_refusal)

    return build


def _raw_response(error: ApiError) -> bytes:
    """An error written straight to the socket, for when no request has been parsed."""
    body = json.dumps(error.body(), separators=(",", ":")).encode()
    status = error.kind.status
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *(f"{name}: {value}" for name, value in error.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
