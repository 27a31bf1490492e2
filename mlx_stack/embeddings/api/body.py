"""Read a request body within a deadline and a size limit, then decode it off the event loop.

CPython's JSON parser holds the GIL for the whole parse, so a thread would not help: 16 MiB
of token ids take ~0.9 s to parse and 16 MiB of ``[]`` ~4 s, and the event loop (``/health``,
every other request) would wait that long. Small bodies decode on the loop (microseconds);
larger ones in one child process, which sends back a validated request whose token ids are
numpy arrays, cheap to receive.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from starlette.types import Receive

from .apierror import ApiError, ErrorKind, invalid
from .protocol import decode_request

T = TypeVar("T")

log = logging.getLogger("mlx_stack.embeddings")

MAX_BODY_BYTES = 16 * 1024 * 1024
"""2048 inputs of ~8 KB each; larger bodies get 413 before being read whole."""
INLINE_DECODE_BYTES = 64 * 1024
"""Bodies up to this size decode on the event loop: at worst ~20 ms of pathological JSON."""
PARENT_POLL_SECONDS = 0.5

_timeout = getattr(asyncio, "timeout", None)
"""``asyncio.timeout`` (Python >= 3.11): a deadline on the running task itself."""


async def read_body(
    receive: Receive, declared_length: str | None, limit: int, timeout: float
) -> bytes:
    """The whole body, or an :class:`ApiError`: 413 over ``limit``, 408 after ``timeout`` s.

    The deadline covers the whole body, not each read: a client trickling a byte every few
    seconds is cut off as surely as a silent one. A client that goes away is a 499 (counted,
    never answered, not an internal error).
    """
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > limit:
        raise too_large(limit)
    try:
        if _timeout is None:  # Python 3.10
            return await asyncio.wait_for(_collect(receive, limit), timeout)
        async with _timeout(timeout):  # no task per request, as wait_for makes (~30 us)
            return await _collect(receive, limit)
    except asyncio.TimeoutError:
        raise ApiError(
            ErrorKind.REQUEST_TIMEOUT,
            f"the request body did not arrive within {timeout:g} s (--body-timeout); send "
            "the whole body at once",
            code="body_timeout",
        ) from None


async def _collect(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(
                ErrorKind.CLIENT_CLOSED, "the client closed the connection during the body"
            )
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def too_large(limit: int) -> ApiError:
    return ApiError(
        ErrorKind.PAYLOAD_TOO_LARGE,
        f"the request body exceeds {limit} bytes; split the inputs over several requests",
        code="payload_too_large",
    )


class BodyDecoder:
    """Decodes request bodies: small ones here, large ones in a child process.

    The child starts with the first large body (~1 s to import numpy, paid once) and stays:
    a server that only sees small requests never pays its ~50 MB.
    """

    def __init__(self, inline_bytes: int = INLINE_DECODE_BYTES) -> None:
        self._inline_bytes = inline_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def decode(
        self, raw: bytes, parse: Callable[[bytes], T] = decode_request  # type: ignore[assignment]
    ) -> T:
        """``parse(raw)``, here or in the child process (``parse`` must be module-level)."""
        if len(raw) <= self._inline_bytes:
            return parse(raw)
        for attempt in (1, 2):  # a decoder found dead is replaced; one that dies twice on
            pool = self._pool = self._pool or _new_pool()  # this body was killed by it
            try:
                return await asyncio.get_running_loop().run_in_executor(pool, parse, raw)
            except BrokenProcessPool:
                log.error("the body decoder process ended (attempt %d); starting another", attempt)
                if self._pool is pool:
                    pool.shutdown(wait=False)
                    self._pool = None
        raise invalid(
            "the request body could not be decoded: the decoder process ended twice while "
            "reading it (out of memory?); send a smaller body"
        )

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _new_pool() -> ProcessPoolExecutor:
    # spawn, not fork: by now this process runs MLX's and the tokenizer's threads
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        1, mp_context=context, initializer=_in_decoder, initargs=(os.getpid(),)
    )


def _in_decoder(server_pid: int) -> None:
    """Set up the decoder process: leave Ctrl-C (sent to the whole group) to the server, and
    end with the server however it ends (it leaves with ``os._exit``, which tells no one)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(server_pid,), daemon=True).start()


def _exit_with(server_pid: int) -> None:
    while os.getppid() == server_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(0)
