"""The supervisor: one process per stack that owns every service as a real child.

It starts the model servers, then the proxy once a model server is ready; probes each service
through its real API; restarts on exit and on hang with capped exponential backoff; gives up
(FATAL) on crash loops and on causes a restart cannot fix; rotates logs; applies stack file
edits; and stops everything, proxy first, on SIGTERM.

One thread owns all state: the loop in ``Supervisor.run``. Probes run in a pool and post their
results back; commands arrive as files in ``run/commands`` (see ``control.py``); the stack file
watcher only sets a flag. Every state change goes through ``_set_state``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from mlx_stack import control, ports, processes
from mlx_stack.errors import MlxStackError
from mlx_stack.logs import tail
from mlx_stack.logsink import RotatingLog
from mlx_stack.paths import StatePaths
from mlx_stack.policy import (
    WatchSettings,
    backoff_delay,
    exit_is_unfixable,
    is_crash_loop,
    should_reset_failures,
    start_deadline,
)
from mlx_stack.probes import ProbeResult, run_probe
from mlx_stack.services import Plan, ServiceKind, ServiceSpec
from mlx_stack.state import (
    ExitInfo,
    ServiceSnapshot,
    SupervisorSnapshot,
    clean_leftovers,
    save_snapshot,
    supervisor_lock,
)
from mlx_stack.states import ServiceState, check_transition

S = ServiceState
TICK_S = 0.1
LOG_TAIL_ON_EXIT = 15
PROGRESS_CHECK_S = 1.0

PlanLoader = Callable[[], tuple[Plan, WatchSettings]]


@dataclass
class Managed:
    """One service under supervision: its spec and everything the loop knows about it."""

    name: str
    spec: ServiceSpec | None
    unavailable: str = ""  # why no spec could be built (weights missing): FATAL at start
    wanted: bool = True
    state: ServiceState = S.STOPPED
    reason: str = ""
    child: processes.Child | None = None
    record: processes.ProcessRecord | None = None
    log: RotatingLog | None = None
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
    probe_failures: int = 0
    probe: Future[ProbeResult] | None = None
    next_probe_at: float = 0.0
    last_probe_ms: float | None = None
    last_exit: ExitInfo | None = None
    stop_deadline: float = 0.0
    killed: bool = False
    after_stop: ServiceState = S.STOPPED
    after_stop_reason: str = ""
    stop_is_failure: bool = False  # the stop under way is a failure (hang, failed start)

    @property
    def kind(self) -> str:
        return self.spec.kind.value if self.spec else "chat"


class Supervisor:
    """Runs one stack until told to stop. Clock, spawner and prober are injectable for tests."""

    def __init__(
        self,
        paths: StatePaths,
        load_plan: PlanLoader,
        *,
        only: set[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        prober: Callable[..., ProbeResult] = run_probe,
    ) -> None:
        self.paths = paths
        self.load_plan = load_plan
        self.clock = clock
        self.prober = prober
        self.only = only
        self.services: dict[str, Managed] = {}
        self.settings = WatchSettings()
        self.stack_error: str | None = None
        self.shutting_down = False
        self.reload_requested = threading.Event()
        self.stop_requested = threading.Event()
        self.probe_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")
        self.dirty = True
        self.next_snapshot_at = 0.0
        self.started_wall = time.time()
        # Children hold the read end; only this process holds the write end, so they see
        # end-of-file exactly when the supervisor is gone (see childguard.py).
        self.lifeline, self._lifeline_w = os.pipe()

    # ----- state -----------------------------------------------------------------------

    def _set_state(self, m: Managed, new: ServiceState, reason: str = "") -> None:
        """The one place a service's state changes (checked against the transition table)."""
        if m.state is new and m.reason == reason:
            return
        if m.state is not new:
            check_transition(m.state, new)
            if m.log is not None:
                m.log.mark(
                    f"{m.name}: {m.state.value} -> {new.value}" + (f" ({reason})" if reason else "")
                )
        m.state = new
        m.reason = reason
        self.dirty = True

    def _log_for(self, m: Managed) -> RotatingLog:
        if m.log is None:
            m.log = RotatingLog(
                self.paths.log_file(m.name), self.settings.log_max_bytes, self.settings.log_backups
            )
        return m.log

    # ----- plan and reload ---------------------------------------------------------------

    def apply_plan(self, plan: Plan, settings: WatchSettings) -> None:
        """Make the supervised set match ``plan``: add, restart changed, stop removed."""
        self.settings = settings
        specs: dict[str, ServiceSpec | None] = {s.name: s for s in plan.all}
        for name in plan.missing:
            specs[name] = None
        for name in list(self.services):
            if name not in specs:
                m = self.services[name]
                m.wanted = False
                self._stop(m, S.STOPPED, "removed from the stack file")
        for name, spec in specs.items():
            m = self.services.get(name)
            if m is None:
                m = Managed(name, spec, plan.missing.get(name, ""))
                m.wanted = (
                    self.only is None
                    or name in self.only
                    or (spec is not None and spec.kind is ServiceKind.PROXY and self.only is None)
                )
                self.services[name] = m
                continue
            m.unavailable = plan.missing.get(name, "")
            if spec is None or m.spec is None or spec.fingerprint != m.spec.fingerprint:
                m.spec = spec
                if m.state.running:
                    self._stop(m, S.BACKOFF, "definition changed")
                    m.next_start_at = 0.0
                    m.consecutive_failures = 0
                elif m.state in (S.FATAL, S.BACKOFF):
                    m.consecutive_failures = 0
                    m.restart_times.clear()
                    m.next_start_at = 0.0
        self.dirty = True

    def reload(self) -> None:
        """Re-read the stack file; an invalid edit leaves everything running as it is."""
        try:
            plan, settings = self.load_plan()
        except MlxStackError as exc:
            self.stack_error = str(exc)
            self.dirty = True
            return
        self.stack_error = None
        self.apply_plan(plan, settings)

    # ----- processes ---------------------------------------------------------------------

    def _start(self, m: Managed, now: float) -> None:
        log = self._log_for(m)
        if m.spec is None:
            self._set_state(m, S.FATAL, m.unavailable or "no definition")
            return
        s = m.spec
        if s.config_file is not None:
            from mlx_stack.atomic import write_atomic

            write_atomic(s.config_file[0], s.config_file[1], mode=0o600)
        check_host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
        if not ports.is_free(s.port, check_host):
            self._set_state(
                m,
                S.FATAL,
                f"port {s.port} is held by {ports.holder(s.port)}; "
                "stop that program or change the port, then "
                f"`mlx-stack restart {m.name}`",
            )
            return
        log.mark(f"starting {m.name}: {' '.join(s.argv)}")
        try:
            m.child = processes.start_child(s.argv, s.full_env(), self.paths.run, log,
                                            lifeline=self.lifeline)
        except OSError as exc:
            self._set_state(m, S.FATAL, f"cannot run {s.argv[0]}: {exc.strerror or exc}")
            return
        m.record = m.child.record
        m.started_at = m.last_progress_at = now
        m.started_wall = time.time()
        m.progress_mark = (0, 0)
        m.next_progress_check = now
        m.ready_since = None
        m.probe_failures = 0
        m.probe = None
        m.next_probe_at = now + 0.2
        m.killed = False
        self._set_state(m, S.STARTING)

    def _signal(self, m: Managed, sig: int) -> None:
        if m.child is not None:
            m.child.signal_group(sig)

    def _stop(self, m: Managed, then: ServiceState, reason: str, *, kill: bool = False) -> None:
        """Signal the whole group (SIGKILL at once if ``kill``); the loop finishes the stop."""
        m.after_stop, m.after_stop_reason = then, reason
        if m.state is S.STOPPING:
            return
        if not m.state.running or m.child is None:
            if then is S.STOPPED and m.state in (S.BACKOFF, S.FATAL):
                self._set_state(m, S.STOPPED, reason)
            return
        self._signal(m, signal.SIGKILL if kill else signal.SIGTERM)
        m.killed = kill
        m.stop_deadline = self.clock() + self.settings.stop_timeout_s
        if m.probe is not None:
            m.probe.cancel()
            m.probe = None
        self._set_state(m, S.STOPPING, reason)

    def _reap(self, m: Managed, now: float) -> int | None:
        """Return the exit code if the service's process has ended (and clean its group)."""
        if m.child is None:
            return None
        code = m.child.poll()
        if code is None:
            return None
        m.child.finish()
        m.child = None
        return code

    def _on_exit(self, m: Managed, code: int, now: float) -> None:
        was = m.state
        lines = tail(self.paths.log_file(m.name), LOG_TAIL_ON_EXIT)
        expected = was is S.STOPPING and not m.stop_is_failure
        m.last_exit = ExitInfo.from_returncode(code, time.time(), lines, expected)
        m.stop_is_failure = False
        if was is S.STOPPING:
            m.record = None
            target = m.after_stop
            if target is S.BACKOFF and not m.wanted:
                target = S.STOPPED
            self._set_state(m, target, m.after_stop_reason)
            return
        m.record = None
        m.ready_since = None
        during_start = was is S.STARTING
        if exit_is_unfixable(code, during_start):
            self._set_state(
                m,
                S.FATAL,
                f"exited during start with {m.last_exit.describe()}, "
                "which restarting cannot fix; see its log, fix, then "
                f"`mlx-stack restart {m.name}`",
            )
            return
        self._fail(m, now, f"{m.last_exit.describe()}")

    def _fail(self, m: Managed, now: float, why: str) -> None:
        """Count a failure: back off before the next start, or give up on a crash loop."""
        m.consecutive_failures += 1
        m.restart_times.append(now)
        m.restarts += 1
        if is_crash_loop(m.restart_times, now, self.settings):
            n, w = self.settings.crashloop_restarts, self.settings.crashloop_window_s
            self._set_state(
                m,
                S.FATAL,
                f"crash loop: {n} failures within {w:.0f} s; last: {why}; "
                f"`mlx-stack restart {m.name}` tries again",
            )
            return
        delay = backoff_delay(m.consecutive_failures, self.settings)
        m.next_start_at = now + delay
        self._set_state(m, S.BACKOFF, f"{why}; restarting in {delay:.1f} s")

    # ----- the loop ----------------------------------------------------------------------

    def _progressing(self, m: Managed, now: float) -> None:
        """Note progress of a loading service: its log grows or its memory grows."""
        if now < m.next_progress_check or m.record is None:
            return
        m.next_progress_check = now + PROGRESS_CHECK_S
        try:
            size = self.paths.log_file(m.name).stat().st_size
        except OSError:
            size = 0
        rss = processes.rss_bytes(m.record) or 0
        old_size, old_rss = m.progress_mark
        if size != old_size or rss > old_rss + 8 * 1024 * 1024:
            m.last_progress_at = now
            m.progress_mark = (size, max(rss, old_rss))

    def _probe_due(self, m: Managed, now: float) -> None:
        assert m.spec is not None
        if m.probe is None and now >= m.next_probe_at:
            timeout = self.settings.probe_timeout_s
            m.probe = self.probe_pool.submit(self.prober, m.spec.probe, timeout)

    def _probe_result(self, m: Managed, now: float) -> ProbeResult | None:
        if m.probe is None or not m.probe.done():
            return None
        fut, m.probe = m.probe, None
        try:
            res = fut.result()
        except Exception as exc:  # a prober bug must not stop the loop
            res = ProbeResult(False, 0.0, f"probe error: {exc}")
        m.last_probe_ms = res.latency_ms
        interval = self.settings.probe_interval_s if m.state is not S.STARTING else 0.5
        m.next_probe_at = now + interval
        self.dirty = True
        return res

    def _step(self, m: Managed, now: float) -> None:
        code = self._reap(m, now) if m.state.running else None
        if code is not None:
            self._on_exit(m, code, now)
            return
        st = m.state
        if st is S.STOPPING:
            if now >= m.stop_deadline and not m.killed:
                self._signal(m, signal.SIGKILL)
                m.killed = True
                m.stop_deadline = now + 5
            return
        if st is S.STOPPED or st is S.FATAL:
            return
        if st is S.BACKOFF:
            if m.wanted and now >= m.next_start_at and self._may_start(m):
                self._start(m, now)
            return
        self._probe_due(m, now)
        res = self._probe_result(m, now)
        if st is S.STARTING:
            self._progressing(m, now)
            if res is not None and res.ok:
                m.ready_since = now
                m.probe_failures = 0
                self._set_state(m, S.READY)
            elif now >= start_deadline(m.started_at, m.last_progress_at, self.settings):
                why = f"not ready after {now - m.started_at:.0f} s" + (
                    f" ({res.detail})" if res is not None and res.detail else ""
                )
                self._stop(m, S.BACKOFF, why, kill=True)
                self._fail_after_stop(m, now, why)
            return
        if should_reset_failures(m.ready_since, now, self.settings):
            m.consecutive_failures = 0
        if res is None:
            return
        if res.ok:
            m.probe_failures = 0
            if st is S.UNHEALTHY:
                m.ready_since = now
                self._set_state(m, S.READY)
            return
        m.probe_failures += 1
        n = self.settings.failure_threshold
        if m.probe_failures >= n:
            why = f"hung: {m.probe_failures} failed probes in a row ({res.detail})"
            self._stop(m, S.BACKOFF, why, kill=True)
            self._fail_after_stop(m, now, why)
        else:
            self._set_state(m, S.UNHEALTHY, f"probe failed {m.probe_failures}/{n}: {res.detail}")

    def _fail_after_stop(self, m: Managed, now: float, why: str) -> None:
        """Account the failure now; the stop completes into BACKOFF (or FATAL) when it exits."""
        m.stop_is_failure = True
        m.consecutive_failures += 1
        m.restart_times.append(now)
        m.restarts += 1
        if is_crash_loop(m.restart_times, now, self.settings):
            m.after_stop = S.FATAL
            m.after_stop_reason = f"crash loop; last: {why}; `mlx-stack restart {m.name}`"
        else:
            delay = backoff_delay(m.consecutive_failures, self.settings)
            m.next_start_at = now + delay
            m.after_stop_reason = f"{why}; restarting in {delay:.1f} s"

    def _may_start(self, m: Managed) -> bool:
        """The proxy waits until at least one model server is ready."""
        if m.spec is None or m.spec.kind is not ServiceKind.PROXY:
            return True
        return any(
            o.state is S.READY
            for o in self.services.values()
            if o.spec is not None and o.spec.kind is not ServiceKind.PROXY
        )

    def _start_wanted(self, now: float) -> None:
        for m in self.services.values():
            if m.wanted and m.state is S.STOPPED and self._may_start(m):
                self._start(m, now)

    def _shutdown_step(self, now: float) -> bool:
        """Stop the proxy first, then the rest; True once everything has stopped."""
        proxies = [m for m in self.services.values() if m.kind == ServiceKind.PROXY.value]
        others = [m for m in self.services.values() if m.kind != ServiceKind.PROXY.value]
        for m in self.services.values():
            m.wanted = False
        if any(m.state.running for m in proxies):
            for m in proxies:
                self._stop(m, S.STOPPED, "shutting down")
            return False
        for m in others:
            if m.state.running:
                self._stop(m, S.STOPPED, "shutting down")
            elif m.state is S.BACKOFF:
                self._set_state(m, S.STOPPED, "shutting down")
        return not any(m.state.running for m in self.services.values())

    def handle(self, cmd: control.Command, now: float) -> str:
        """Apply one command from the CLI; return a one-line answer."""
        targets = [self.services[cmd.service]] if cmd.service else list(self.services.values())
        if cmd.service and cmd.service not in self.services:
            return f"error: no service {cmd.service!r}; services: {', '.join(self.services)}"
        if cmd.action == "reload":
            self.reload()
            return "reloaded" if self.stack_error is None else f"error: {self.stack_error}"
        for m in targets:
            if cmd.action == "stop":
                m.wanted = False
                self._stop(m, S.STOPPED, "stopped by `mlx-stack down`")
            elif cmd.action in ("start", "restart"):
                m.wanted = True
                m.consecutive_failures = 0
                m.restart_times.clear()
                m.next_start_at = 0.0
                if cmd.action == "restart" and m.state.running:
                    self._stop(m, S.BACKOFF, "restart requested")
                elif m.state in (S.FATAL, S.BACKOFF):
                    self._set_state(m, S.STOPPED, "")
            else:
                return f"error: unknown action {cmd.action!r}"
        self.dirty = True
        return "ok"

    def tick(self) -> bool:
        """One pass of the loop; False when the supervisor should exit."""
        now = self.clock()
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self.reload()
        for cmd in control.receive(self.paths):
            control.answer(self.paths, cmd, self.handle(cmd, now))
        if self.stop_requested.is_set():
            self.shutting_down = True
        for m in list(self.services.values()):
            self._step(m, now)
        done = False
        if self.shutting_down:
            done = self._shutdown_step(now)
        else:
            self._start_wanted(now)
        if self.dirty or now >= self.next_snapshot_at or done:
            self.write_snapshot()
            self.next_snapshot_at = now + 2.0
        return not done

    # ----- snapshot ----------------------------------------------------------------------

    def snapshot(self) -> SupervisorSnapshot:
        rows = []
        for m in self.services.values():
            rows.append(
                ServiceSnapshot(
                    name=m.name,
                    kind=m.kind,
                    state=m.state.value,
                    reason=m.reason,
                    model=m.spec.model if m.spec else None,
                    port=m.spec.port if m.spec else 0,
                    wanted=m.wanted,
                    process=m.record,
                    fingerprint=m.spec.fingerprint if m.spec else "",
                    started_at=m.started_wall if m.record else None,
                    restarts=m.restarts,
                    last_exit=m.last_exit,
                    last_probe_ms=m.last_probe_ms,
                )
            )
        me = psutil.Process()
        return SupervisorSnapshot(
            pid=os.getpid(),
            create_time=me.create_time(),
            argv=tuple(me.cmdline()),
            started_at=self.started_wall,
            stack_error=self.stack_error,
            shutting_down=self.shutting_down,
            services=tuple(rows),
        )

    def write_snapshot(self) -> None:
        save_snapshot(self.paths.state_file, self.snapshot())
        self.dirty = False

    def run(self) -> None:
        """Run until SIGTERM/SIGINT (or a shutdown command) and every service has stopped."""
        self.reload()
        if self.stack_error is not None:
            self.write_snapshot()
            raise MlxStackError(self.stack_error)
        try:
            while self.tick():
                time.sleep(TICK_S)
        finally:
            self.probe_pool.shutdown(wait=False, cancel_futures=True)
            for m in self.services.values():
                if m.log is not None:
                    m.log.close()


