"""Bring a stack up, take it down, and report on it.

`up` is idempotent: a service already running from the same definition is kept, one whose
definition changed is restarted, one that is gone is started. Nothing starts until every check
has passed (weights present, ports free). The core never prints: progress goes to a callback.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mlx_stack import logs, ports, processes
from mlx_stack.atomic import write_atomic
from mlx_stack.errors import ConfigError, PortInUseError, ServiceStartError
from mlx_stack.paths import StatePaths
from mlx_stack.probes import ProbeResult, run_probe
from mlx_stack.proxykey import read_key
from mlx_stack.schema import close_matches
from mlx_stack.services import Plan, ServiceKind, ServiceSpec, plan_services
from mlx_stack.stackfile import Stack
from mlx_stack.state import ServiceRecord, StackState, load_state, save_state, stack_lock

Report = Callable[[str, str], None]
LOG_LINES_ON_FAILURE = 15
POLL_S = 0.25


def _quiet(_service: str, _message: str) -> None:
    pass


class ServiceState(str, enum.Enum):
    """What `status` says of a service (the watchdog adds backoff, fatal and stopping)."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    EXITED = "exited"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    kind: str
    state: ServiceState
    model: str | None
    port: int
    pid: int | None
    uptime_s: float | None
    rss_bytes: int | None
    probe_ms: float | None
    detail: str

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state.value,
            "model": self.model,
            "port": self.port,
            "pid": self.pid,
            "uptime_s": None if self.uptime_s is None else round(self.uptime_s, 1),
            "rss_mb": None if self.rss_bytes is None else round(self.rss_bytes / 2**20, 1),
            "probe_ms": None if self.probe_ms is None else round(self.probe_ms, 1),
            "detail": self.detail,
        }


def _failure(spec: ServiceSpec, log: Path, why: str) -> str:
    lines = logs.tail(log, LOG_LINES_ON_FAILURE)
    shown = "\n".join(f"      | {line}" for line in lines) or "      | (empty log)"
    return f"{spec.name}: {why}; last lines of {log}:\n{shown}"


def wait_ready(
    spec: ServiceSpec, rec: processes.ProcessRecord, log_path: Path, timeout_s: float | None = None
) -> str:
    """Poll the real probe until it succeeds; return '' or why the service failed to start.

    Fails early when the process exits, with its exit code.
    """
    deadline = time.monotonic() + (timeout_s or spec.ready_timeout_s)
    last = ProbeResult(False, 0.0, "no answer yet")
    while time.monotonic() < deadline:
        if not processes.is_running(rec):
            code = processes.exit_code(rec)
            how = f"exited with code {code}" if code is not None else "exited"
            if code is not None and code < 0:
                how = f"was killed by signal {-code}"
            return _failure(spec, log_path, how)
        last = run_probe(spec.probe, timeout_s=min(30.0, max(1.0, deadline - time.monotonic())))
        if last.ok:
            return ""
        time.sleep(POLL_S)
    return _failure(
        spec, log_path, f"not ready after {timeout_s or spec.ready_timeout_s:.0f} s ({last.detail})"
    )


