"""The stack's runtime record (``run/state.json``): which processes `up` started, for which spec.

Written atomically after every change, so a crash of mlx-stack itself never leaves a record
that points at the wrong processes; read by `status` and `down`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_stack.atomic import write_atomic
from mlx_stack.errors import StateError
from mlx_stack.processes import ProcessRecord

STATE_VERSION = 1


@dataclass(frozen=True)
class ServiceRecord:
    """One started service: its process and the fingerprint of the spec it was started from."""

    name: str
    kind: str
    process: ProcessRecord
    fingerprint: str
    port: int
    model: str | None
    started_at: float  # wall clock, for display only

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "process": self.process.to_json(),
            "fingerprint": self.fingerprint,
            "port": self.port,
            "model": self.model,
            "started_at": self.started_at,
        }

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> ServiceRecord:
        return cls(
            name,
            str(d["kind"]),
            ProcessRecord.from_json(d["process"]),
            str(d["fingerprint"]),
            int(d["port"]),
            d.get("model"),
            float(d["started_at"]),
        )


@dataclass
class StackState:
    services: dict[str, ServiceRecord] = field(default_factory=dict)


def load_state(path: Path) -> StackState:
    if not path.exists():
        return StackState()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        services = {n: ServiceRecord.from_json(n, d) for n, d in raw.get("services", {}).items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"{path} is unreadable or corrupt ({exc}). If no stack is running, delete it; "
            "otherwise stop the processes listed in it by pid first"
        ) from None
    return StackState(services)


def save_state(path: Path, state: StackState) -> None:
    body = {
        "version": STATE_VERSION,
        "services": {n: r.to_json() for n, r in sorted(state.services.items())},
    }
    write_atomic(path, json.dumps(body, indent=2) + "\n")


@contextmanager
def stack_lock(path: Path) -> Iterator[None]:
    """Serialise `up`/`down` of one stack: a second one waits for the first to finish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(f"cannot open lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
