"""Service logs written by the supervisor: size-based rotation without losing or cutting lines.

Children write to a pipe, not to the file: the supervisor reads whole lines and appends them,
so rotation (rename ``x.log`` to ``x.log.1`` ...) happens between lines and a child never
writes into a file that has been moved away. Restarts are marked in the log, which is never
truncated.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import BinaryIO


class RotatingLog:
    """An append-only log file that rotates at ``max_bytes`` keeping ``backups`` old files."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(path, "ab")  # noqa: SIM115 - owned for the object's life

    def mark(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write_line(f"==== mlx-stack {stamp}: {text} ====".encode())

    def write_line(self, line: bytes) -> None:
        with self._lock:
            if self._file.tell() + len(line) + 1 > self.max_bytes and self._file.tell() > 0:
                self._rotate()
            self._file.write(line + b"\n")
            self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        with self._lock:
            self._file.close()


def all_log_files(path: Path, backups: int = 99) -> list[Path]:
    """The backups, oldest first, then the live file: the order to read them in."""
    olds = [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)]
    return [p for p in olds if p.exists()] + ([path] if path.exists() else [])


def pump(stream: BinaryIO, log: RotatingLog, max_line: int = 64 * 1024) -> None:
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
