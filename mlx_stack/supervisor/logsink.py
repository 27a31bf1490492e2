"""Service logs written by the supervisor: size-based rotation without losing or cutting lines.

Children write to a pipe, not to the file: the supervisor reads whole lines and appends them,
so rotation (rename ``x.log`` to ``x.log.1`` ...) happens between lines and a child never
writes into a file that has been moved away. Restarts are marked in the log, which is never
truncated.

A write that fails (a full disk, a removed folder, no permission) never raises: the line is
dropped and counted, the file is reopened on the next line, and the loop shows the failure as a
warning (:meth:`RotatingLog.take_error`). Raising would kill the pump thread, the child's pipe
would fill, and the child would block: a logging problem must not become a hung service.

Files are private (0600) and never opened through a link (``logfiles.open_append``): a link
planted in a log's place is replaced by a new file, and that is reported the same way.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO, Protocol

from mlx_stack.logfiles import backup_path, open_append


class LogSink(Protocol):
    path: Path

    def write_line(self, line: bytes) -> None: ...

    def mark(self, text: str) -> None: ...

    def take_error(self) -> str | None:
        """The last write failure since the previous call, or None."""

    def close(self) -> None: ...


class RotatingLog:
    """An append-only log file that rotates at ``max_bytes`` keeping ``backups`` old files."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._error: str | None = None
        self._unreported = False
        self._dropped = 0
        try:
            self._open()
        except OSError as exc:  # reported by take_error; retried on the first line
            self._error = f"cannot open {self.path}: {exc.strerror or exc}"
            self._unreported = True

    def mark(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write_line(f"==== mlx-stack {stamp}: {text} ====".encode())

    def write_line(self, line: bytes) -> None:
        with self._lock:
            try:
                f = self._open()
                if f.tell() + len(line) + 1 > self.max_bytes and f.tell() > 0:
                    f = self._rotate(f)
                if self._dropped:
                    f.write(f"==== mlx-stack: {self._dropped} line(s) lost: {self._error} "
                            "====\n".encode())
                    self._dropped = 0
                f.write(line + b"\n")
                f.flush()
            except OSError as exc:
                self._dropped += 1
                self._error = f"cannot write {self.path}: {exc.strerror or exc}"
                self._unreported = True
                self._close_quietly()

    def take_error(self) -> str | None:
        with self._lock:
            if not self._unreported:
                return None
            self._unreported = False
            return self._error

    def _open(self) -> BinaryIO:
        if self._file is None:
            self._file, warning = open_append(self.path)
            if warning:
                self._error = warning
                self._unreported = True
        return self._file

    def _rotate(self, f: BinaryIO) -> BinaryIO:
        f.close()
        self._file = None
        for i in range(self.backups - 1, 0, -1):
            older = backup_path(self.path, i)
            if older.exists():
                os.replace(older, backup_path(self.path, i + 1))
        if self.backups > 0:
            os.replace(self.path, backup_path(self.path, 1))
        else:
            self.path.unlink(missing_ok=True)
        return self._open()

    def _close_quietly(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def close(self) -> None:
        with self._lock:
            self._close_quietly()


def pump(stream: BinaryIO, log: LogSink, max_line: int = 64 * 1024) -> None:
    """Copy a child's output into ``log`` line by line until EOF (run in a thread).

    An over-long line is split rather than held in memory without bound; a last line without
    a newline is still written.
    """
    buf = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            log.write_line(line)
        while len(buf) > max_line:
            log.write_line(buf[:max_line])
            buf = buf[max_line:]
    if buf:
        log.write_line(buf)
    stream.close()
