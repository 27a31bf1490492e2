"""The supervisor's record of the stack (``run/state.json``), and the lock that makes it unique.

The supervisor writes a snapshot atomically on every change and every few seconds; `status`,
`up` and `down` read it. Each process is recorded with its start time and command line, so a
PID reused after a crash or a reboot is never signalled.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_stack import processes
from mlx_stack.atomic import write_atomic
from mlx_stack.errors import StateError
from mlx_stack.processes import ProcessRecord

STATE_VERSION = 2


@dataclass(frozen=True)
class ExitInfo:
    """How a service's process last ended."""

    code: int | None
    signal: int | None
    at: float  # wall clock
    log_tail: tuple[str, ...]
    expected: bool = False  # we stopped it on purpose (down, restart, an edit): not a failure

    @classmethod
    def from_returncode(cls, rc: int, at: float, log_tail: list[str],
                        expected: bool = False) -> ExitInfo:
        if rc < 0:
            return cls(None, -rc, at, tuple(log_tail), expected)
        return cls(rc, None, at, tuple(log_tail), expected)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        return f"exit code {self.code}"

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "signal": self.signal,
            "at": self.at,
            "description": self.describe(),
            "log_tail": list(self.log_tail),
            "expected": self.expected,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExitInfo:
        return cls(d.get("code"), d.get("signal"), float(d["at"]), tuple(d.get("log_tail", [])),
                   bool(d.get("expected", False)))


@dataclass(frozen=True)
class ServiceSnapshot:
    name: str
    kind: str
    state: str
    reason: str
    model: str | None
    port: int
    wanted: bool
    process: ProcessRecord | None
    fingerprint: str
    started_at: float | None
    restarts: int
    last_exit: ExitInfo | None
    last_probe_ms: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "state": self.state,
            "reason": self.reason,
            "model": self.model,
            "port": self.port,
            "wanted": self.wanted,
            "process": self.process.to_json() if self.process else None,
            "fingerprint": self.fingerprint,
            "started_at": self.started_at,
            "restarts": self.restarts,
            "last_exit": self.last_exit.to_json() if self.last_exit else None,
            "last_probe_ms": self.last_probe_ms,
        }

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> ServiceSnapshot:
        return cls(
            name,
            str(d["kind"]),
            str(d["state"]),
            str(d.get("reason", "")),
            d.get("model"),
            int(d.get("port", 0)),
            bool(d.get("wanted", True)),
            ProcessRecord.from_json(d["process"]) if d.get("process") else None,
            str(d.get("fingerprint", "")),
            d.get("started_at"),
            int(d.get("restarts", 0)),
            ExitInfo.from_json(d["last_exit"]) if d.get("last_exit") else None,
            d.get("last_probe_ms"),
        )


@dataclass(frozen=True)
class SupervisorSnapshot:
    pid: int
    create_time: float
    argv: tuple[str, ...]
    started_at: float
    stack_error: str | None
    shutting_down: bool
    services: tuple[ServiceSnapshot, ...]

    @property
    def record(self) -> ProcessRecord:
        return ProcessRecord(self.pid, self.pid, self.create_time, self.argv)

    def service(self, name: str) -> ServiceSnapshot | None:
        return next((s for s in self.services if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "supervisor": {
                "pid": self.pid,
                "create_time": self.create_time,
                "argv": list(self.argv),
                "started_at": self.started_at,
                "stack_error": self.stack_error,
                "shutting_down": self.shutting_down,
            },
            "services": {s.name: s.to_json() for s in self.services},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SupervisorSnapshot:
        sup = d["supervisor"]
        return cls(
            int(sup["pid"]),
            float(sup["create_time"]),
            tuple(sup["argv"]),
            float(sup["started_at"]),
            sup.get("stack_error"),
            bool(sup.get("shutting_down")),
            tuple(ServiceSnapshot.from_json(n, s) for n, s in d["services"].items()),
        )


def save_snapshot(path: Path, snap: SupervisorSnapshot) -> None:
    write_atomic(path, json.dumps(snap.to_json(), indent=2) + "\n")


def load_snapshot(path: Path) -> SupervisorSnapshot | None:
    """The last snapshot, or None if there is none (or it is from an older mlx-stack)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path} is unreadable ({exc}); if no stack runs, delete it") from None
    if raw.get("version") != STATE_VERSION:
        return None
    try:
        return SupervisorSnapshot.from_json(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{path} is corrupt ({exc}); if no stack runs, delete it") from None


def supervisor_alive(snap: SupervisorSnapshot | None) -> bool:
    return snap is not None and processes.is_running(snap.record)


def clean_leftovers(state_file: Path, timeout_s: float = 5.0) -> list[str]:
    """End services a dead supervisor left behind (identity-checked); return their names."""
    try:
        snap = load_snapshot(state_file)
    except StateError:
        return []
    if snap is None:
        return []
    left = [s for s in snap.services if s.process is not None and processes.is_running(s.process)]
    processes.stop_all([s.process for s in left if s.process is not None], timeout_s)
    return [s.name for s in left]


@contextmanager
def supervisor_lock(path: Path) -> Iterator[None]:
    """Held by the supervisor for its whole life; the OS drops it even on SIGKILL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(
                f"another supervisor already runs this stack ({path}); "
                "use `mlx-stack status`, or `mlx-stack down` first"
            ) from None
        yield
    finally:
        os.close(fd)


def lock_is_held(path: Path) -> bool:
    """True if a supervisor holds the lock right now."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
