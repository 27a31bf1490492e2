"""Log files: how rotated backups are named, reading the last lines, following new ones.

Shared by the supervisor (which writes and rotates them, `supervisor/logsink.py`) and the CLI
(`mlx-stack logs`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path


def tail(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a text file, read from the end (logs can be large)."""
    if n <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= n:
                step = min(8192, end)
                end -= step
                f.seek(end)
                data = f.read(step) + data
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-n:]


def follow(path: Path, poll_s: float = 0.25) -> Iterator[str]:
    """Yield lines appended to ``path`` from now on, across truncation or replacement."""
    f = None
    inode = None
    buf = b""
    try:
        while True:
            if f is None:
                try:
                    f = open(path, "rb")  # noqa: SIM115 - kept open across yields
                    inode = os.fstat(f.fileno()).st_ino
                    f.seek(0, os.SEEK_END)
                except FileNotFoundError:
                    time.sleep(poll_s)
                    continue
            chunk = f.read()
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
                continue
            try:
                st = os.stat(path)
                if st.st_ino != inode or st.st_size < f.tell():
                    f.close()
                    f = open(path, "rb")  # noqa: SIM115 - kept open across yields  # rotated or truncated: read the new file from its start
                    inode = os.fstat(f.fileno()).st_ino
                    continue
            except FileNotFoundError:
                pass
            time.sleep(poll_s)
    finally:
        if f is not None:
            f.close()


def backup_path(path: Path, i: int) -> Path:
    """The ``i``-th rotated backup of a log (1 is the newest)."""
    return path.with_name(f"{path.name}.{i}")


def all_log_files(path: Path, backups: int = 99) -> list[Path]:
    """The backups, oldest first, then the live file: the order to read them in."""
    olds = [backup_path(path, i) for i in range(backups, 0, -1)]
    return [p for p in olds if p.exists()] + ([path] if path.exists() else [])
