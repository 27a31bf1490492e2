"""A fake of the supervisor's runtime seam (mlx_stack/supervisor/runtime.py) for the unit tier.

Processes, ports, memory, logs, files, probes and the clock are in-memory objects that a test
scripts: a child exits when told to, a probe answers, fails or hangs until its timeout, a write
fails with ENOSPC. Combined with the real ``Supervisor`` and the real command mailbox (files in a
temp folder), any scenario runs in milliseconds, with no subprocess and no sleep.
"""

from __future__ import annotations

import errno
import itertools
import json
import signal
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlx_stack.config.plan import (
    LoadedPlan,
    Plan,
    Probe,
    ProbeKind,
    ServiceKind,
    ServiceSpec,
)
from mlx_stack.config.settings import WatchSettings
from mlx_stack.contract.commands import Action, Answer, Command, Mailbox, parse_answer
from mlx_stack.contract.snapshot import SupervisorSnapshot
from mlx_stack.paths import StatePaths
from mlx_stack.supervisor.loop import InlineExecutor, Supervisor
from mlx_stack.supervisor.probes import ProbeResult
from mlx_stack.supervisor.processes import ProcessRecord, ProcStats
from mlx_stack.supervisor.states import ServiceState

_pids = itertools.count(1000)

FAST = WatchSettings(probe_interval_s=1.0, probe_timeout_s=2.0, failure_threshold=2,
                     start_timeout_s=10, start_timeout_max_s=60, backoff_initial_s=1.0,
                     backoff_max_s=8.0, crashloop_restarts=4, crashloop_window_s=120,
                     stop_timeout_s=3.0, stable_after_s=30)


@dataclass
class FakeChild:
    """A child process: alive until it exits by itself or a signal ends it."""

    record: ProcessRecord
    name: str
    ignores_sigterm: bool = False
    returncode: int | None = None
    signals: list[int] = field(default_factory=list)
    finished: bool = False
    stopped: bool = False  # SIGSTOP: alive, answers nothing
    cpu_s: float = 0.0  # a test advances it to show work

    def poll(self) -> int | None:
        return self.returncode

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL and self.returncode is None:
            self.returncode = -sig  # ends even a stopped process
        elif sig == signal.SIGTERM and self.returncode is None and not self.ignores_sigterm \
                and not self.stopped:
            self.returncode = -sig

    def finish(self) -> None:
        self.finished = True

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code

    @property
    def alive(self) -> bool:
        return self.returncode is None


@dataclass
class FakeLog:
    path: Path
    lines: list[str] = field(default_factory=list)
    error: str | None = None  # set by a test: the next take_error() reports it

    def write_line(self, line: bytes) -> None:
        self.lines.append(line.decode(errors="replace"))

    def mark(self, text: str) -> None:
        self.write_line(f"==== mlx-stack: {text} ====".encode())

    def take_error(self) -> str | None:
        err, self.error = self.error, None
        return err

    def close(self) -> None:
        pass

    @property
    def size(self) -> int:
        return sum(len(x) + 1 for x in self.lines)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


Health = str  # "ok", "fail" (a wrong answer), "hang" (no answer until the timeout), "raise"


