"""The supervisor's record of the stack (``run/state.json``): the other half of the contract.

The supervisor writes a snapshot atomically on every change and every few seconds; `status`,
`up` and `down` read it. Each process is recorded with its start time and command line, so a
PID reused after a crash or a reboot is never signalled. Records are built by keyword.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_stack.contract.addressing import aliases_of, groups_of, resolve
from mlx_stack.errors import StateError
from mlx_stack.supervisor.processes import ProcessRecord, is_running

STATE_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: before warnings and faults; read so leftovers are found


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
    """One service as the supervisor last saw it."""

    name: str
    kind: str
    state: str
    reason: str = ""
    model: str | None = None
    port: int = 0
    wanted: bool = True
    process: ProcessRecord | None = None
    fingerprint: str = ""
    started_at: float | None = None  # wall clock, of the current process
    restarts: int = 0
    last_exit: ExitInfo | None = None
    last_probe_ms: float | None = None
    #: A supervisor error while handling this service (a bug, contained): shown in `status`.
    fault: str = ""
    #: The tier a replica belongs to (``embeddings`` for ``embeddings-2``); "" for the others.
    group: str = ""
    #: False while the supervisor drains this replica before replacing it: the proxy sends it
    #: no new request (``litellm/gate.py`` reads it), its requests in flight finish.
    in_route: bool = True

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
            "fault": self.fault,
            "group": self.group,
            "in_route": self.in_route,
        }

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> ServiceSnapshot:
        return cls(
            name=name,
            kind=str(d["kind"]),
            state=str(d["state"]),
            reason=str(d.get("reason", "")),
            model=d.get("model"),
            port=int(d.get("port", 0)),
            wanted=bool(d.get("wanted", True)),
            process=ProcessRecord.from_json(d["process"]) if d.get("process") else None,
            fingerprint=str(d.get("fingerprint", "")),
            started_at=d.get("started_at"),
            restarts=int(d.get("restarts", 0)),
            last_exit=ExitInfo.from_json(d["last_exit"]) if d.get("last_exit") else None,
            last_probe_ms=d.get("last_probe_ms"),
            fault=str(d.get("fault", "")),
            group=str(d.get("group", "")),
            in_route=bool(d.get("in_route", True)),
        )


@dataclass(frozen=True)
class RemoteModelStatus:
    """One model of a remote proxy: the name it joins under, and whether it is in the proxy."""

    name: str
    joined: str
    verdict: str  # config.remotes.Verdict: accepted, pending, refused
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "as": self.joined, "verdict": self.verdict,
                "reason": self.reason}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RemoteModelStatus:
        return cls(str(d["name"]), str(d.get("as", d["name"])), str(d["verdict"]),
                   str(d.get("reason", "")))


@dataclass(frozen=True)
class RemoteStatus:
    """A remote mlx-stack proxy as the supervisor's prober last saw it."""

    name: str
    url: str
    #: Never checked yet, or the last check: reachable (it answered), authorised (the key).
    checked_at: float | None = None  # wall clock
    reachable: bool = False
    authorised: bool | None = None
    latency_ms: float | None = None
    problem: str = ""
    models: tuple[RemoteModelStatus, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "checked_at": self.checked_at, "reachable": self.reachable,
                "authorised": self.authorised, "latency_ms": self.latency_ms,
                "problem": self.problem, "models": [m.to_json() for m in self.models]}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> RemoteStatus:
        return cls(name, str(d["url"]), d.get("checked_at"), bool(d.get("reachable")),
                   d.get("authorised"), d.get("latency_ms"), str(d.get("problem", "")),
                   tuple(RemoteModelStatus.from_json(m) for m in d.get("models", ())))


@dataclass(frozen=True)
class SupervisorSnapshot:
    """The supervisor itself and every service it supervises."""

    pid: int
    create_time: float
    argv: tuple[str, ...]
    started_at: float
    stack_error: str | None = None
    shutting_down: bool = False
    services: tuple[ServiceSnapshot, ...] = ()
    #: Problems the supervisor worked around (a failed log or snapshot write), newest last.
    warnings: tuple[str, ...] = field(default=())
    #: Other machines' proxies (``remotes:`` in the stack file), as last probed.
    remotes: tuple[RemoteStatus, ...] = ()

    @property
    def record(self) -> ProcessRecord:
        return ProcessRecord(self.pid, self.pid, self.create_time, self.argv)

    def service(self, name: str) -> ServiceSnapshot | None:
        return next((s for s in self.services if s.name == name), None)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Each tier with replicas: its services (see ``addressing.py``)."""
        return groups_of((s.name, s.group) for s in self.services)

    def members(self, name: str) -> tuple[str, ...]:
        """The services a command naming ``name`` addresses."""
        return resolve(name, self.groups)

    @property
    def addressable(self) -> tuple[str, ...]:
        """Every name a command may target: each service, and ``<tier>-1`` for replicas."""
        return (*(s.name for s in self.services), *aliases_of(self.groups))

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
                "warnings": list(self.warnings),
            },
            "services": {s.name: s.to_json() for s in self.services},
            "remotes": {r.name: r.to_json() for r in self.remotes},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SupervisorSnapshot:
        sup = d["supervisor"]
        return cls(
            pid=int(sup["pid"]),
            create_time=float(sup["create_time"]),
            argv=tuple(sup["argv"]),
            started_at=float(sup["started_at"]),
            stack_error=sup.get("stack_error"),
            shutting_down=bool(sup.get("shutting_down")),
            services=tuple(ServiceSnapshot.from_json(n, s) for n, s in d["services"].items()),
            warnings=tuple(str(w) for w in sup.get("warnings", ())),
            remotes=tuple(RemoteStatus.from_json(n, r)
                          for n, r in (d.get("remotes") or {}).items()),
        )


def snapshot_text(snap: SupervisorSnapshot) -> str:
    return json.dumps(snap.to_json(), indent=2) + "\n"


def load_snapshot(path: Path) -> SupervisorSnapshot | None:
    """The last snapshot, or None if there is none (or it is from an older mlx-stack)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path} is unreadable ({exc}); if no stack runs, delete it") from None
    if not isinstance(raw, dict) or raw.get("version") not in READABLE_VERSIONS:
        return None
    try:
        return SupervisorSnapshot.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"{path} is corrupt ({exc}); if no stack runs, delete it") from None


def supervisor_alive(snap: SupervisorSnapshot | None) -> bool:
    return snap is not None and is_running(snap.record)