def _check_ports(specs: Sequence[ServiceSpec]) -> None:
    taken = []
    for s in specs:
        if not ports.is_free(s.port, "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host):
            taken.append(f"  - {s.name}: port {s.port} is held by {ports.holder(s.port)}")
    if taken:
        raise PortInUseError(
            "ports the stack needs are taken; nothing was started:\n"
            + "\n".join(taken)
            + "\nStop that program, or give the service another port in the stack file."
        )


def _stop(
    records: Sequence[ServiceRecord],
    state: StackState,
    paths: StatePaths,
    report: Report,
    timeout_s: float,
) -> None:
    if not records:
        return
    for r in records:
        report(r.name, "stopping")
    outcome = processes.stop_all([r.process for r in records], timeout_s)
    for r in records:
        state.services.pop(r.name, None)
        report(r.name, outcome.get(r.process.pid, "stopped"))
    save_state(paths.state_file, state)


def _start(
    specs: Sequence[ServiceSpec], state: StackState, paths: StatePaths, report: Report
) -> None:
    """Spawn every spec, then wait for all of them in parallel; raise naming each failure."""
    started: list[tuple[ServiceSpec, processes.ProcessRecord]] = []
    for s in specs:
        if s.config_file is not None:
            write_atomic(s.config_file[0], s.config_file[1], mode=0o600)
        report(s.name, f"starting on port {s.port}")
        rec = processes.spawn(s.argv, s.full_env(), paths.log_file(s.name), cwd=paths.run)
        state.services[s.name] = ServiceRecord(
            s.name, s.kind.value, rec, s.fingerprint, s.port, s.model, time.time()
        )
        save_state(paths.state_file, state)
        started.append((s, rec))
    with ThreadPoolExecutor(max_workers=max(1, len(started))) as pool:
        results = list(
            pool.map(lambda sr: wait_ready(sr[0], sr[1], paths.log_file(sr[0].name)), started)
        )
    failures = [r for r in results if r]
    for (s, _), res in zip(started, results, strict=True):
        report(s.name, "ready" if not res else "failed")
    if failures:
        raise ServiceStartError(
            "\n".join(failures)
            + "\nServices that became ready are still running: fix the cause and run "
            "`mlx-stack up` again, or `mlx-stack down`."
        )


def _classify(
    specs: Sequence[ServiceSpec], state: StackState
) -> tuple[list[ServiceSpec], list[ServiceRecord]]:
    """Which specs must start, and which running records must first stop (changed ones)."""
    to_start: list[ServiceSpec] = []
    to_stop: list[ServiceRecord] = []
    for s in specs:
        rec = state.services.get(s.name)
        if rec is not None and processes.is_running(rec.process):
            if rec.fingerprint == s.fingerprint:
                continue
            to_stop.append(rec)
        to_start.append(s)
    return to_start, to_stop


def up(
    stack: Stack,
    paths: StatePaths,
    *,
    tier: str | None = None,
    report: Report = _quiet,
    stop_timeout_s: float = 10.0,
) -> Plan:
    """Start the stack (or one tier) and return once every started service is ready."""
    if not stack.tiers and stack.embeddings is None:
        raise ConfigError(stack.path or "stack", [
            "the stack has no chat tier and no embeddings tier: nothing to run; add a tier, "
            "or run `mlx-stack init --add-embeddings MODEL`"])
    key = read_key(paths.key_file(stack.proxy.key_file))
    plan = plan_services(stack, paths, key)
    names = [s.name for s in plan.model_servers]
    if tier is not None and tier not in names:
        raise ConfigError(
            stack.path or "stack",
            [
                f"no model server named {tier!r}{close_matches(tier, names)}; "
                f"the stack has: {', '.join(names)}"
            ],
        )
    paths.run.mkdir(parents=True, exist_ok=True)
    with stack_lock(paths.lock_file):
        state = load_state(paths.state_file)
        wanted = {s.name for s in plan.all}
        if tier is None:
            gone = [r for n, r in state.services.items() if n not in wanted]
            _stop(gone, state, paths, report, stop_timeout_s)
            servers = list(plan.model_servers)
        else:
            servers = [s for s in plan.model_servers if s.name == tier]
        to_start, to_stop = _classify(servers, state)
        for s in servers:
            if s not in to_start:
                report(s.name, "already running")
        proxy_start, proxy_stop = _classify([plan.proxy], state) if tier is None else ([], [])
        # A changed proxy stops first, so nothing is routed to a tier while it restarts.
        _stop(proxy_stop + to_stop, state, paths, report, stop_timeout_s)
        _check_ports(to_start + proxy_start)
        for s in to_start + proxy_start:
            stale = state.services.pop(s.name, None)
            if stale is not None:
                processes.stop_all([stale.process], stop_timeout_s)  # leftovers of a dead leader
        _start(to_start, state, paths, report)
        if tier is None:
            if proxy_start:
                _start(proxy_start, state, paths, report)
            else:
                report("proxy", "already running")
    return plan


def down(
    paths: StatePaths, *, tier: str | None = None, report: Report = _quiet, timeout_s: float = 10.0
) -> list[str]:
    """Stop the proxy first, then the model servers; return the names stopped."""
    with stack_lock(paths.lock_file):
        state = load_state(paths.state_file)
        if tier is not None:
            rec = state.services.get(tier)
            if rec is None:
                report(tier, "not running")
                return []
            _stop([rec], state, paths, report, timeout_s)
            return [tier]
        proxy = [r for r in state.services.values() if r.kind == ServiceKind.PROXY.value]
        rest = [r for r in state.services.values() if r.kind != ServiceKind.PROXY.value]
        names = [r.name for r in proxy + rest]
        _stop(proxy, state, paths, report, timeout_s)
        _stop(rest, state, paths, report, timeout_s)
        return names


def _status_one(
    name: str,
    kind: str,
    model: str | None,
    port: int,
    spec: ServiceSpec | None,
    rec: ServiceRecord | None,
    probe_timeout_s: float,
) -> ServiceStatus:
    if rec is None:
        return ServiceStatus(
            name, kind, ServiceState.STOPPED, model, port, None, None, None, None, "not started"
        )
    p = rec.process
    if not processes.is_running(p):
        return ServiceStatus(
            name,
            kind,
            ServiceState.EXITED,
            rec.model,
            rec.port,
            p.pid,
            None,
            None,
            None,
            f"process {p.pid} is gone; see `mlx-stack logs {name}`",
        )
    uptime = processes.uptime_s(p)
    rss = processes.rss_bytes(p)
    probe_spec = spec.probe if spec is not None else None
    if probe_spec is None:
        return ServiceStatus(
            name,
            kind,
            ServiceState.UNHEALTHY,
            rec.model,
            rec.port,
            p.pid,
            uptime,
            rss,
            None,
            "not in the stack file any more",
        )
    res = run_probe(probe_spec, timeout_s=probe_timeout_s)
    if res.ok:
        state, detail = ServiceState.READY, ""
    elif uptime < (spec.ready_timeout_s if spec else 0):
        state, detail = ServiceState.STARTING, res.detail
    else:
        state, detail = ServiceState.UNHEALTHY, res.detail
    if spec is not None and spec.fingerprint != rec.fingerprint:
        detail = (detail + "; " if detail else "") + "definition changed: run `mlx-stack up`"
    return ServiceStatus(
        name, kind, state, rec.model, rec.port, p.pid, uptime, rss, res.latency_ms, detail
    )


def status(
    paths: StatePaths, plan: Plan | None, probe_timeout_s: float = 5.0
) -> list[ServiceStatus]:
    """Every configured service and every recorded one, probed in parallel."""
    state = load_state(paths.state_file)
    rows: list[tuple[str, str, str | None, int, ServiceSpec | None, ServiceRecord | None]] = []
    seen: set[str] = set()
    for s in plan.all if plan else ():
        rows.append((s.name, s.kind.value, s.model, s.port, s, state.services.get(s.name)))
        seen.add(s.name)
    for name, rec in state.services.items():
        if name not in seen:
            rows.append((name, rec.kind, rec.model, rec.port, None, rec))
    with ThreadPoolExecutor(max_workers=max(1, len(rows))) as pool:
        return list(pool.map(lambda r: _status_one(*r, probe_timeout_s), rows))