class FakeRuntime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall_offset = 1_700_000_000.0
        self.children: list[FakeChild] = []
        self.logs: dict[Path, FakeLog] = {}
        self.files: dict[Path, str] = {}
        self.health: dict[str, Health] = {}  # the real request (readiness)
        self.live: dict[str, Health] = {}  # the cheap health route (liveness)
        self.taken_ports: dict[int, str] = {}
        self.rss: dict[int, int] = {}
        self.fail_writes: dict[Path, int] = {}  # path -> errno
        self.fail_spawn: dict[str, OSError] = {}
        self.stubborn: set[str] = set()
        self.boom: dict[str, Exception] = {}  # service -> raised by rss_bytes (a "bug")
        self._pending: list[tuple[float, Future[ProbeResult]]] = []
        self.probes_sent: list[str] = []

    # --- the clock -----------------------------------------------------------------------

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall_offset + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, fut in list(self._pending):
            if self.now >= deadline and not fut.done():
                fut.set_result(ProbeResult(False, 2000.0, "ReadTimeout", answered=False))
                self._pending.remove((deadline, fut))

    # --- processes -----------------------------------------------------------------------

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: FakeLog,
              lifeline: int | None) -> FakeChild:
        name = log.path.stem
        if name in self.fail_spawn:
            raise self.fail_spawn[name]
        pid = next(_pids)
        child = FakeChild(ProcessRecord(pid, pid, self.wall(), tuple(argv)), name,
                          ignores_sigterm=name in self.stubborn)
        self.children.append(child)
        return child

    def child(self, name: str) -> FakeChild | None:
        """The service's newest child that is still alive."""
        live = [c for c in self.children if c.name == name and c.alive]
        return live[-1] if live else None

    def port_free(self, port: int, host: str) -> bool:
        return port not in self.taken_ports

    def port_holder(self, port: int) -> str:
        return self.taken_ports.get(port, "nobody")

    def rss_bytes(self, record: ProcessRecord) -> int | None:
        child = next((c for c in self.children if c.record == record), None)
        if child is not None and child.name in self.boom:
            raise self.boom[child.name]
        return self.rss.get(record.pid, 100 * 2**20)

    # --- files ---------------------------------------------------------------------------

    def open_log(self, path: Path, max_bytes: int, backups: int) -> FakeLog:
        return self.logs.setdefault(path, FakeLog(path))

    def log(self, name: str) -> FakeLog:
        return next(log for p, log in self.logs.items() if p.stem == name)

    def file_size(self, path: Path) -> int | None:
        log = self.logs.get(path)
        return log.size if log is not None else None

    def tail(self, path: Path, n: int) -> list[str]:
        log = self.logs.get(path)
        return log.lines[-n:] if log is not None else []

    def write_file(self, path: Path, text: str, mode: int) -> None:
        code = self.fail_writes.get(path)
        if code is not None:
            raise OSError(code, {errno.ENOSPC: "No space left on device",
                                 errno.EACCES: "Permission denied"}.get(code, "I/O error"))
        self.files[path] = text

    # --- probes --------------------------------------------------------------------------

    def probe(self, probe: Probe, timeout_s: float) -> Future[ProbeResult]:
        return self._answer(probe, timeout_s, self.health)

    def liveness(self, probe: Probe, timeout_s: float) -> Future[ProbeResult]:
        return self._answer(probe, timeout_s, self.live)

    def proc_stats(self, record: ProcessRecord) -> ProcStats | None:
        child = next((c for c in self.children if c.record == record), None)
        if child is None or not child.alive:
            return None
        return ProcStats(child.stopped, child.cpu_s)

    def _answer(self, probe: Probe, timeout_s: float, modes: dict[str, Health]
                ) -> Future[ProbeResult]:
        name = _port_owner(probe.url, self.children)
        self.probes_sent.append(name or probe.url)
        fut: Future[ProbeResult] = Future()
        child = self.child(name) if name else None
        how = "hang" if child is not None and child.stopped else modes.get(name or "", "ok")
        if child is None:
            fut.set_result(ProbeResult(False, 0.1, "ConnectError: connection refused",
                                       answered=False))
        elif how == "raise":
            fut.set_exception(RuntimeError("prober bug"))
        elif how == "hang":
            self._pending.append((self.now + timeout_s, fut))
        elif how == "fail":
            fut.set_result(ProbeResult(False, 5.0, "HTTP 500: boom"))
        else:
            fut.set_result(ProbeResult(True, 3.0))
        return fut

    def me(self) -> ProcessRecord:
        return ProcessRecord(4242, 4242, 1.0, ("python", "-m", "mlx_stack.supervisor"))


def _port_owner(url: str, children: list[FakeChild]) -> str | None:
    port = url.rsplit(":", 1)[-1]
    for c in reversed(children):
        argv = c.record.argv
        if "--port" in argv and argv[argv.index("--port") + 1] == port:
            return c.name
    return None


_ports = itertools.count(9100)


