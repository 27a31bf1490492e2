"""The supervisor's loop: one owner of every service's state, deciding what to do each tick.

It starts the model servers, then the proxy once a model server is ready; probes each service
through its real API; restarts on exit and on hang with capped exponential backoff; gives up
(FATAL) on crash loops and on causes a restart cannot fix; applies stack file edits; answers
the CLI's commands; and stops everything, proxy first, when asked.

Everything it does to the world goes through a :class:`~mlx_stack.supervisor.runtime.Runtime`,
so the unit tests drive this very class on a fake one. No input can end it: a bad command is
answered with an error, a bug while stepping one service marks that service (``fault``) and the
others go on, a failed write becomes a warning and is retried, and the stack file is re-read
off the loop (``reload_executor``), with limits, so a hostile file cannot freeze supervision.
It ends only when asked to (``stop_requested``) or when its lock is lost.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from mlx_stack.config.plan import LoadedPlan, Plan, ServiceKind, ServiceSpec
from mlx_stack.config.settings import WatchSettings
from mlx_stack.contract.commands import (
    Action,
    Answer,
    Command,
    CommandError,
    ErrorCode,
    Mailbox,
    Received,
    known_names_message,
)
from mlx_stack.contract.snapshot import ExitInfo, SupervisorSnapshot, snapshot_text
from mlx_stack.errors import MlxStackError
from mlx_stack.paths import StatePaths
from mlx_stack.ports import connect_host
from mlx_stack.supervisor.lock import StackLock
from mlx_stack.supervisor.logsink import LogSink
from mlx_stack.supervisor.managed import Managed
from mlx_stack.supervisor.policy import (
    backoff_delay,
    exit_is_unfixable,
    is_crash_loop,
    should_reset_failures,
    start_deadline,
)
from mlx_stack.supervisor.probes import ProbeResult
from mlx_stack.supervisor.runtime import Runtime
from mlx_stack.supervisor.states import ServiceState, check_transition

S = ServiceState
TICK_S = 0.1
LOG_TAIL_ON_EXIT = 15
PROGRESS_CHECK_S = 1.0
SNAPSHOT_EVERY_S = 2.0
RETRY_WRITE_S = 1.0
LOCK_CHECK_S = 5.0
SWEEP_S = 60.0
WARNING_KEEP_S = 600.0
REPEAT_LOG_S = 60.0
FAULT_KEEP_S = 60.0

PlanLoader = Callable[[], LoadedPlan]


class InlineExecutor(Executor):
    """Runs each task at once in the caller's thread (unit tests: no threads, no waiting)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the loop collects it like any reload failure
            fut.set_exception(exc)
        return fut


