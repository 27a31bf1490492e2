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
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from mlx_stack.config.plan import LoadedPlan, Plan, ServiceKind, ServiceSpec
from mlx_stack.config.settings import WatchSettings
from mlx_stack.contract.addressing import aliases_of, groups_of, resolve
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
from mlx_stack.contract.snapshot import SupervisorSnapshot, snapshot_text
from mlx_stack.errors import MlxStackError
from mlx_stack.paths import StatePaths
from mlx_stack.supervisor.driver import ServiceDriver
from mlx_stack.supervisor.lock import StackLock
from mlx_stack.supervisor.managed import Managed
from mlx_stack.supervisor.remotes import RemoteProber
from mlx_stack.supervisor.reporter import Reporter
from mlx_stack.supervisor.rolling import Rolls
from mlx_stack.supervisor.runtime import Runtime
from mlx_stack.supervisor.states import ServiceState

S = ServiceState
TICK_S = 0.1
SNAPSHOT_EVERY_S = 2.0
RETRY_WRITE_S = 1.0
LOCK_CHECK_S = 5.0
SWEEP_S = 60.0
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
        remote_prober: RemoteProber | None = None,
    ) -> None:
        self.paths = paths
        self.load_plan = load_plan
        self.rt = runtime
        self.only = only
        self.mailbox = Mailbox(paths.commands)
        self.reload_executor = reload_executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="reload")
        self.lock = lock
        self.report = Reporter(runtime, say)
        self.driver = ServiceDriver(paths, runtime, lifeline=lifeline, on_change=self._changed)
        self.services: dict[str, Managed] = {}
        self.remote_prober = remote_prober or RemoteProber()
        #: The accepted remote vector models last written to run/remotes.json (None: not yet).
        self._remotes_written: frozenset[str] | None = None
        self.rolls = Rolls(self.driver, self.report.say)
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

    def _changed(self) -> None:
        self.dirty = True

    @property
    def settings(self) -> WatchSettings:
        return self.driver.settings

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Each tier with replicas: its services (``contract/addressing.py``)."""
        return groups_of((m.name, m.spec.group) for m in self.services.values() if m.spec)

    # ----- plan and reload -------------------------------------------------------------

    def apply_plan(self, plan: Plan, settings: WatchSettings) -> None:
        """Make the supervised set match ``plan``: add, restart changed, stop removed."""
        self.driver.settings = settings
        self.remote_prober.configure(plan, self.rt.monotonic())
        specs: dict[str, ServiceSpec | None] = {s.name: s for s in plan.all}
        for name in plan.missing:
            specs[name] = None
        for name in list(self.services):
            if name not in specs:
                m = self.services[name]
                m.wanted = False
                self.rolls.forget(name)
                self.driver.stop(m, S.STOPPED, "removed from the stack file")
        new_groups = plan.groups
        to_roll: dict[str, list[str]] = {}
        for name, spec in specs.items():
            m = self.services.get(name)
            if m is None:
                wanted = (self.only is None or name in self.only
                          or (spec is not None and spec.group in self.only)
                          or (spec is not None and spec.kind is ServiceKind.PROXY
                              and self.only is None))
                self.services[name] = Managed(name, spec, plan.missing.get(name, ""),
                                              wanted=wanted)
                continue
            m.unavailable = plan.missing.get(name, "")
            if spec is not None and m.spec is not None and spec.fingerprint == m.spec.fingerprint:
                if m.pending_spec is not None:  # the edit was undone before its turn came
                    m.pending_spec = None
                    self.rolls.forget(name)
                continue
            if (spec is not None and m.spec is not None and m.state.running
                    and len(new_groups.get(spec.group, ())) > 1):
                m.pending_spec = spec  # replaced in its turn, while the others serve
                to_roll.setdefault(spec.group, []).append(name)
                continue
            if spec is None or m.spec is None or spec.fingerprint != m.spec.fingerprint:
                m.pending_spec = None
                self.rolls.forget(name)
                m.spec = spec
                if m.state.running:
                    self.driver.stop(m, S.BACKOFF, "definition changed")
                    m.next_start_at = 0.0
                    m.consecutive_failures = 0
                elif m.state in (S.FATAL, S.BACKOFF):
                    m.consecutive_failures = 0
                    m.restart_times.clear()
                    m.next_start_at = 0.0
        for group, names in to_roll.items():
            self.rolls.add(group, names, "definition changed")
        self.dirty = True

    def load_initial(self) -> None:
        """The first read of the stack file, before any service exists (raises if invalid)."""
        try:
            loaded = self.load_plan()
        except MlxStackError as exc:
            self.stack_error = str(exc)
            with contextlib.suppress(OSError):  # `up` then reads why from the snapshot
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
            self.report.say(f"stack file refused; the running stack is unchanged: {exc}")
        except Exception as exc:
            self.stack_error = self.report.internal_error("reading the stack file", exc)
            error = CommandError(ErrorCode.INTERNAL, self.stack_error)
        else:
            if self.stack_error is not None:
                self.report.say("stack file valid again")
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
            self.report.say(f"refused a command: {error.message}")
            return Answer(rec.id, error=error, services=names)
        try:
            return self.handle(rec.command)
        except Exception as exc:
            text = self.report.internal_error(f"command {rec.command.action.value}", exc)
            return Answer(rec.id, error=CommandError(ErrorCode.INTERNAL, text), services=names)

    def _send(self, answer: Answer) -> None:
        try:
            path, text = self.mailbox.answer_file(answer)
            self.rt.write_file(path, text, 0o600)
            self.report.recovered("answer", "command answers can be written again")
        except OSError as exc:
            self.report.warn("answer", f"cannot answer command {answer.id}: {exc.strerror or exc}")

    def handle(self, cmd: Command) -> Answer | None:
        """Apply one command; None when the answer comes later (a reload)."""
        groups = self.groups()
        names = (*self.services, *aliases_of(groups))
        if cmd.action is Action.RELOAD:
            self.request_reload(waiter=cmd.id)
            return None
        if cmd.target is not None and cmd.target not in names:
            return Answer(cmd.id, error=CommandError(
                ErrorCode.UNKNOWN_SERVICE, known_names_message(cmd.target, names)),
                services=names)
        if self.shutting_down:
            return Answer(cmd.id, error=CommandError(
                ErrorCode.INTERNAL, "the supervisor is shutting down"), services=names)
        targets = ([self.services[n] for n in resolve(cmd.target, groups)] if cmd.target
                   else list(self.services.values()))
        rolling: dict[str, list[str]] = {}
        for m in targets:
            if cmd.action is Action.STOP:
                m.wanted = False
                self.rolls.forget(m.name)
                self.driver.stop(m, S.STOPPED, "stopped by `mlx-stack down`")
                continue
            group = m.spec.group if m.spec else ""
            if cmd.action is Action.RESTART and m.state.running and len(groups.get(group, ())) > 1:
                rolling.setdefault(group, []).append(m.name)  # drained and replaced in turn
                continue
            m.wanted = True
            m.consecutive_failures = 0
            m.restart_times.clear()
            m.next_start_at = 0.0
            if cmd.action is Action.RESTART and m.state.running:
                self.driver.stop(m, S.BACKOFF, "restart requested")
            elif m.state in (S.FATAL, S.BACKOFF):
                self.driver.set_state(m, S.STOPPED, "")
        for group, members in rolling.items():
            self.rolls.add(group, members, "restart requested")
        self.dirty = True
        return Answer(cmd.id, result=f"{cmd.action.value} {cmd.target or 'every service'}",
                      services=names)

    def _step_contained(self, m: Managed, now: float) -> None:
        """Step one service; a bug marks this service and leaves the others be."""
        try:
            may_start = not self.shutting_down and self._may_start(m)
            self.driver.step(m, now, may_start=may_start)
        except Exception as exc:
            text = self.report.internal_error(f"service {m.name}", exc)
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
                self.report.warn(f"log:{m.name}", err)

    def _step_remotes(self, now: float) -> None:
        """Probe the remote stacks; when the accepted vector models change, write
        run/remotes.json (the proxy's launcher reads it) and restart the proxy."""
        prober = self.remote_prober
        if prober.step(now, self.rt.wall()):
            self.dirty = True
        if not prober.targets or prober.accepted == self._remotes_written:
            return
        try:
            self.rt.write_file(self.paths.run / "remotes.json", prober.file_text(), 0o600)
        except OSError as exc:
            self.report.warn("remotes", f"cannot write run/remotes.json: {exc.strerror or exc}")
            return
        self.report.recovered("remotes", "run/remotes.json is written again")
        first = self._remotes_written is None
        self._remotes_written = prober.accepted
        self.dirty = True
        joined = ", ".join(sorted(prober.accepted)) or "none"
        self.report.say(f"remote vector models in the proxy: {joined}")
        for m in self.services.values():
            if m.kind is ServiceKind.PROXY and m.state.running and not first:
                self.driver.stop(m, S.BACKOFF, f"remote vector models changed (now: {joined})")
                m.next_start_at = 0.0

    def _may_start(self, m: Managed) -> bool:
        """The proxy waits until at least one model server it runs is ready, and for a first
        verdict on the remotes (so it starts with the remote models it will keep)."""
        if m.spec is None or m.spec.kind is not ServiceKind.PROXY:
            return True
        prober = self.remote_prober
        if prober.targets and (not prober.settled(self.rt.monotonic())
                               or self._remotes_written != prober.accepted):
            return False
        servers = [o for o in self.services.values()
                   if o.spec is not None and o.spec.kind is not ServiceKind.PROXY]
        # A stack of url: tiers only has no model server to wait for.
        return not servers or any(o.state is S.READY for o in servers)

    def _shutdown_step(self) -> bool:
        """Stop the proxy first, then the rest; True once everything has stopped."""
        proxies = [m for m in self.services.values() if m.kind is ServiceKind.PROXY]
        others = [m for m in self.services.values() if m.kind is not ServiceKind.PROXY]
        for m in self.services.values():
            m.wanted = False
        if any(m.state.running for m in proxies):
            for m in proxies:
                self.driver.stop(m, S.STOPPED, "shutting down")
            return False
        for m in others:
            if m.state.running:
                self.driver.stop(m, S.STOPPED, "shutting down")
            elif m.state is S.BACKOFF:
                self.driver.set_state(m, S.STOPPED, "shutting down")
        return not any(m.state.running for m in self.services.values())

    # ----- the loop --------------------------------------------------------------------

    def _contained(self, where: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            self.report.warn(f"bug:{where}", self.report.internal_error(where, exc))

    def tick(self) -> bool:
        """One pass of the loop; False once the supervisor has stopped everything."""
        now = self.rt.monotonic()
        self._contained("reload", self._poll_reload)
        self._contained("commands", self._serve_commands)
        self._contained("remotes", lambda: self._step_remotes(now))
        if self.stop_requested.is_set() and not self.shutting_down:
            self.shutting_down = True
            self.report.say("stopping: the proxy first, then the model servers")
            self.dirty = True
        for m in list(self.services.values()):
            self._step_contained(m, now)
        if not self.shutting_down:  # after the steps: a replica ready in this tick is put
            # back, and the next one drained, in the same snapshot
            self._contained("rolls", lambda: self.rolls.tick(self.services, self.groups(), now))
        done = False
        if self.shutting_down:
            try:
                done = self._shutdown_step()
            except Exception as exc:
                self.report.internal_error("shutdown", exc)
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
            self.report.say(f"lost the stack lock ({self.lock.path}): another supervisor may "
                            "run this stack now; stopping this one")
            self.stop_requested.set()

    # ----- snapshot --------------------------------------------------------------------

    def snapshot(self) -> SupervisorSnapshot:
        me = self.rt.me()
        return SupervisorSnapshot(
            pid=me.pid,
            create_time=me.create_time,
            argv=me.argv,
            started_at=self.started_wall,
            stack_error=self.stack_error,
            shutting_down=self.shutting_down,
            services=tuple(m.snapshot() for m in self.services.values()),
            warnings=self.report.recent(),
            remotes=self.remote_prober.statuses(),
        )

    def write_snapshot(self) -> None:
        """Write ``run/state.json``; raises OSError (the loop turns it into a warning)."""
        self.rt.write_file(self.paths.state_file, snapshot_text(self.snapshot()), 0o600)
        self.dirty = False

    def _maybe_snapshot(self, now: float, *, force: bool = False) -> None:
        if self.report.changed:
            self.report.changed = False
            self.dirty = True
        if not (force or self.dirty or now >= self._next_snapshot_at):
            return
        try:
            self.write_snapshot()
        except OSError as exc:
            self._next_snapshot_at = now + RETRY_WRITE_S
            self.report.warn("snapshot", f"cannot write {self.paths.state_file}: "
                      f"{exc.strerror or exc}; `status` shows an older state until it works")
            return
        self._next_snapshot_at = now + SNAPSHOT_EVERY_S
        self.report.recovered("snapshot", f"{self.paths.state_file} is written again")

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
        self.report.say(f"supervising {', '.join(self.services)}")
        try:
            while True:
                try:
                    if not self.tick():
                        break
                except Exception as exc:  # tick contains its parts; this is the last net
                    self.report.internal_error("tick", exc)
                sleep(TICK_S)
        except BaseException as exc:
            self.report.internal_error("the supervisor loop", exc)
            self.report.say("stopping every service before exiting")
            self.emergency_stop()
            raise
        finally:
            self.remote_prober.executor.shutdown(wait=False, cancel_futures=True)
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
