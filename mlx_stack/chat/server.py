"""mlx_lm.server with the checks of :mod:`.guard` in front of its request handler.

Runs in the chat tier's process instead of ``python -m mlx_lm server``, with the same
arguments, and without changing mlx-lm's files: a subclass of ``mlx_lm.server.APIHandler``
answers a refused request itself and hands every other one to mlx_lm unchanged (streaming,
/v1/models, /health). mlx_lm's ``run()`` does not pass its ``handler_class`` on to the HTTP
server, so :func:`main` replaces ``run`` in mlx_lm's module with :func:`_run_guarded`, then
calls mlx_lm's own ``main()`` (its argument parser, logging, wired-memory limit).

The backend key comes from the environment (``MLX_STACK_BACKEND_KEY``), never the command
line, and is removed from ``os.environ`` once read.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

from mlx_lm import server as mlx_server

from ..backendkey import KEY_ENV
from .guard import (
    Refusal,
    ServedModel,
    body_refusal,
    content_type_refusal,
    header_refusal,
    mlx_lm_refusal,
)

#: Paths any liveness check may GET without the key.
OPEN_PATHS = ("/health",)


class GuardedHandler(mlx_server.APIHandler):
    """mlx_lm's handler, refusing browsers, rebinding pages, strangers and model swaps."""

    backend_key: str | None = None
    served: ServedModel = ServedModel.of(None)

    def _set_cors_headers(self) -> None:
        """No CORS headers at all: no web page may read a chat tier's answers."""

    def do_OPTIONS(self) -> None:
        if not self._refused_by_headers():
            super().do_OPTIONS()

    def do_GET(self) -> None:
        if not self._refused_by_headers():
            super().do_GET()

    def do_POST(self) -> None:
        if self._refused_by_headers():
            return
        refusal = content_type_refusal(self.headers.get("Content-Type"))
        if refusal is not None:
            self._refuse(refusal)
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self._post_to_mlx_lm()  # mlx_lm answers 411 / 400 itself, reading nothing
            return
        raw = self.rfile.read(int(length))
        refusal, body = body_refusal(raw, self.served, self.path)
        if refusal is not None:
            self._refuse(refusal)
            return
        connection = self.rfile
        self.headers.replace_header("Content-Length", str(len(body)))
        self.rfile = _Replay(body, connection)
        try:
            self._post_to_mlx_lm()
        finally:
            self.rfile = connection

    def _post_to_mlx_lm(self) -> None:
        """mlx_lm's ``do_POST``, with its error answers put in OpenAI's shape."""
        output = self.wfile
        self._error_status: int | None = None
        try:
            super().do_POST()
        finally:
            self.wfile = output
        status, self._error_status = self._error_status, None
        if status is not None:
            self._refuse(mlx_lm_refusal(status, self._error_body.getvalue(), self.path))

    def _set_completion_headers(self, status_code: int = 200) -> None:
        """An error of mlx_lm's (``{"error": "text"}``) is held back, to be answered in
        OpenAI's shape by :meth:`do_POST`: clients and LiteLLM read ``error.message``."""
        if status_code >= 400 and self.command == "POST":
            self._error_status = status_code
            self._error_body = io.BytesIO()
            self.wfile = self._error_body  # nothing of mlx_lm's answer goes out
            return
        super()._set_completion_headers(status_code)

    def end_headers(self) -> None:
        if getattr(self, "_error_status", None) is None:
            super().end_headers()

    def _refused_by_headers(self) -> bool:
        path = self.path.split("?", 1)[0]
        refusal = header_refusal(
            self.headers.get_all("Host") or [],
            self.headers.get_all("Origin") or [],
            self.headers.get("Sec-Fetch-Site"),
            self.headers.get("Authorization"),
            self.backend_key,
            needs_key=path not in OPEN_PATHS,
        )
        if refusal is None:
            return False
        self._refuse(refusal)
        return True

    def _refuse(self, refusal: Refusal) -> None:
        body = refusal.body()
        self.close_connection = True  # an unread body must not be taken for the next request
        self.send_response(refusal.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


class _Replay(io.RawIOBase):
    """The body already read, then the connection: what mlx_lm reads as ``rfile``."""

    def __init__(self, body: bytes, connection: BinaryIO) -> None:
        super().__init__()
        self._body = io.BytesIO(body)
        self._connection = connection

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._body.read(size)
        if size < 0 or len(data) < size:
            data += self._connection.read(-1 if size < 0 else size - len(data))
        return data

    def readline(self, size: int = -1) -> bytes:
        line = self._body.readline(size)
        if not line.endswith(b"\n") and (size < 0 or len(line) < size):
            line += self._connection.readline(-1 if size < 0 else size - len(line))
        return line


def _run_guarded(host: str, port: int, model_provider: Any, **_: Any) -> None:
    """mlx_lm's ``run()``, serving through :class:`GuardedHandler`."""
    model = model_provider.cli_args.model
    resolved = str(Path(model).resolve()) if model and Path(model).exists() else None
    GuardedHandler.served = ServedModel.of(model, resolved)
    group = mlx_server.mx.distributed.init()
    cache = mlx_server.LRUPromptCache(model_provider.cli_args.prompt_cache_size)
    generator = mlx_server.ResponseGenerator(model_provider, cache)
    if group.rank() == 0:
        mlx_server._run_http_server(host, port, generator, handler_class=GuardedHandler)
    else:
        generator.join()


def main() -> None:
    GuardedHandler.backend_key = os.environ.pop(KEY_ENV, None) or None
    mlx_server.run = _run_guarded  # type: ignore[assignment]
    mlx_server.main()


if __name__ == "__main__":
    sys.argv[0] = "mlx_stack.chat"
    main()
