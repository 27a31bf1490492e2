"""What the CLI asks of a stack: bring it up, take it down, restart, report.

The work is done by the supervisor process (``watchdog.py``); this module starts it, sends it
commands (``control.py``), and reads the snapshot it writes (``state.py``). Checks that need no
process (stack file, weights, ports) happen here first, so a bad stack starts nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mlx_stack import control, ports, processes
from mlx_stack.errors import ConfigError, PortInUseError, ServiceStartError, StateError
from mlx_stack.logs import tail
from mlx_stack.paths import StatePaths
from mlx_stack.proxykey import read_key
from mlx_stack.schema import close_matches
from mlx_stack.services import Plan, ServiceSpec, plan_services
from mlx_stack.stackfile import Stack
from mlx_stack.state import (
    ServiceSnapshot,
    SupervisorSnapshot,
    clean_leftovers,
    load_snapshot,
    supervisor_alive,
)
from mlx_stack.states import ServiceState

Report = Callable[[str, str], None]
POLL_S = 0.2


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
SUPERVISOR_START_S = 30.0


def _quiet(_service: str, _message: str) -> None:
    pass


@dataclass(frozen=True)
class ServiceStatus:
    """One row of `mlx-stack status` (its JSON form is documented in docs/status.md)."""

    name: str
    kind: str
    state: str
    model: str | None
    port: int
    pid: int | None
    uptime_s: float | None
    rss_bytes: int | None
    probe_ms: float | None
    restarts: int
    last_exit: str | None
    last_exit_log: tuple[str, ...]
    detail: str

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
        }


def plan_for(stack: Stack, paths: StatePaths) -> Plan:
    if not stack.tiers and stack.embeddings is None:
        raise ConfigError(
            stack.path or "stack",
            [
                "the stack has no chat tier and no embeddings tier: nothing to run; add a tier, "
                "or run `mlx-stack init --add-embeddings MODEL`"
            ],
        )
    return plan_services(stack, paths, read_key(paths.key_file(stack.proxy.key_file)))


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


def _live_snapshot(paths: StatePaths) -> SupervisorSnapshot | None:
    snap = load_snapshot(paths.state_file)
    return snap if supervisor_alive(snap) else None


def _supervisor_log_tail(paths: StatePaths) -> str:
    lines = tail(paths.log_file("supervisor"), 10)
    return "\n".join(f"      | {x}" for x in lines) or "      | (empty)"


def _spawn_supervisor(paths: StatePaths, only: str | None) -> int:
    argv = [sys.executable, "-m", "mlx_stack.watchdog"] + (["--only", only] if only else [])
    paths.logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLX_STACK_HOME": str(paths.home)}
    with open(paths.log_file("supervisor"), "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            close_fds=True,
            cwd=paths.run,
        )
    deadline = time.monotonic() + SUPERVISOR_START_S
    while time.monotonic() < deadline:
        snap = load_snapshot(paths.state_file)
        if snap is not None and snap.pid == proc.pid:
            return proc.pid
        if proc.poll() is not None:
            raise ServiceStartError(
                f"the supervisor exited at start (code {proc.returncode}):\n"
                + _supervisor_log_tail(paths)
            )
        time.sleep(POLL_S)
    raise ServiceStartError(
        "the supervisor did not start within "
        f"{SUPERVISOR_START_S:.0f} s:\n" + _supervisor_log_tail(paths)
    )


def _failure_text(s: ServiceSnapshot) -> str:
    lines = s.last_exit.log_tail if s.last_exit else ()
    shown = "\n".join(f"      | {x}" for x in lines) or "      | (no output)"
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
    paths: StatePaths,
    *,
    tier: str | None = None,
    report: Report = _quiet,
    watch: Watch | None = None,
) -> UpResult:
    """Start the stack (or one model server) under the supervisor; return once ready."""
    plan = plan_for(stack, paths).require_complete()
    names = [s.name for s in plan.model_servers]
    if tier is not None and tier not in names:
        raise ConfigError(
            stack.path or "stack",
            [
                f"no model server named {tier!r}{close_matches(tier, names)}; "
                f"the stack has: {', '.join(names)}"
            ],
        )
    since = time.time()
    paths.run.mkdir(parents=True, exist_ok=True)
    snap = _live_snapshot(paths)
    if snap is None:
        for name in clean_leftovers(paths.state_file):
            report(name, "ended (left behind by a supervisor that died)")
        wanted = [s for s in plan.all if tier is None or s.name == tier]
        _check_ports(wanted)
        pid = _spawn_supervisor(paths, tier)
        report("supervisor", f"started (pid {pid})")
    else:
        answer = control.send(paths, "reload")
        if answer.startswith("error"):
            raise ServiceStartError(f"the supervisor refused the stack file: {answer}")
        control.send(paths, "start", tier)
    targets = [tier] if tier else [s.name for s in plan.all]
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
    since = time.time()
    answer = control.send(paths, "restart", service)
    if answer.startswith("error"):
        raise StateError(answer.removeprefix("error: "))
    names = [service] if service else [s.name for s in snap.services if s.wanted]
    sizes = {s.name: s.weights_bytes for s in plan.all} if plan else None
    wait_ready(paths, names, report, since, timeout_s, fresh=True, watch=watch, sizes=sizes)
    return names


def down(
    paths: StatePaths, *, tier: str | None = None, report: Report = _quiet, timeout_s: float = 60.0
) -> list[str]:
    """Stop one service, or the supervisor and with it the whole stack (proxy first)."""
    snap = _live_snapshot(paths)
    if tier is not None:
        if snap is None or snap.service(tier) is None:
            report(tier, "not running")
            return []
        answer = control.send(paths, "stop", tier)
        if answer.startswith("error"):
            raise StateError(answer.removeprefix("error: "))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = _live_snapshot(paths)
            s = now.service(tier) if now else None
            if s is None or s.state == ServiceState.STOPPED.value:
                report(tier, "stopped")
                return [tier]
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
    for name in clean_leftovers(paths.state_file):
        if name not in stopped:
            stopped.append(name)
    for name in stopped:
        report(name, "stopped")
    return stopped


def status(paths: StatePaths, plan: Plan | None) -> list[ServiceStatus]:
    """Every configured service and every one the supervisor knows, as it last saw them."""
    snap = load_snapshot(paths.state_file)
    alive = supervisor_alive(snap)
    rows: list[ServiceStatus] = []
    known = {s.name: s for s in snap.services} if snap else {}
    names = [s.name for s in plan.all] if plan else []
    names += [n for n in known if n not in names]
    specs = {s.name: s for s in plan.all} if plan else {}
    now = time.time()
    for name in names:
        s = known.get(name)
        spec = specs.get(name)
        kind = spec.kind.value if spec else (s.kind if s else "chat")
        model = spec.model if spec else (s.model if s else None)
        port = spec.port if spec else (s.port if s else 0)
        if s is None or not alive:
            detail = "supervisor not running" if s is not None else "not started"
            leftover = s is not None and s.process is not None and processes.is_running(s.process)
            if leftover:
                detail = "left behind by a supervisor that died; `mlx-stack down` ends it"
            rows.append(
                ServiceStatus(
                    name,
                    kind,
                    ServiceState.STOPPED.value,
                    model,
                    port,
                    s.process.pid if leftover and s and s.process else None,
                    None,
                    None,
                    None,
                    s.restarts if s else 0,
                    s.last_exit.describe() if s and s.last_exit else None,
                    s.last_exit.log_tail if s and s.last_exit else (),
                    detail,
                )
            )
            continue
        pid = s.process.pid if s.process else None
        detail = s.reason
        if spec is not None and s.fingerprint and spec.fingerprint != s.fingerprint:
            detail = (detail + "; " if detail else "") + "stack file changed: being applied"
        rows.append(
            ServiceStatus(
                name,
                kind,
                s.state,
                model,
                port,
                pid,
                now - s.started_at if s.started_at and pid else None,
                processes.rss_bytes(s.process) if s.process else None,
                s.last_probe_ms,
                s.restarts,
                s.last_exit.describe() if s.last_exit else None,
                s.last_exit.log_tail if s.last_exit else (),
                detail,
            )
        )
    return rows


def stack_running(paths: StatePaths) -> bool:
    return _live_snapshot(paths) is not None


def stack_problem(paths: StatePaths) -> str | None:
    """The supervisor's view of an invalid stack file edit, if any."""
    snap = _live_snapshot(paths)
    return snap.stack_error if snap else None


def run_foreground(stack: Stack, paths: StatePaths, tier: str | None = None) -> int:
    """Run the supervisor in this process (for launchd and systemd)."""
    from mlx_stack import watchdog

    plan_for(stack, paths).require_complete()
    if _live_snapshot(paths) is not None:
        raise StateError("a supervisor already runs this stack; `mlx-stack down` first")
    clean_leftovers(paths.state_file)
    return watchdog.main(["--only", tier] if tier else [])
