"""The states of a supervised service and the moves allowed between them.

Standard library only, and nothing else here: the watchdog changes a service's state through
``check_transition`` alone, so an impossible move is a bug that shows, not a silent mess.

    STOPPED ──start──▶ STARTING ──probe ok──▶ READY ◀──probe ok── UNHEALTHY
       ▲                 │  │                   │ probe fails x N   ▲  │ kill + restart
       │                 │  └─exit/timeout─▶ BACKOFF ◀──exit────────┘──┘
       │                 └──unfixable──▶ FATAL ◀──crash loop── BACKOFF
    STOPPING ◀── stop (from any running state)
"""

from __future__ import annotations

import enum


class ServiceState(str, enum.Enum):
    STOPPED = "stopped"  # not running, and not meant to be
    STARTING = "starting"  # spawned; waiting for its first successful probe
    READY = "ready"  # answered a real request
    UNHEALTHY = "unhealthy"  # alive, failing probes (below the threshold, or being restarted)
    BACKOFF = "backoff"  # exited or failed to start; waiting before the next start
    FATAL = "fatal"  # will not be restarted: a crash loop, or a cause restarts cannot fix
    STOPPING = "stopping"  # signalled; waiting for the process group to end

    @property
    def running(self) -> bool:
        """A process exists (or should) in this state."""
        return self in (
            ServiceState.STARTING,
            ServiceState.READY,
            ServiceState.UNHEALTHY,
            ServiceState.STOPPING,
        )


S = ServiceState
TRANSITIONS: dict[ServiceState, frozenset[ServiceState]] = {
    S.STOPPED: frozenset({S.STARTING, S.BACKOFF, S.FATAL}),  # BACKOFF: could not even start
    S.STARTING: frozenset({S.READY, S.BACKOFF, S.FATAL, S.STOPPING}),
    S.READY: frozenset({S.UNHEALTHY, S.BACKOFF, S.FATAL, S.STOPPING}),
    S.UNHEALTHY: frozenset({S.READY, S.BACKOFF, S.FATAL, S.STOPPING}),
    S.BACKOFF: frozenset({S.STARTING, S.FATAL, S.STOPPED}),
    S.FATAL: frozenset({S.STARTING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF, S.FATAL}),
}


class IllegalTransition(RuntimeError):
    """A state change the table forbids: a bug in the watchdog, never a user error."""


def check_transition(old: ServiceState, new: ServiceState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old.value} -> {new.value} is not a legal transition")
