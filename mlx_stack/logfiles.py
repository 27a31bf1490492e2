"""Log files: opening them safely, backup names, reading the last lines, following new ones,
and showing child output on a terminal.

Shared by the supervisor (which writes and rotates them, `supervisor/logsink.py`) and the CLI
(`mlx-stack logs`). Logs are never opened through a symbolic link: one planted at
``logs/x.log`` would make the supervisor append to the file it names. And a child's output is
not trusted to be text: :func:`printable` shows its control characters instead of letting them
drive the terminal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mlx_stack.private import (
    FILE_MODE,
    NO_FOLLOW,
    NOT_A_FILE,
    NotRegularFileError,
    make_dirs,
    open_read,
    owner_only,
)

_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW

def open_append(path: Path) -> tuple[BinaryIO, str | None]:
    """Open a log for appending, never through a link: (the file, a warning or None).

    A symbolic link (or a FIFO, a socket...) where the log belongs is removed and a new private
    file made in its place; the warning says so. An older, readable-by-others log is made
    private. Raises OSError if it cannot be opened.
    """
    make_dirs(path.parent)
    warning = None
    for attempt in range(2):
        try:
            fd = os.open(path, _APPEND, FILE_MODE)
        except OSError as exc:
            if exc.errno not in NOT_A_FILE or attempt:
                raise
            warning = _remove_impostor(path)
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if attempt:
                raise NotRegularFileError(errno.EINVAL, f"{path} is not a regular file")
            warning = _remove_impostor(path)
            continue
        if st.st_mode & 0o077:
            with contextlib.suppress(OSError):
                os.fchmod(fd, owner_only(st.st_mode))
        return os.fdopen(fd, "ab"), warning
    raise NotRegularFileError(errno.EINVAL, f"{path} is not a regular file")  # not reached


def _remove_impostor(path: Path) -> str:
    what = "a file that is not a regular file"
    with contextlib.suppress(OSError):
        what = f"a symbolic link to {os.readlink(path)}" if path.is_symlink() else what
    path.unlink()
    return (f"{path} was {what}; it was replaced by a new log file "
            "(a log is never written through a link)")


def is_log(path: Path) -> bool:
    """A regular file, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def read_lines(path: Path) -> Iterator[str]:
    """Every line of a log, from its start (nothing if absent or not a regular file)."""
    try:
        f = open_read(path)
    except (FileNotFoundError, NotRegularFileError):
        return
    with f:
        for raw in f:
            yield raw.decode("utf-8", errors="replace").rstrip("\n")


def _visible(code: int) -> str:
    if code < 0x20:
        return "^" + chr(code + 0x40)  # ESC -> ^[, CR -> ^M, as `cat -v` shows them
    if code == 0x7F:
        return "^?"
    return f"\\x{code:02x}"  # C1 controls (CSI 0x9b...)


_VISIBLE = {c: _visible(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c != 0x09}


def printable(line: str) -> str:
    """``line`` with its control characters (ANSI escapes, ``\\r``, C1...) made visible, so a
    service's output cannot move the cursor, rewrite the screen or retitle the terminal of
    whoever reads its log. Tabs are kept."""
    return line.translate(_VISIBLE)


def tail(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a text file, read from the end (logs can be large)."""
    if n <= 0:
        return []
    try:
        with open_read(path) as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= n:
                step = min(8192, end)
                end -= step
                f.seek(end)
                data = f.read(step) + data
    except (FileNotFoundError, NotRegularFileError):
        return []
    # "\n" only: str.splitlines() would also break at "\r" and other controls a child wrote
    text = data.decode("utf-8", errors="replace")
    return text.removesuffix("\n").split("\n")[-n:] if text else []


def follow(path: Path, poll_s: float = 0.25) -> Iterator[str]:
    """Yield lines appended to ``path`` from now on, across truncation or replacement."""
    f: BinaryIO | None = None
    inode = None
    from_start = False  # a rotated or truncated log is read from its start
    buf = b""
    try:
        while True:
            if f is None:
                try:
                    f = open_read(path)
                except (FileNotFoundError, NotRegularFileError):
                    from_start = True  # whatever appears later is new
                    time.sleep(poll_s)
                    continue
                inode = os.fstat(f.fileno()).st_ino
                if not from_start:
                    f.seek(0, os.SEEK_END)
            chunk = f.read()
            if chunk:
                buf += chunk
                *done, buf = buf.split(b"\n")
                for line in done:
                    yield line.decode("utf-8", errors="replace")
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino != inode or st.st_size < f.tell()):
                f.close()
                f, from_start = None, True
                continue
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
    return [p for p in [*olds, path] if is_log(p)]


def follow_many(paths: dict[str, Path], poll_s: float = 0.25) -> Iterator[tuple[str, str]]:
    """(name, line) for lines appended to any of ``paths`` from now on (the replicas of a
    tier: `mlx-stack logs embeddings -f`), each file followed by its own thread."""
    import queue
    import threading

    lines: queue.Queue[tuple[str, str]] = queue.Queue()

    def pump(name: str, path: Path) -> None:
        for line in follow(path, poll_s):
            lines.put((name, line))

    for name, path in paths.items():
        threading.Thread(target=pump, args=(name, path), daemon=True).start()
    while True:
        yield lines.get()
