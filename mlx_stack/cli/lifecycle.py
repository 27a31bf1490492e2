"""What the CLI asks of a stack: bring it up, take it down, restart, report.

The work is done by the supervisor process (``supervisor/``); this module starts it, sends it
typed commands (``contract/commands.py``), and reads the snapshot it writes
(``contract/snapshot.py``). Checks that need no process (stack file, weights, ports, service
names) happen here first, so a bad stack or a typo starts nothing and reaches no supervisor.
The core never prints: progress goes to the ``report`` and ``watch`` callbacks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mlx_stack.config.plan import Plan, ServiceSpec
from mlx_stack.config.stackfile import Stack
from mlx_stack.contract.addressing import resolve
from mlx_stack.contract.commands import Action, Answer, Command, Mailbox, known_names_message
from mlx_stack.contract.snapshot import (
    RemoteStatus,
    ServiceSnapshot,
    SupervisorSnapshot,
    load_snapshot,
    supervisor_alive,
)
from mlx_stack.errors import (
    ConfigError,
    PortInUseError,
    ServiceStartError,
    StateError,
    UnknownServiceError,
)
from mlx_stack.logfiles import open_append, printable, tail
from mlx_stack.paths import StatePaths
from mlx_stack.ports import connect_host, holder, is_free
from mlx_stack.private import make_dirs
from mlx_stack.supervisor import processes
from mlx_stack.supervisor.lock import clean_leftovers_if_unlocked, lock_held
from mlx_stack.supervisor.states import ServiceState

Report = Callable[[str, str], None]
POLL_S = 0.2
COMMAND_TIMEOUT_S = 30.0
SUPERVISOR_START_S = 30.0
#: The supervisor's exit code when another one holds the stack's lock (StateError).
LOCK_HELD_EXIT = StateError.exit_code


@dataclass(frozen=True)
class LoadProgress:
    """Where one service is while `up` waits: what a progress display needs, nothing more.

    ``rss_bytes`` against ``weights_bytes`` is the loading measure: a model server's memory
    grows by the size of its weights as it reads them (the runtime adds a few hundred MB, so
    small models pass 100% early; the display caps it until the service answers).
    """

    name: str
    state: str
    elapsed_s: float
    rss_bytes: int | None
    weights_bytes: int | None
    ready: bool


Watch = Callable[[Sequence[LoadProgress]], None]


def _quiet(_service: str, _message: str) -> None:
    pass


@dataclass(frozen=True)
class ServiceStatus:
    """One row of `mlx-stack status` (its JSON form is documented in docs/status.md)."""

    name: str
    kind: str
    state: str
    model: str | None = None
    port: int = 0
    pid: int | None = None
    uptime_s: float | None = None
    rss_bytes: int | None = None
    probe_ms: float | None = None
    restarts: int = 0
    last_exit: str | None = None
    last_exit_log: tuple[str, ...] = ()
    detail: str = ""
    #: The tier a replica serves (``embeddings`` for ``embeddings-2``); "" for the others.
    tier: str = ""
    #: False while the supervisor drains this replica before replacing it.
    in_route: bool = True

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "model": self.model,
            "port": self.port,
            "pid": self.pid,
            "uptime_s": None if self.uptime_s is None else round(self.uptime_s, 1),
            "rss_mb": None if self.rss_bytes is None else round(self.rss_bytes / 2**20, 1),
            "probe_ms": None if self.probe_ms is None else round(self.probe_ms, 1),
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_exit_log": list(self.last_exit_log),
            "detail": self.detail,
            "tier": self.tier or None,
            "in_route": self.in_route,
        }


def _check_ports(specs: Sequence[ServiceSpec]) -> None:
    taken = [f"  - {s.name}: port {s.port} is held by {holder(s.port)}"
             for s in specs if not is_free(s.port, connect_host(s.host))]
    if taken:
        raise PortInUseError(
            "ports the stack needs are taken; nothing was started:\n"
            + "\n".join(taken)
            + "\nStop that program, or give the service another port in the stack file."
        )


def _live_snapshot(paths: StatePaths) -> SupervisorSnapshot | None:
    snap = load_snapshot(paths.state_file)
    return snap if supervisor_alive(snap) else None


def _snapshot_or_problem(paths: StatePaths) -> tuple[SupervisorSnapshot | None, str | None]:
    """For reporting commands (status, logs): an unreadable state file is a problem to show,
    not a reason to show nothing."""
    try:
        return load_snapshot(paths.state_file), None
    except StateError as exc:
        return None, str(exc)


def _supervisor_log_tail(paths: StatePaths) -> str:
    lines = tail(paths.log_file("supervisor"), 10)
    return "\n".join(f"      | {printable(x)}" for x in lines) or "      | (empty)"


def send(paths: StatePaths, action: Action, target: str | None = None,
         timeout_s: float = COMMAND_TIMEOUT_S) -> Answer:
    """Send one command to the running supervisor; its error answer becomes a StateError."""
    answer = Mailbox(paths.commands).send(Command.new(action, target), timeout_s)
    if answer.error is not None:
        raise StateError(answer.error.message)
    return answer


def check_service_name(name: str, known: Sequence[str]) -> None:
    """Refuse a name the stack does not have before anything is sent or started."""
    if name not in known:
        raise UnknownServiceError(known_names_message(name, known))


def known_services(paths: StatePaths, plan: Plan | None) -> list[str]:
    """The services a command may name: the running supervisor's, and the stack file's."""
    snap, _ = _snapshot_or_problem(paths)
    names = list(snap.addressable) if snap and supervisor_alive(snap) else []
    return names + [n for n in (plan.names if plan else ()) if n not in names]


def addressed(paths: StatePaths, plan: Plan | None, name: str) -> tuple[str, ...]:
    """The services ``name`` addresses: every replica for a tier with replicas (from the
    running supervisor, else the stack file), the first alone for ``<tier>-1``."""
    snap, _ = _snapshot_or_problem(paths)
    groups = snap.groups if snap and supervisor_alive(snap) else {}
    return resolve(name, groups or (plan.groups if plan else {}))


def _spawn_supervisor(paths: StatePaths, only: Sequence[str] | None,
                      report: Report) -> int | None:
    """Start the supervisor; its pid, or None if another one won the race for the lock."""
    argv = processes.python_module("mlx_stack.supervisor")
    for name in only or ():
        argv += ["--only", name]
    env = {**os.environ, **processes.SAFE_PATH_ENV, "MLX_STACK_HOME": str(paths.home)}
    log, warning = open_append(paths.log_file("supervisor"))
    if warning:
        report("supervisor", f"warning: {warning}")
    with log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True, close_fds=True, cwd=paths.run)
    deadline = time.monotonic() + SUPERVISOR_START_S
    while time.monotonic() < deadline:
        snap = load_snapshot(paths.state_file)
        if snap is not None and snap.pid == proc.pid:
            return proc.pid
        if proc.poll() is not None:
            if proc.returncode == LOCK_HELD_EXIT and lock_held(paths.lock_file):
                return None
            raise ServiceStartError(
                f"the supervisor exited at start (code {proc.returncode}):\n"
                + _supervisor_log_tail(paths)
            )
        time.sleep(POLL_S)
    raise ServiceStartError(
        f"the supervisor did not start within {SUPERVISOR_START_S:.0f} s:\n"
        + _supervisor_log_tail(paths)
    )


def _wait_for_supervisor(paths: StatePaths) -> SupervisorSnapshot:
    """Another `up` started a supervisor a moment ago: wait for its first snapshot."""
    deadline = time.monotonic() + SUPERVISOR_START_S
    while time.monotonic() < deadline:
        snap = _live_snapshot(paths)
        if snap is not None:
            return snap
        time.sleep(POLL_S)
    raise ServiceStartError("another supervisor holds the stack's lock but wrote no state; "
                            "see `mlx-stack logs supervisor`")


def _failure_text(s: ServiceSnapshot) -> str:
    lines = s.last_exit.log_tail if s.last_exit else ()
    shown = "\n".join(f"      | {printable(x)}" for x in lines) or "      | (no output)"
    how = s.last_exit.describe() if s.last_exit else s.reason
    return f"{s.name}: {s.state}: {s.reason or how}\n    last lines of its log:\n{shown}"


def wait_ready(
    paths: StatePaths,
    names: Sequence[str],
    report: Report,
    since: float,
    timeout_s: float,
    *,
    fingerprints: dict[str, str] | None = None,
    fresh: bool = False,
    watch: Watch | None = None,
    sizes: dict[str, int | None] | None = None,
) -> None:
    """Follow the supervisor's snapshots until every named service is ready, or one fails.

    A snapshot written before the supervisor applied our command may still show the old
    process as ready: with ``fingerprints``, a service counts only once it runs that
    definition; with ``fresh``, only once its process started after ``since``. ``watch`` is
    called on every poll with each service's progress (``sizes``: the weights each one loads).
    """
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snap = _live_snapshot(paths)
        if snap is None:
            raise ServiceStartError("the supervisor is gone:\n" + _supervisor_log_tail(paths))
        failures, ready = [], 0
        progress: list[LoadProgress] = []
        now = time.time()
        for name in names:
            s = snap.service(name)
            if s is None:
                progress.append(LoadProgress(name, "waiting", now - since, None, None, False))
                continue
            if seen.get(name) != s.state:
                seen[name] = s.state
                report(name, s.state + (f" ({s.reason})" if s.reason else ""))
            wanted_fp = (fingerprints or {}).get(name)
            current = wanted_fp in (None, s.fingerprint) and (
                not fresh or (s.started_at is not None and s.started_at >= since))
            is_ready = s.state == ServiceState.READY.value and current
            if watch is not None:
                started = s.started_at if s.started_at and s.process else None
                progress.append(LoadProgress(
                    name,
                    s.state,
                    now - (started or since),
                    processes.rss_bytes(s.process) if s.process else None,
                    (sizes or {}).get(name),
                    is_ready,
                ))
            if is_ready:
                ready += 1
            elif s.state == ServiceState.FATAL.value or (
                s.state == ServiceState.BACKOFF.value
                and s.last_exit is not None
                and not s.last_exit.expected
                and s.last_exit.at >= since
            ):
                failures.append(_failure_text(s))
        if watch is not None:
            watch(progress)
        if failures:
            raise ServiceStartError(
                "\n".join(failures)
                + "\nThe supervisor keeps running the rest (and retries services in backoff): "
                "`mlx-stack status`, `mlx-stack logs SERVICE`, `mlx-stack down`."
            )
        if ready == len(names):
            return
        time.sleep(POLL_S)
    raise ServiceStartError(
        f"not ready after {timeout_s:.0f} s: " + ", ".join(f"{n}={seen.get(n, '?')}" for n in names)
    )


@dataclass(frozen=True)
class UpResult:
    plan: Plan
    #: Services whose process this `up` started (none for an `up` of a running stack).
    started: tuple[str, ...]


def up(
    stack: Stack,
    plan: Plan,
    paths: StatePaths,
    *,
    tier: str | None = None,
    report: Report = _quiet,
    watch: Watch | None = None,
) -> UpResult:
    """Start the stack (or one model server) under the supervisor; return once ready."""
    plan.require_complete()
    names = [*(s.name for s in plan.model_servers), *plan.aliases]
    if tier is not None and tier not in names:
        raise ConfigError(stack.path or "stack", [known_names_message(tier, names)])
    members = list(resolve(tier, plan.groups)) if tier else []
    since = time.time()
    make_dirs(paths.run)
    snap = _live_snapshot(paths)
    if snap is None:
        # Leftovers of a dead supervisor are ended by the new one, under the lock.
        wanted = [s for s in plan.all if tier is None or s.name in members]
        _check_ports(wanted)
        pid = _spawn_supervisor(paths, members, report)
        if pid is None:
            snap = _wait_for_supervisor(paths)
        else:
            report("supervisor", f"started (pid {pid})")
    if snap is not None:
        try:
            send(paths, Action.RELOAD)
        except StateError as exc:
            raise ServiceStartError(f"the supervisor refused the stack file: {exc}") from None
        send(paths, Action.START, tier)
    targets = members or [s.name for s in plan.all]
    limit = stack.watchdog.start_timeout_max_s + 60
    wait_ready(paths, targets, report, since, limit,
               fingerprints={s.name: s.fingerprint for s in plan.all},
               watch=watch, sizes={s.name: s.weights_bytes for s in plan.all})
    snap = _live_snapshot(paths)
    started = tuple(
        s.name for s in (snap.services if snap else ())
        if s.process is not None and s.started_at is not None and s.started_at >= since
    )
    return UpResult(plan, started)


def restart(
    paths: StatePaths,
    service: str | None,
    report: Report = _quiet,
    timeout_s: float = 1860.0,
    *,
    watch: Watch | None = None,
    plan: Plan | None = None,
) -> list[str]:
    """Restart one service (or all), this also clears FATAL; return the names restarted."""
    snap = _live_snapshot(paths)
    if snap is None:
        raise StateError("no supervisor is running this stack; `mlx-stack up` starts it")
    if service is not None:
        check_service_name(service, snap.addressable)
    since = time.time()
    send(paths, Action.RESTART, service)
    # A tier with replicas is replaced one at a time: wait for every replica's new process.
    names = (list(snap.members(service)) if service
             else [s.name for s in snap.services if s.wanted])
    sizes = {s.name: s.weights_bytes for s in plan.all} if plan else None
    wait_ready(paths, names, report, since, timeout_s, fresh=True, watch=watch, sizes=sizes)
    return names


def down(
    paths: StatePaths,
    *,
    tier: str | None = None,
    plan: Plan | None = None,
    report: Report = _quiet,
    timeout_s: float = 60.0,
) -> list[str]:
    """Stop one service, or the supervisor and with it the whole stack (proxy first)."""
    snap = _live_snapshot(paths)
    if tier is not None:
        check_service_name(tier, known_services(paths, plan))
        if snap is None or not any(snap.service(n) for n in snap.members(tier)):
            report(tier, "not running")
            return []
        members = [n for n in snap.members(tier) if snap.service(n) is not None]
        send(paths, Action.STOP, tier)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = _live_snapshot(paths)
            left = [n for n in members if now is not None and (s := now.service(n)) is not None
                    and s.state != ServiceState.STOPPED.value]
            if not left:
                for n in members:
                    report(n, "stopped")
                return members
            time.sleep(POLL_S)
        raise StateError(f"{tier} did not stop within {timeout_s:.0f} s")
    stopped: list[str] = []
    if snap is not None:
        running = [s.name for s in snap.services if s.process is not None]
        os.kill(snap.pid, signal.SIGTERM)
        report("supervisor", "stopping (proxy first, then the model servers)")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and processes.is_running(snap.record):
            time.sleep(POLL_S)
        if processes.is_running(snap.record):
            processes.stop_all([snap.record], 1.0)
            report("supervisor", f"killed after {timeout_s:.0f} s")
        stopped = running
    for name in clean_leftovers_if_unlocked(paths.lock_file, paths.state_file):
        if name not in stopped:
            stopped.append(name)
    for name in stopped:
        report(name, "stopped")
    return stopped


def status(paths: StatePaths, plan: Plan | None) -> list[ServiceStatus]:
    """Every configured service and every one the supervisor knows, as it last saw them."""
    snap, problem = _snapshot_or_problem(paths)
    alive = supervisor_alive(snap)
    rows: list[ServiceStatus] = []
    known = {s.name: s for s in snap.services} if snap else {}
    names = [s.name for s in plan.all] if plan else []
    names += [n for n in known if n not in names]
    specs = {s.name: s for s in plan.all} if plan else {}
    groups = plan.groups if plan else (snap.groups if snap else {})
    now = time.time()
    for name in names:
        s = known.get(name)
        spec = specs.get(name)
        common = {
            "name": name,
            "kind": spec.kind.value if spec else (s.kind if s else "chat"),
            "model": spec.model if spec else (s.model if s else None),
            "port": spec.port if spec else (s.port if s else 0),
            "restarts": s.restarts if s else 0,
            "last_exit": s.last_exit.describe() if s and s.last_exit else None,
            "last_exit_log": s.last_exit.log_tail if s and s.last_exit else (),
            "tier": spec.group if spec and spec.group in groups else "",
        }
        if s is None or not alive:
            leftover = s is not None and s.process is not None and processes.is_running(s.process)
            detail = ("left behind by a supervisor that died; `mlx-stack down` ends it"
                      if leftover else "supervisor not running" if s is not None
                      else "unknown: the supervisor's state file is unreadable" if problem
                      else "not started")
            pid = s.process.pid if leftover and s is not None and s.process else None
            rows.append(ServiceStatus(state=ServiceState.STOPPED.value, pid=pid, detail=detail,
                                      **common))
            continue
        pid = s.process.pid if s.process else None
        details = [s.reason] if s.reason else []
        if spec is not None and s.fingerprint and spec.fingerprint != s.fingerprint:
            details.append("stack file changed: being applied")
        if s.fault:
            details.append(f"{s.fault} (see `mlx-stack logs supervisor`)")
        if not s.in_route:
            details.append("out of the route: finishing its requests before its replacement")
        rows.append(ServiceStatus(
            state=s.state,
            pid=pid,
            uptime_s=now - s.started_at if s.started_at and pid else None,
            rss_bytes=processes.rss_bytes(s.process) if s.process else None,
            probe_ms=s.last_probe_ms,
            detail="; ".join(details),
            in_route=s.in_route,
            **common,
        ))
    return rows + _endpoint_rows(plan)


def _endpoint_rows(plan: Plan | None) -> list[ServiceStatus]:
    """``url:`` tiers, asked now (``endpoints.py``): no supervisor runs them."""
    from mlx_stack.cli.endpoints import probe_endpoints

    return [ServiceStatus(name=e.name, kind=e.kind, state=e.state, model=e.model, port=e.port,
                          probe_ms=e.latency_ms, detail=e.detail)
            for e in probe_endpoints(plan.endpoints if plan else ())]


def supervisor_warnings(paths: StatePaths) -> list[str]:
    """Problems the running supervisor worked around recently (failed writes...)."""
    snap, problem = _snapshot_or_problem(paths)
    if problem:
        return [problem]
    return list(snap.warnings) if snap and supervisor_alive(snap) else []


def remote_statuses(paths: StatePaths) -> tuple[RemoteStatus, ...]:
    """The remote stacks as the running supervisor last probed them (none if it is down)."""
    snap, _ = _snapshot_or_problem(paths)
    return snap.remotes if snap and supervisor_alive(snap) else ()


def stack_running(paths: StatePaths) -> bool:
    return _live_snapshot(paths) is not None


def stack_problem(paths: StatePaths) -> str | None:
    """The supervisor's view of an invalid stack file edit, if any."""
    snap, _ = _snapshot_or_problem(paths)
    return snap.stack_error if snap and supervisor_alive(snap) else None


def run_foreground(plan: Plan, paths: StatePaths, tier: str | None = None) -> int:
    """Run the supervisor in this process (for launchd and systemd)."""
    from mlx_stack.supervisor.main import main

    plan.require_complete()
    if _live_snapshot(paths) is not None:
        raise StateError("a supervisor already runs this stack; `mlx-stack down` first")
    return main([arg for name in (resolve(tier, plan.groups) if tier else ())
                 for arg in ("--only", name)])