def spec(name: str, kind: ServiceKind = ServiceKind.CHAT, tag: str = "") -> ServiceSpec:
    """A service spec of the kind given; ``tag`` changes its command line (a new definition)."""
    port = next(_ports)
    probe_kind = {ServiceKind.CHAT: ProbeKind.CHAT, ServiceKind.EMBEDDINGS: ProbeKind.EMBEDDING,
                  ServiceKind.RERANK: ProbeKind.RERANK, ServiceKind.PROXY: ProbeKind.PROXY}[kind]
    argv = ("python", "-m", f"fake.{name}", "--port", str(port), *([tag] if tag else []))
    return ServiceSpec(name=name, kind=kind, argv=argv, port=port, host="127.0.0.1",
                       probe=Probe(probe_kind, f"http://127.0.0.1:{port}"), model=f"m-{name}")


def retag(s: ServiceSpec, tag: str) -> ServiceSpec:
    return replace(s, argv=(*s.argv, tag))


class Scenario:
    """The real Supervisor on a FakeRuntime, stepped by a fake clock."""

    TICK = 0.1

    def __init__(self, home: Path, *specs: ServiceSpec, settings: WatchSettings = FAST,
                 missing: dict[str, str] | None = None, start: bool = True) -> None:
        self.rt = FakeRuntime()
        self.paths = StatePaths(home)
        self.paths.commands.mkdir(parents=True, exist_ok=True)
        servers = tuple(s for s in specs if s.kind is not ServiceKind.PROXY)
        proxy = next((s for s in specs if s.kind is ServiceKind.PROXY), None)
        self.plan: Plan | Exception = Plan(servers, proxy or spec("proxy", ServiceKind.PROXY),
                                           missing or {})
        self.settings = settings
        self.said: list[str] = []
        self.sup = Supervisor(self.paths, self._load, self.rt, reload_executor=InlineExecutor(),
                              say=self.said.append)
        if start:
            self.sup.load_initial()

    def _load(self) -> LoadedPlan:
        if isinstance(self.plan, Exception):
            raise self.plan
        return LoadedPlan(self.plan, self.settings)

    @property
    def current_plan(self) -> Plan:
        assert isinstance(self.plan, Plan)
        return self.plan

    def tick(self, dt: float = TICK) -> bool:
        alive = self.sup.tick()
        self.rt.advance(dt)
        return alive

    def run(self, seconds: float, dt: float = TICK) -> None:
        """Tick for ``seconds`` of fake time (a coarser ``dt`` for long stretches)."""
        for _ in range(round(seconds / dt)):
            self.tick(dt)

    def until(self, pred: Callable[[], bool], within: float = 60.0, what: str = "") -> float:
        """Tick until ``pred``; return the fake seconds it took."""
        start = self.rt.now
        while self.rt.now - start <= within:
            if pred():
                return self.rt.now - start
            self.tick()
        states = {n: (m.state.value, m.reason) for n, m in self.sup.services.items()}
        raise AssertionError(f"not within {within} fake s: {what}: {states}")

    def state(self, name: str) -> ServiceState:
        return self.sup.services[name].state

    def all_ready(self) -> bool:
        return all(m.state is ServiceState.READY for m in self.sup.services.values())

    def pids(self) -> dict[str, int | None]:
        return {n: (m.record.pid if m.record else None) for n, m in self.sup.services.items()}

    def drop(self, name: str, body: str | bytes) -> Path:
        """Put a file into the command folder, as a stranger (or a broken tool) would."""
        path = self.paths.commands / name
        path.write_bytes(body.encode() if isinstance(body, str) else body)
        return path

    def answer(self, cid: str) -> Answer:
        """The supervisor's answer (written through the runtime, so it is in ``rt.files``)."""
        return parse_answer(self.rt.files[self.paths.commands / f"{cid}.answer"].encode())

    def command(self, action: Action, target: str | None = None) -> Answer:
        """Send a command through the real mailbox files and tick until it is answered."""
        cmd = Command.new(action, target)
        (self.paths.commands / f"{cmd.id}.json").write_text(json.dumps(cmd.to_json()))
        for _ in range(50):
            self.tick()
            if self.paths.commands / f"{cmd.id}.answer" in self.rt.files:
                return self.answer(cmd.id)
        raise AssertionError(f"no answer to {cmd}")

    def snapshot(self) -> SupervisorSnapshot:
        return SupervisorSnapshot.from_json(json.loads(self.rt.files[self.paths.state_file]))

    @property
    def mailbox(self) -> Mailbox:
        return Mailbox(self.paths.commands)
