"""One service's state machine, one tick at a time: start, probe, stop, reap, fail, back off.

The loop (``loop.py``) owns the services and calls :meth:`ServiceDriver.step` for each on every
tick; the driver changes a service's state only through :meth:`ServiceDriver.set_state`, checked
against the transition table (``states.py``), and acts on the world only through the runtime.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from mlx_stack.config.settings import WatchSettings
from mlx_stack.contract.snapshot import ExitInfo
from mlx_stack.paths import StatePaths
from mlx_stack.ports import connect_host
from mlx_stack.supervisor.logsink import LogSink
from mlx_stack.supervisor.managed import Managed
from mlx_stack.supervisor.policy import (
    Observation,
    Verdict,
    backoff_delay,
    exit_is_unfixable,
    is_crash_loop,
    judge_hang,
    should_reset_failures,
    start_deadline,
)
from mlx_stack.supervisor.probes import ProbeResult
from mlx_stack.supervisor.runtime import Runtime
from mlx_stack.supervisor.states import ServiceState, check_transition

S = ServiceState
LOG_TAIL_ON_EXIT = 15
PROGRESS_CHECK_S = 1.0


class ServiceDriver:
    """Acts for the loop on one service at a time; holds no service state of its own."""

    def __init__(self, paths: StatePaths, runtime: Runtime, *, lifeline: int | None,
                 on_change: Callable[[], None]) -> None:
        self.paths = paths
        self.rt = runtime
        #: The read end of a pipe only the supervisor writes: children see end-of-file exactly
        #: when the supervisor is gone (see childguard.py).
        self.lifeline = lifeline
        self.on_change = on_change
        self.settings = WatchSettings()

    def set_state(self, m: Managed, new: ServiceState, reason: str = "") -> None:
        """The one place a service's state changes (checked against the transition table)."""
        if m.state is new and m.reason == reason:
            return
        if m.state is not new:
            check_transition(m.state, new)
            self.mark(m, f"{m.name}: {m.state.value} -> {new.value}"
                       + (f" ({reason})" if reason else ""))
        m.state = new
        m.reason = reason
        self.on_change()

    def mark(self, m: Managed, text: str) -> None:
        self.log_for(m).mark(text)

    def log_for(self, m: Managed) -> LogSink:
        if m.log is None:
            m.log = self.rt.open_log(self.paths.log_file(m.name), self.settings.log_max_bytes,
                                     self.settings.log_backups)
        return m.log

    def start(self, m: Managed, now: float) -> None:
        if m.spec is None:
            self.set_state(m, S.FATAL, m.unavailable or "no definition")
            return
        s = m.spec
        if s.config_file is not None:
            try:
                self.rt.write_file(s.config_file[0], s.config_file[1], 0o600)
            except OSError as exc:  # a full disk is no crash loop: retry, never give up
                m.consecutive_failures += 1
                delay = backoff_delay(m.consecutive_failures, self.settings)
                m.next_start_at = now + delay
                self.set_state(m, S.BACKOFF, f"cannot write {s.config_file[0]}: "
                                f"{exc.strerror or exc}; retrying in {delay:.1f} s")
                return
        if not self.rt.port_free(s.port, connect_host(s.host)):
            self.set_state(
                m, S.FATAL,
                f"port {s.port} is held by {self.rt.port_holder(s.port)}; stop that program or "
                f"change the port, then `mlx-stack restart {m.name}`")
            return
        log = self.log_for(m)
        log.mark(f"starting {m.name}: {' '.join(s.argv)}")
        try:
            m.child = self.rt.spawn(s.argv, s.full_env(), self.paths.run, log, self.lifeline)
        except OSError as exc:
            self.set_state(m, S.FATAL, f"cannot run {s.argv[0]}: {exc.strerror or exc}")
            return
        m.started_at = m.last_progress_at = now
        m.started_wall = self.rt.wall()
        m.progress_mark = (0, 0)
        m.next_progress_check = now
        m.ready_since = None
        m.probe_failures = 0
        m.last_probe_detail = ""
        m.probe = None
        m.next_probe_at = now + 0.2
        m.liveness = None
        m.observations.clear()
        m.unanswered_since = None
        m.last_probe_timed_out = False
        m.killed = False
        self.set_state(m, S.STARTING)

    def _signal(self, m: Managed, sig: int) -> None:
        if m.child is not None:
            m.child.signal_group(sig)

    def stop(self, m: Managed, then: ServiceState, reason: str, *, kill: bool = False) -> None:
        """Signal the whole group (SIGKILL at once if ``kill``); the loop finishes the stop."""
        m.after_stop, m.after_stop_reason = then, reason
        if m.state is S.STOPPING:
            return
        if not m.state.running or m.child is None:
            if then is S.STOPPED and m.state in (S.BACKOFF, S.FATAL):
                self.set_state(m, S.STOPPED, reason)
            return
        self._signal(m, signal.SIGKILL if kill else signal.SIGTERM)
        m.killed = kill
        m.stop_deadline = self.rt.monotonic() + self.settings.stop_timeout_s
        for fut in (m.probe, m.liveness):
            if fut is not None:
                fut.cancel()
        m.probe = m.liveness = None
        self.set_state(m, S.STOPPING, reason)

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
            self.set_state(m, target, m.after_stop_reason)
            return
        if exit_is_unfixable(code, was is S.STARTING):
            self.set_state(
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
            self.set_state(m, S.FATAL, self._crash_loop_reason(m, why))
            return
        delay = backoff_delay(m.consecutive_failures, self.settings)
        m.next_start_at = now + delay
        self.set_state(m, S.BACKOFF, f"{why}; restarting in {delay:.1f} s")

    def _fail_by_killing(self, m: Managed, now: float, why: str) -> None:
        """A hung or failed start: kill the group now; it lands in BACKOFF (or FATAL) on exit."""
        self.stop(m, S.BACKOFF, why, kill=True)
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
        self.on_change()
        return res

    def step(self, m: Managed, now: float, *, may_start: bool) -> None:
        """Advance one service by one tick; ``may_start``: the loop allows a (re)start now."""
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
            if m.wanted and may_start:
                self.start(m, now)
            return
        if st is S.FATAL:
            return
        if st is S.BACKOFF:
            if m.wanted and may_start and now >= m.next_start_at:
                self.start(m, now)
            return
        res = self._probe_result(m, now)
        if st is S.STARTING:
            self._progressing(m, now)
            if res is not None and res.ok:
                m.ready_since = now
                m.probe_failures = 0
                self.set_state(m, S.READY)
                return
            if res is not None and res.detail:
                m.last_probe_detail = res.detail  # the reason a failed start gives
            if now >= self._start_deadline(m):
                last = res.detail if res is not None and res.detail else m.last_probe_detail
                detail = f" ({last})" if last else ""
                self._fail_by_killing(m, now, f"not ready after {now - m.started_at:.0f} s"
                                      + detail)
            return
        if should_reset_failures(m.ready_since, now, self.settings):
            m.consecutive_failures = 0
        self._watch_liveness(m, now)
        if res is not None:
            m.last_probe_timed_out = not res.ok and not res.answered
            if res.ok:
                m.probe_failures = 0
            elif res.answered:  # a wrong answer: broken, whatever its health route says
                m.probe_failures += 1
                m.last_probe_detail = res.detail
        self._settle(m, now)

    def _start_deadline(self, m: Managed) -> float:
        """The watchdog's, or a fixed one when the service says how long it may take (an
        external server: its log and memory say nothing this supervisor can read as progress)."""
        limit = m.spec.ready_timeout_s if m.spec is not None else None
        if limit is not None:
            return m.started_at + limit
        return start_deadline(m.started_at, m.last_progress_at, self.settings)

    def _settle(self, m: Managed, now: float) -> None:
        """READY, UNHEALTHY or killed, from the real requests and the hang judgement."""
        n = self.settings.failure_threshold
        j = judge_hang(m.observations, self.settings, m.unanswered_since)
        if j.verdict in (Verdict.HUNG, Verdict.BROKEN):
            self._fail_by_killing(m, now, f"{j.verdict.value}: {j.reason}")
        elif m.probe_failures >= n:
            self._fail_by_killing(m, now, f"broken: {m.probe_failures} failed probes in a row "
                                  f"({m.last_probe_detail})")
        elif j.verdict in (Verdict.SUSPECT, Verdict.BUSY):
            self.set_state(m, S.UNHEALTHY, j.reason)
        elif m.probe_failures:
            self.set_state(m, S.UNHEALTHY,
                           f"probe failed {m.probe_failures}/{n}: {m.last_probe_detail}")
        else:
            if m.state is not S.READY:
                m.ready_since = now
            busy = ("busy: a real request took longer than probe_timeout_s; its health route "
                    "answers" if m.last_probe_timed_out else "")
            self.set_state(m, S.READY, busy)

    def _watch_liveness(self, m: Managed, now: float) -> None:
        """Every liveness_interval_s: send the cheap liveness check, and look at the process.

        A stopped process is recorded at once (its check would only time out), so a SIGSTOP
        is seen within two intervals, not two timeouts.
        """
        assert m.spec is not None and m.record is not None
        if now >= m.next_liveness_at:
            m.next_liveness_at = now + self.settings.liveness_interval_s
            if m.liveness is None:
                m.liveness = self.rt.liveness(m.spec.probe, self.settings.liveness_timeout_s)
            stats = self.rt.proc_stats(m.record)
            if stats is not None and stats.stopped:
                self._observe(m, now, ProbeResult(False, 0.0, "stopped", answered=False))
        if m.liveness is None or not m.liveness.done():
            return
        fut, m.liveness = m.liveness, None
        try:
            res = fut.result()
        except Exception as exc:  # a prober bug: count it as no answer
            res = ProbeResult(False, 0.0, f"liveness error: {exc}", answered=False)
        self._observe(m, now, res)

    def _observe(self, m: Managed, now: float, res: ProbeResult) -> None:
        assert m.record is not None
        stats = self.rt.proc_stats(m.record)
        m.observations.append(Observation(
            at=now, answered=res.answered, alive=res.ok,
            stopped=stats is not None and stats.stopped,
            cpu_s=stats.cpu_s if stats is not None else None,
            output=self.rt.file_size(self.paths.log_file(m.name)) or 0,
        ))
        if res.answered:
            m.unanswered_since = None
        elif m.unanswered_since is None:
            m.unanswered_since = now
