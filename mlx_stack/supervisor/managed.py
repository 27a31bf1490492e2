"""One service under supervision: its spec and everything the loop knows about it.

A plain mutable record owned by the loop's thread alone (``loop.py``); its state changes only
through ``Supervisor._set_state``. :meth:`Managed.snapshot` is how the rest of the world sees it.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from mlx_stack.config.plan import ServiceKind, ServiceSpec
from mlx_stack.contract.snapshot import ExitInfo, ServiceSnapshot
from mlx_stack.supervisor.logsink import LogSink
from mlx_stack.supervisor.policy import Observation
from mlx_stack.supervisor.probes import ProbeResult
from mlx_stack.supervisor.processes import ProcessRecord
from mlx_stack.supervisor.runtime import ChildProcess
from mlx_stack.supervisor.states import ServiceState

S = ServiceState


@dataclass
class Managed:
    name: str
    spec: ServiceSpec | None
    unavailable: str = ""  # why no spec could be built (weights missing): FATAL at start
    wanted: bool = True
    state: ServiceState = S.STOPPED
    reason: str = ""
    #: A supervisor error while stepping this service (contained); kept a minute after the last.
    fault: str = ""
    fault_at: float = 0.0
    child: ChildProcess | None = None
    log: LogSink | None = None
    started_at: float = 0.0
    started_wall: float = 0.0
    last_progress_at: float = 0.0
    progress_mark: tuple[int, int] = (0, 0)
    next_progress_check: float = 0.0
    ready_since: float | None = None
    consecutive_failures: int = 0
    restart_times: list[float] = field(default_factory=list)
    restarts: int = 0
    next_start_at: float = 0.0
    probe_failures: int = 0  # real requests answered wrongly, in a row
    probe: Future[ProbeResult] | None = None
    next_probe_at: float = 0.0
    last_probe_ms: float | None = None
    last_probe_detail: str = ""
    last_probe_timed_out: bool = False
    liveness: Future[ProbeResult] | None = None
    next_liveness_at: float = 0.0
    #: The last liveness checks, for ``policy.judge_hang`` (a minute or so at 1/s).
    observations: deque[Observation] = field(default_factory=lambda: deque(maxlen=120))
    unanswered_since: float | None = None
    last_exit: ExitInfo | None = None
    stop_deadline: float = 0.0
    killed: bool = False
    after_stop: ServiceState = S.STOPPED
    after_stop_reason: str = ""
    stop_is_failure: bool = False  # the stop under way is a failure (hang, failed start)
    #: A new definition waiting for this replica's turn in a rolling replacement.
    pending_spec: ServiceSpec | None = None
    #: False while drained before a rolling replacement (the proxy sends it nothing new).
    in_route: bool = True

    @property
    def kind(self) -> ServiceKind:
        return self.spec.kind if self.spec else ServiceKind.CHAT

    @property
    def record(self) -> ProcessRecord | None:
        return self.child.record if self.child is not None else None

    def snapshot(self) -> ServiceSnapshot:
        return ServiceSnapshot(
            name=self.name,
            kind=self.kind.value,
            state=self.state.value,
            reason=self.reason,
            model=self.spec.model if self.spec else None,
            port=self.spec.port if self.spec else 0,
            wanted=self.wanted,
            process=self.record,
            fingerprint=self.spec.fingerprint if self.spec else "",
            started_at=self.started_wall if self.child is not None else None,
            restarts=self.restarts,
            last_exit=self.last_exit,
            last_probe_ms=self.last_probe_ms,
            fault=self.fault,
            group=self.spec.group if self.spec else "",
            in_route=self.in_route,
        )