class Supervisor:
    """Runs one stack until told to stop."""

    def __init__(
        self,
        paths: StatePaths,
        load_plan: PlanLoader,
        runtime: Runtime,
        *,
        only: set[str] | None = None,
        reload_executor: Executor | None = None,
        lifeline: int | None = None,
        lock: StackLock | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.paths = paths
        self.load_plan = load_plan
        self.rt = runtime
        self.only = only
        self.mailbox = Mailbox(paths.commands)
        self.reload_executor = reload_executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="reload")
        #: The read end of a pipe only this process writes: children see end-of-file exactly
        #: when the supervisor is gone (see childguard.py).
        self.lifeline = lifeline
        self.lock = lock
        self._say = say or _stderr
        self.services: dict[str, Managed] = {}
        self.settings = WatchSettings()
        self.stack_error: str | None = None
        self.shutting_down = False
        self.reload_requested = threading.Event()
        self.stop_requested = threading.Event()
        self.dirty = True
        self.started_wall = runtime.wall()
        self._next_snapshot_at = 0.0
        self._next_lock_check = 0.0
        self._next_sweep = 0.0
        self._reload: Future[LoadedPlan] | None = None
        self._reload_waiters: list[str] = []  # answered when the reload in flight completes
        self._next_waiters: list[str] = []  # arrived during it: answered after the next one
        self._warnings: deque[tuple[float, str]] = deque(maxlen=10)
        self._last_logged: dict[str, float] = {}
        self._failing: set[str] = set()

    # ----- reporting -------------------------------------------------------------------

    def say(self, text: str) -> None:
        """One line into the supervisor's own log (its stderr); never raises."""
        with contextlib.suppress(OSError, ValueError):
            self._say(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}")

    def warn(self, key: str, text: str) -> None:
        """A problem worked around: shown in `status`, logged at most once a minute per key."""
        now = self.rt.monotonic()
        self._failing.add(key)
        if not self._warnings or self._warnings[-1][1] != text:
            self._warnings.append((self.rt.wall(), text))
            self.dirty = True
        if now - self._last_logged.get(key, -REPEAT_LOG_S) >= REPEAT_LOG_S:
            self._last_logged[key] = now
            self.say(f"warning: {text}")

    def recovered(self, key: str, text: str) -> None:
        if key in self._failing:
            self._failing.discard(key)
            self._last_logged.pop(key, None)
            self.say(text)

    def internal_error(self, where: str, exc: BaseException) -> str:
        """A bug, contained: its traceback goes to the supervisor log (once a minute per kind)."""
        text = f"internal error in {where}: {type(exc).__name__}: {exc}"
        key = f"bug:{where}:{type(exc).__name__}"
        now = self.rt.monotonic()
        if now - self._last_logged.get(key, -REPEAT_LOG_S) >= REPEAT_LOG_S:
            self._last_logged[key] = now
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.say(f"{text}; the stack keeps running. Please report this:\n{tb.rstrip()}")
        return text

    # ----- state -----------------------------------------------------------------------

    def _set_state(self, m: Managed, new: ServiceState, reason: str = "") -> None:
        """The one place a service's state changes (checked against the transition table)."""
        if m.state is new and m.reason == reason:
            return
        if m.state is not new:
            check_transition(m.state, new)
            self._mark(m, f"{m.name}: {m.state.value} -> {new.value}"
                       + (f" ({reason})" if reason else ""))
        m.state = new
        m.reason = reason
        self.dirty = True

    def _mark(self, m: Managed, text: str) -> None:
        self._log_for(m).mark(text)

    def _log_for(self, m: Managed) -> LogSink:
        if m.log is None:
            m.log = self.rt.open_log(self.paths.log_file(m.name), self.settings.log_max_bytes,
                                     self.settings.log_backups)
        return m.log

    # ----- plan and reload -------------------------------------------------------------

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
                wanted = (self.only is None or name in self.only
                          or (spec is not None and spec.kind is ServiceKind.PROXY
                              and self.only is None))
                self.services[name] = Managed(name, spec, plan.missing.get(name, ""),
                                              wanted=wanted)
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

    def load_initial(self) -> None:
        """The first read of the stack file, before any service exists (raises if invalid)."""
        try:
            loaded = self.load_plan()
        except MlxStackError as exc:
            self.stack_error = str(exc)
            self.write_snapshot()
            raise
        self.apply_plan(loaded.plan, loaded.settings)

    def request_reload(self, waiter: str | None = None) -> None:
        """Re-read the stack file off the loop; ``waiter`` (a command id) gets the outcome."""
        if self._reload is None:
            if waiter:
                self._reload_waiters.append(waiter)
            self._reload = self.reload_executor.submit(self.load_plan)
        else:  # the file may have changed after the read in flight began: read it again after
            if waiter:
                self._next_waiters.append(waiter)
            self._again = True

    _again = False

    def _poll_reload(self) -> None:
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self.request_reload()
        fut = self._reload
        if fut is None or not fut.done():
            return
        self._reload = None
        waiters, self._reload_waiters = self._reload_waiters, []
        error: CommandError | None = None
        try:
            loaded = fut.result()
        except MlxStackError as exc:
            self.stack_error = str(exc)
            error = CommandError(ErrorCode.STACK_INVALID, str(exc))
            self.say(f"stack file refused; the running stack is unchanged: {exc}")
        except Exception as exc:
            self.stack_error = self.internal_error("reading the stack file", exc)
            error = CommandError(ErrorCode.INTERNAL, self.stack_error)
        else:
            if self.stack_error is not None:
                self.say("stack file valid again")
            self.stack_error = None
            self.apply_plan(loaded.plan, loaded.settings)
        self.dirty = True
        for cid in waiters:
            self._send(Answer(cid, result="reloaded" if error is None else "", error=error,
                              services=tuple(self.services)))
        if self._again:
            self._again = False
            self._reload_waiters, self._next_waiters = self._next_waiters, []
            self._reload = self.reload_executor.submit(self.load_plan)

    # ----- commands --------------------------------------------------------------------

    def _serve_commands(self) -> None:
        for rec in self.mailbox.receive():
            answer = self._answer_for(rec)
            if answer is not None:
                self._send(answer)

    def _answer_for(self, rec: Received) -> Answer | None:
        names = tuple(self.services)
        if rec.command is None:
            error = rec.error or CommandError(ErrorCode.MALFORMED, "empty command")
            self.say(f"refused a command: {error.message}")
            return Answer(rec.id, error=error, services=names)
        try:
            return self.handle(rec.command)
        except Exception as exc:
            text = self.internal_error(f"command {rec.command.action.value}", exc)
            return Answer(rec.id, error=CommandError(ErrorCode.INTERNAL, text), services=names)

    def _send(self, answer: Answer) -> None:
        try:
            path, text = self.mailbox.answer_file(answer)
            self.rt.write_file(path, text, 0o600)
            self.recovered("answer", "command answers can be written again")
        except OSError as exc:
            self.warn("answer", f"cannot answer command {answer.id}: {exc.strerror or exc}")

    def handle(self, cmd: Command) -> Answer | None:
        """Apply one command; None when the answer comes later (a reload)."""
        names = tuple(self.services)
        if cmd.action is Action.RELOAD:
            self.request_reload(waiter=cmd.id)
            return None
        if cmd.target is not None and cmd.target not in self.services:
            return Answer(cmd.id, error=CommandError(
                ErrorCode.UNKNOWN_SERVICE, known_names_message(cmd.target, names)),
                services=names)
        if self.shutting_down:
            return Answer(cmd.id, error=CommandError(
                ErrorCode.INTERNAL, "the supervisor is shutting down"), services=names)
        targets = [self.services[cmd.target]] if cmd.target else list(self.services.values())
        for m in targets:
            if cmd.action is Action.STOP:
                m.wanted = False
                self._stop(m, S.STOPPED, "stopped by `mlx-stack down`")
                continue
            m.wanted = True
            m.consecutive_failures = 0
            m.restart_times.clear()
            m.next_start_at = 0.0
            if cmd.action is Action.RESTART and m.state.running:
                self._stop(m, S.BACKOFF, "restart requested")
            elif m.state in (S.FATAL, S.BACKOFF):
                self._set_state(m, S.STOPPED, "")
        self.dirty = True
        return Answer(cmd.id, result=f"{cmd.action.value} {cmd.target or 'every service'}",
                      services=names)

    # ----- processes -------------------------------------------------------------------

    def _start(self, m: Managed, now: float) -> None:
        if m.spec is None:
            self._set_state(m, S.FATAL, m.unavailable or "no definition")
            return
        s = m.spec
        if s.config_file is not None:
            try:
                self.rt.write_file(s.config_file[0], s.config_file[1], 0o600)
            except OSError as exc:  # a full disk is no crash loop: retry, never give up
                m.consecutive_failures += 1
                delay = backoff_delay(m.consecutive_failures, self.settings)
                m.next_start_at = now + delay
                self._set_state(m, S.BACKOFF, f"cannot write {s.config_file[0]}: "
                                f"{exc.strerror or exc}; retrying in {delay:.1f} s")
                return
        if not self.rt.port_free(s.port, connect_host(s.host)):
            self._set_state(
                m, S.FATAL,
                f"port {s.port} is held by {self.rt.port_holder(s.port)}; stop that program or "
                f"change the port, then `mlx-stack restart {m.name}`")
            return
        log = self._log_for(m)
        log.mark(f"starting {m.name}: {' '.join(s.argv)}")
        try:
            m.child = self.rt.spawn(s.argv, s.full_env(), self.paths.run, log, self.lifeline)
        except OSError as exc:
            self._set_state(m, S.FATAL, f"cannot run {s.argv[0]}: {exc.strerror or exc}")
            return
        m.started_at = m.last_progress_at = now
        m.started_wall = self.rt.wall()
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
        m.stop_deadline = self.rt.monotonic() + self.settings.stop_timeout_s
        if m.probe is not None:
            m.probe.cancel()
            m.probe = None
        self._set_state(m, S.STOPPING, reason)

    def _reap(self, m: Managed) -> int | None:
        """The exit code if the service's process has ended (its group is then cleaned)."""
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
        try:
            lines = self.rt.tail(self.paths.log_file(m.name), LOG_TAIL_ON_EXIT)
        except OSError:
            lines = []
        expected = was is S.STOPPING and not m.stop_is_failure
        m.last_exit = ExitInfo.from_returncode(code, self.rt.wall(), lines, expected)
        m.stop_is_failure = False
        m.ready_since = None
        if was is S.STOPPING:
            target = m.after_stop
            if target is S.BACKOFF and not m.wanted:
                target = S.STOPPED
            self._set_state(m, target, m.after_stop_reason)
            return
        if exit_is_unfixable(code, was is S.STARTING):
            self._set_state(
                m, S.FATAL,
                f"exited during start with {m.last_exit.describe()}, which restarting cannot "
                f"fix; see its log, fix, then `mlx-stack restart {m.name}`")
            return
        self._fail(m, now, m.last_exit.describe())

    def _count_failure(self, m: Managed, now: float) -> bool:
        """Record one failure; True if it makes a crash loop."""
        m.consecutive_failures += 1
        m.restart_times.append(now)
        m.restarts += 1
        return is_crash_loop(m.restart_times, now, self.settings)

    def _crash_loop_reason(self, m: Managed, why: str) -> str:
        n, w = self.settings.crashloop_restarts, self.settings.crashloop_window_s
        return (f"crash loop: {n} failures within {w:.0f} s; last: {why}; "
                f"`mlx-stack restart {m.name}` tries again")

    def _fail(self, m: Managed, now: float, why: str) -> None:
        """Count a failure: back off before the next start, or give up on a crash loop."""
        if self._count_failure(m, now):
            self._set_state(m, S.FATAL, self._crash_loop_reason(m, why))
            return
        delay = backoff_delay(m.consecutive_failures, self.settings)
        m.next_start_at = now + delay
        self._set_state(m, S.BACKOFF, f"{why}; restarting in {delay:.1f} s")

    def _fail_by_killing(self, m: Managed, now: float, why: str) -> None:
        """A hung or failed start: kill the group now; it lands in BACKOFF (or FATAL) on exit."""
        self._stop(m, S.BACKOFF, why, kill=True)
        m.stop_is_failure = True
        if self._count_failure(m, now):
            m.after_stop = S.FATAL
            m.after_stop_reason = self._crash_loop_reason(m, why)
        else:
            delay = backoff_delay(m.consecutive_failures, self.settings)
            m.next_start_at = now + delay
            m.after_stop_reason = f"{why}; restarting in {delay:.1f} s"

    # ----- one service, one tick -------------------------------------------------------

    def _progressing(self, m: Managed, now: float) -> None:
        """Note progress of a loading service: its log grows or its memory grows."""
        if now < m.next_progress_check or m.record is None:
            return
        m.next_progress_check = now + PROGRESS_CHECK_S
        size = self.rt.file_size(self.paths.log_file(m.name)) or 0
        rss = self.rt.rss_bytes(m.record) or 0
        old_size, old_rss = m.progress_mark
        if size != old_size or rss > old_rss + 8 * 1024 * 1024:
            m.last_progress_at = now
            m.progress_mark = (size, max(rss, old_rss))

    def _probe_result(self, m: Managed, now: float) -> ProbeResult | None:
        assert m.spec is not None
        if m.probe is None:
            if now >= m.next_probe_at:
                m.probe = self.rt.probe(m.spec.probe, self.settings.probe_timeout_s)
            return None
        if not m.probe.done():
            return None
        fut, m.probe = m.probe, None
        try:
            res = fut.result()
        except Exception as exc:  # a prober bug is a failed probe, not a dead loop
            res = ProbeResult(False, 0.0, f"probe error: {type(exc).__name__}: {exc}")
        m.last_probe_ms = res.latency_ms
        m.next_probe_at = now + (0.5 if m.state is S.STARTING else self.settings.probe_interval_s)
        self.dirty = True
        return res

    def step(self, m: Managed, now: float) -> None:
        code = self._reap(m) if m.state.running else None
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
        if st is S.STOPPED:
            if m.wanted and not self.shutting_down and self._may_start(m):
                self._start(m, now)
            return
        if st is S.FATAL:
            return
        if st is S.BACKOFF:
            if (m.wanted and not self.shutting_down and now >= m.next_start_at
                    and self._may_start(m)):
                self._start(m, now)
            return
        res = self._probe_result(m, now)
        if st is S.STARTING:
            self._progressing(m, now)
            if res is not None and res.ok:
                m.ready_since = now
                m.probe_failures = 0
                self._set_state(m, S.READY)
            elif now >= start_deadline(m.started_at, m.last_progress_at, self.settings):
                detail = f" ({res.detail})" if res is not None and res.detail else ""
                self._fail_by_killing(m, now, f"not ready after {now - m.started_at:.0f} s"
                                      + detail)
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
            self._fail_by_killing(
                m, now, f"hung: {m.probe_failures} failed probes in a row ({res.detail})")
        else:
            self._set_state(m, S.UNHEALTHY, f"probe failed {m.probe_failures}/{n}: {res.detail}")

    def _step_contained(self, m: Managed, now: float) -> None:
        """Step one service; a bug marks this service and leaves the others be."""
        try:
            self.step(m, now)
        except Exception as exc:
            text = self.internal_error(f"service {m.name}", exc)
            m.fault_at = now
            if m.fault != text:
                m.fault = text
                self.dirty = True
            return
        if m.fault and now - m.fault_at >= FAULT_KEEP_S:
            m.fault = ""
            self.dirty = True
        if m.log is not None:
            err = m.log.take_error()
            if err:
                self.warn(f"log:{m.name}", err)

    def _may_start(self, m: Managed) -> bool:
        """The proxy waits until at least one model server is ready."""
        if m.spec is None or m.spec.kind is not ServiceKind.PROXY:
            return True
        return any(o.state is S.READY for o in self.services.values()
                   if o.spec is not None and o.spec.kind is not ServiceKind.PROXY)

    def _shutdown_step(self) -> bool:
        """Stop the proxy first, then the rest; True once everything has stopped."""
        proxies = [m for m in self.services.values() if m.kind is ServiceKind.PROXY]
        others = [m for m in self.services.values() if m.kind is not ServiceKind.PROXY]
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

    # ----- the loop --------------------------------------------------------------------

    def _contained(self, where: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            self.warn(f"bug:{where}", self.internal_error(where, exc))

    def tick(self) -> bool:
        """One pass of the loop; False once the supervisor has stopped everything."""
        now = self.rt.monotonic()
        self._contained("reload", self._poll_reload)
        self._contained("commands", self._serve_commands)
        if self.stop_requested.is_set() and not self.shutting_down:
            self.shutting_down = True
            self.say("stopping: the proxy first, then the model servers")
            self.dirty = True
        for m in list(self.services.values()):
            self._step_contained(m, now)
        done = False
        if self.shutting_down:
            try:
                done = self._shutdown_step()
            except Exception as exc:
                self.internal_error("shutdown", exc)
                self.emergency_stop()
                done = True
        self._contained("lock", lambda: self._check_lock(now))
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_S
            self._contained("sweep", lambda: self.mailbox.sweep(self.rt.wall()))
        self._contained("snapshot", lambda: self._maybe_snapshot(now, force=done))
        return not done

    def _check_lock(self, now: float) -> None:
        if self.lock is None or now < self._next_lock_check:
            return
        self._next_lock_check = now + LOCK_CHECK_S
        if not self.lock.still_ours():
            self.say(f"lost the stack lock ({self.lock.path}): another supervisor may run this "
                     "stack now; stopping this one")
            self.stop_requested.set()

    # ----- snapshot --------------------------------------------------------------------

    def snapshot(self) -> SupervisorSnapshot:
        me = self.rt.me()
        horizon = self.rt.wall() - WARNING_KEEP_S
        warnings = tuple(f"{time.strftime('%H:%M:%S', time.localtime(at))} {text}"
                         for at, text in self._warnings if at >= horizon)
        return SupervisorSnapshot(
            pid=me.pid,
            create_time=me.create_time,
            argv=me.argv,
            started_at=self.started_wall,
            stack_error=self.stack_error,
            shutting_down=self.shutting_down,
            services=tuple(m.snapshot() for m in self.services.values()),
            warnings=warnings,
        )

    def write_snapshot(self) -> None:
        """Write ``run/state.json``; raises OSError (the loop turns it into a warning)."""
        self.rt.write_file(self.paths.state_file, snapshot_text(self.snapshot()), 0o644)
        self.dirty = False

    def _maybe_snapshot(self, now: float, *, force: bool = False) -> None:
        if not (force or self.dirty or now >= self._next_snapshot_at):
            return
        try:
            self.write_snapshot()
        except OSError as exc:
            self._next_snapshot_at = now + RETRY_WRITE_S
            self.warn("snapshot", f"cannot write {self.paths.state_file}: "
                      f"{exc.strerror or exc}; `status` shows an older state until it works")
            return
        self._next_snapshot_at = now + SNAPSHOT_EVERY_S
        self.recovered("snapshot", f"{self.paths.state_file} is written again")

    # ----- running and stopping --------------------------------------------------------

    def emergency_stop(self) -> None:
        """Stop every child without the state machine (the loop itself failed): the proxy's
        group first, then the rest; SIGKILL after the stop timeout."""
        groups = [[m for m in self.services.values() if m.kind is ServiceKind.PROXY],
                  [m for m in self.services.values() if m.kind is not ServiceKind.PROXY]]
        for group in groups:
            _stop_children([m for m in group if m.child is not None],
                           self.settings.stop_timeout_s)

    def run(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Run until every service has stopped after a stop request (SIGTERM, SIGINT)."""
        self.load_initial()
        self.say(f"supervising {', '.join(self.services)}")
        try:
            while True:
                try:
                    if not self.tick():
                        break
                except Exception as exc:  # tick contains its parts; this is the last net
                    self.internal_error("tick", exc)
                sleep(TICK_S)
        except BaseException as exc:
            self.internal_error("the supervisor loop", exc)
            self.say("stopping every service before exiting")
            self.emergency_stop()
            raise
        finally:
            for m in self.services.values():
                if m.log is not None:
                    m.log.close()


def _stop_children(ms: Iterable[Managed], timeout_s: float) -> None:
    ms = list(ms)
    for m in ms:
        if m.child is not None:
            m.child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s  # real time: this path waits for real processes
    while any(m.child is not None and m.child.poll() is None for m in ms):
        if time.monotonic() >= deadline:
            for m in ms:
                if m.child is not None:
                    m.child.signal_group(signal.SIGKILL)
            break
        time.sleep(0.05)
    for m in ms:
        if m.child is not None and m.child.poll() is not None:
            m.child.finish()


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
