"""One supervisor per stack: the lock it holds for its whole life, and cleanup of what a dead one
left behind, which happens only under that lock.

Cleanup reads the last snapshot and ends the processes it names (identity-checked: pid, start
time, command line). Done without the lock, two `up` run at once could each take the other's
fresh children for leftovers; under the lock only one process at a time can do it, and none
while a supervisor runs.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mlx_stack.contract.snapshot import load_snapshot
from mlx_stack.errors import StateError
from mlx_stack.private import FILE_MODE, make_dirs
from mlx_stack.supervisor import processes


class StackLock:
    """An exclusive ``flock`` on ``run/stack.lock``; the OS drops it even on SIGKILL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StateError naming what to do (never through a link)."""
        try:
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as exc:
            raise StateError(f"cannot open the stack's lock {self.path}: "
                             f"{exc.strerror or exc}; if it is a link, delete it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(
                f"another supervisor already runs this stack ({self.path}); "
                "use `mlx-stack status`, or `mlx-stack down` first"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def still_ours(self) -> bool:
        """False once the lock file was deleted or replaced: another process may lock the new
        one, so this supervisor is no longer the only one. A deleted file is re-created and
        locked again when nobody else took it."""
        if self._fd is None:
            return False
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        except OSError:
            return True  # cannot tell (a transient error): keep serving
        if same:
            return True
        old = self._fd
        try:
            self.acquire()
        except (StateError, OSError):
            self._fd = old
            return False
        os.close(old)
        return True

    def __enter__(self) -> StackLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def clean_leftovers(state_file: Path, timeout_s: float = 5.0) -> list[str]:
    """End services a dead supervisor left behind; return their names. Call under the lock."""
    try:
        snap = load_snapshot(state_file)
    except StateError:
        return []
    if snap is None:
        return []
    left = [s for s in snap.services if s.process is not None and processes.is_running(s.process)]
    processes.stop_all([s.process for s in left if s.process is not None], timeout_s)
    return [s.name for s in left]


def lock_held(lock_file: Path) -> bool:
    """True if a supervisor holds the stack's lock right now."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def clean_leftovers_if_unlocked(lock_file: Path, state_file: Path) -> list[str]:
    """`down` without a supervisor: clean up only if no supervisor holds (or takes) the lock."""
    lock = StackLock(lock_file)
    try:
        lock.acquire()
    except StateError:
        return []
    try:
        return clean_leftovers(state_file)
    finally:
        lock.release()