def _stack_file_watcher(sup: Supervisor, path: Path) -> None:
    """Ask for a reload whenever the stack file changes (watchfiles; a thread)."""
    from watchfiles import watch

    for changes in watch(
        path.parent,
        stop_event=sup.stop_requested,
        debounce=300,
        rust_timeout=1000,
        yield_on_timeout=False,
    ):
        if any(Path(p).name == path.name for _, p in changes):
            sup.reload_requested.set()


def main(argv: list[str] | None = None) -> int:
    """``python -m mlx_stack.watchdog [--only NAME ...]``: the supervisor process itself."""
    import argparse

    from mlx_stack.stackplan import load_plan

    parser = argparse.ArgumentParser(prog="mlx-stack-supervisor")
    parser.add_argument("--only", action="append", help="start only these services")
    args = parser.parse_args(argv)
    paths = StatePaths.from_env()
    paths.run.mkdir(parents=True, exist_ok=True)
    try:
        with supervisor_lock(paths.lock_file):
            clean_leftovers(paths.state_file)
            sup = Supervisor(paths, lambda: load_plan(paths), only=set(args.only or []) or None)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: sup.stop_requested.set())
            signal.signal(signal.SIGHUP, lambda *_: sup.reload_requested.set())
            watcher = threading.Thread(
                target=_stack_file_watcher, args=(sup, paths.stack_file), daemon=True
            )
            watcher.start()
            print(f"mlx-stack supervisor {os.getpid()} for {paths.home}", flush=True)
            sup.run()
            print("mlx-stack supervisor: every service stopped; exiting", flush=True)
    except MlxStackError as exc:
        print(f"mlx-stack supervisor: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
