"""The supervisor against real child processes: a small fake model server (tests/fakeserver.py)
on free ports, with the watchdog's timers shortened through its settings.

The supervisor's loop runs in a thread of the test process (it lives until the test ends, so
PR_SET_PDEATHSIG, which follows the spawning thread, does not fire early).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from mlx_stack.config.plan import LoadedPlan, Plan, Probe, ProbeKind, ServiceKind, ServiceSpec
from mlx_stack.config.settings import WatchSettings
from mlx_stack.errors import ConfigError
from mlx_stack.paths import StatePaths
from mlx_stack.ports import free_port
from mlx_stack.supervisor import processes
from mlx_stack.supervisor.loop import Supervisor
from mlx_stack.supervisor.runtime import OsRuntime
from mlx_stack.supervisor.states import ServiceState

FAKE = str(Path(__file__).resolve().parents[1] / "support" / "fakeserver.py")
FAST = WatchSettings(probe_interval_s=0.2, probe_timeout_s=0.5, failure_threshold=2,
                     start_timeout_s=10, start_timeout_max_s=20, backoff_initial_s=0.1,
                     backoff_max_s=0.4, crashloop_restarts=3, crashloop_window_s=30,
                     stop_timeout_s=1.0, stable_after_s=60, liveness_interval_s=0.5,
                     liveness_timeout_s=1.0, hang_after_s=3.0)
S = ServiceState


def spec(name: str, *args: str, kind: ServiceKind = ServiceKind.CHAT,
         port: int | None = None) -> ServiceSpec:
    port = port or free_port()
    probe_kind = {ServiceKind.CHAT: ProbeKind.CHAT, ServiceKind.EMBEDDINGS: ProbeKind.EMBEDDING,
                  ServiceKind.PROXY: ProbeKind.PROXY}[kind]
    argv = (sys.executable, FAKE, "--port", str(port), *args)
    return ServiceSpec(name=name, kind=kind, argv=argv, port=port, host="127.0.0.1", model="fake",
                       probe=Probe(probe_kind, f"http://127.0.0.1:{port}"))


class Harness:
    """A supervisor running in a thread; `plan` can be swapped to simulate stack file edits."""

    def __init__(self, home: Path, plan: Plan, settings: WatchSettings = FAST) -> None:
        self.paths = StatePaths(home)
        self.paths.run.mkdir(parents=True, exist_ok=True)  # a test may plant files first
        self.plan: Plan | Exception = plan
        self.settings = settings
        self.runtime = OsRuntime()
        self.lifeline = os.pipe()  # as the supervisor process has: children run guarded
        self.sup = Supervisor(self.paths, self._load, self.runtime, lifeline=self.lifeline[0])
        self.thread = threading.Thread(target=self.sup.run, daemon=True)

    def _load(self) -> LoadedPlan:
        if isinstance(self.plan, Exception):
            raise self.plan
        return LoadedPlan(self.plan, self.settings)

    def state(self, name: str) -> ServiceState:
        return self.sup.services[name].state

    def pid(self, name: str) -> int | None:
        rec = self.sup.services[name].record
        return rec.pid if rec else None

    def wait(self, pred: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        states = {n: (m.state.value, m.reason) for n, m in self.sup.services.items()}
        raise AssertionError(f"timed out waiting for {what}: {states}")

    def wait_state(self, name: str, state: ServiceState, timeout: float = 20.0) -> None:
        self.wait(lambda: self.state(name) is state, timeout, f"{name} {state.value}")


@pytest.fixture
def harness(tmp_path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*specs: ServiceSpec, missing: dict[str, str] | None = None,
             settings: WatchSettings = FAST) -> Harness:
        servers = tuple(s for s in specs if s.kind is not ServiceKind.PROXY)
        proxy = next((s for s in specs if s.kind is ServiceKind.PROXY), None)
        proxy = proxy or spec("proxy", kind=ServiceKind.PROXY)
        h = Harness(tmp_path / f"home{len(made)}", Plan(servers, proxy, missing or {}), settings)
        made.append(h)
        h.thread.start()
        return h

    yield make
    for h in made:
        h.sup.stop_requested.set()
        h.thread.join(timeout=15)
        recs = [m.record for m in h.sup.services.values() if m.record is not None]
        processes.stop_all(recs, 1)  # in case the test failed half-way
        h.runtime.close()
        for fd in h.lifeline:
            os.close(fd)


def test_everything_becomes_ready_and_the_proxy_waits_for_a_model_server(harness):
    h = harness(spec("standard", "--load-s", "1.0"), spec("embeddings", "--load-s", "1.0",
                                                          kind=ServiceKind.EMBEDDINGS))
    h.wait(lambda: h.state("standard") is S.STARTING, what="standard starting")
    assert h.state("proxy") is S.STOPPED  # not before a model server is ready
    for name in ("standard", "embeddings", "proxy"):
        h.wait_state(name, S.READY)
    snap = h.sup.snapshot()
    assert {s.name: s.state for s in snap.services} == dict.fromkeys(
        ["standard", "embeddings", "proxy"], "ready")


@pytest.mark.parametrize("name", ["standard", "embeddings", "proxy"])
def test_kill_9_of_each_kind_comes_back(harness, name):
    kinds = {"standard": ServiceKind.CHAT, "embeddings": ServiceKind.EMBEDDINGS,
             "proxy": ServiceKind.PROXY}
    h = harness(*(spec(n, kind=k) for n, k in kinds.items()))
    h.wait_state(name, S.READY)
    h.wait_state("proxy", S.READY)
    old = h.pid(name)
    os.kill(old, signal.SIGKILL)
    h.wait(lambda: h.pid(name) not in (None, old) and h.state(name) is S.READY,
           what=f"{name} back")
    m = h.sup.services[name]
    assert m.restarts == 1 and m.last_exit is not None and m.last_exit.signal == signal.SIGKILL
    text = h.paths.log_file(name).read_text()
    assert "ready -> backoff (killed by SIGKILL" in text  # the restart is marked in the log
    if name != "proxy":
        assert h.pid("proxy") is not None and h.state("proxy") is S.READY


def test_a_stopped_service_is_replaced_within_seconds(harness):
    h = harness(spec("standard"))
    h.wait_state("standard", S.READY)
    old = h.pid("standard")
    os.kill(old, signal.SIGSTOP)  # alive, port open, never answers
    t0 = time.monotonic()
    h.wait(lambda: h.pid("standard") not in (None, old) and h.state("standard") is S.READY,
           what="hung tier restarted")
    assert time.monotonic() - t0 < 10
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
    assert "hung: stopped (SIGSTOP or a debugger)" in h.paths.log_file("standard").read_text()


@pytest.mark.parametrize("kind", [ServiceKind.CHAT, ServiceKind.EMBEDDINGS])
def test_a_deadlocked_server_is_replaced(harness, kind):
    """Alive, no CPU, accepts connections, answers nothing: a deadlock in its HTTP layer."""
    name = "standard" if kind is ServiceKind.CHAT else "embeddings"
    h = harness(spec(name, "--deadlock-after", "1.5", kind=kind))
    h.wait_state(name, S.READY)
    old = h.pid(name)
    h.wait(lambda: h.pid(name) not in (None, old), timeout=20, what="replaced")
    log = h.paths.log_file(name).read_text()
    assert "no CPU time, no output: deadlocked" in log


@pytest.mark.parametrize("kind", [ServiceKind.CHAT, ServiceKind.EMBEDDINGS])
def test_a_server_busy_longer_than_every_timeout_is_never_killed(harness, kind):
    """Answers nothing for 8 s (longer than probe, liveness and hang timeouts) but burns CPU
    and logs progress: busy, not hung."""
    name = "standard" if kind is ServiceKind.CHAT else "embeddings"
    h = harness(spec(name, "--busy-after", "1.0", "--busy-for", "8", kind=kind))
    h.wait_state(name, S.READY)
    pid = h.pid(name)
    h.wait(lambda: h.sup.services[name].reason.startswith("busy: no answer"),
           timeout=15, what="seen busy")
    h.wait(lambda: "busy spell over" in h.paths.log_file(name).read_text(), timeout=20,
           what="busy spell over")
    h.wait_state(name, S.READY, timeout=10)
    assert h.pid(name) == pid and h.sup.services[name].restarts == 0

def test_a_service_that_exits_at_once_backs_off_then_goes_fatal(harness):
    h = harness(spec("standard", "--exit-after", "0.1", "--exit-code", "1"))
    h.wait(lambda: h.state("standard") is S.BACKOFF, what="backoff")
    h.wait_state("standard", S.FATAL)
    m = h.sup.services["standard"]
    assert m.restarts == FAST.crashloop_restarts
    assert "crash loop" in m.reason and "exit code 1" in m.reason
    assert m.last_exit is not None and "exiting with 1" in "\n".join(m.last_exit.log_tail)
    # `mlx-stack restart` clears it (and here it fails the same way again).
    from mlx_stack.contract.commands import Action, Command, Mailbox

    answer = Mailbox(h.paths.commands).send(Command.new(Action.RESTART, "standard"))
    assert answer.ok, answer
    h.wait(lambda: h.sup.services["standard"].restarts > FAST.crashloop_restarts, what="retry")


def test_an_unfixable_exit_is_fatal_at_once(harness):
    h = harness(spec("standard", "--exit-after", "0", "--exit-code", "2"))
    h.wait_state("standard", S.FATAL)
    assert h.sup.services["standard"].restarts == 0
    assert "restarting cannot fix" in h.sup.services["standard"].reason


def test_missing_weights_are_fatal_at_once(harness):
    h = harness(spec("embeddings", kind=ServiceKind.EMBEDDINGS),
                missing={"standard": "standard: weights of x are not here; mlx-stack pull x"})
    h.wait_state("standard", S.FATAL, timeout=5)
    assert "mlx-stack pull x" in h.sup.services["standard"].reason
    h.wait_state("embeddings", S.READY)


def test_a_port_held_by_another_program_is_fatal_with_its_pid(harness):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        h = harness(spec("standard", port=port))
        h.wait_state("standard", S.FATAL, timeout=5)
    assert f"port {port} is held by pid {os.getpid()}" in h.sup.services["standard"].reason


def test_shutdown_kills_a_child_that_ignores_sigterm_after_the_timeout(harness):
    h = harness(spec("standard", "--ignore-sigterm"))
    h.wait_state("proxy", S.READY)
    pid = h.pid("standard")
    t0 = time.monotonic()
    h.sup.stop_requested.set()
    h.thread.join(timeout=15)
    took = time.monotonic() - t0
    assert not h.thread.is_alive()
    assert FAST.stop_timeout_s <= took < FAST.stop_timeout_s + 5
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert h.state("proxy") is S.STOPPED and h.state("standard") is S.STOPPED


def test_logs_rotate_under_a_flood_without_losing_or_cutting_lines(harness):
    settings = replace(FAST, log_max_mb=200_000 / 2**20, log_backups=3)
    h = harness(spec("standard", "--flood", "20000"), settings=settings)
    h.wait_state("standard", S.READY)
    log = h.paths.log_file("standard")
    files = [log.with_name(f"{log.name}.{i}") for i in (3, 2, 1)] + [log]
    assert all(f.exists() for f in files)
    assert not log.with_name(f"{log.name}.4").exists()
    numbers = []
    for f in files:
        assert f.stat().st_size <= settings.log_max_bytes
        for line in f.read_text().splitlines():
            if line.startswith("flood line"):
                assert re.fullmatch(r"flood line \d{7} x{80}", line), line  # never cut
                numbers.append(int(line.split()[2]))
    assert numbers == list(range(numbers[0], 20000))  # contiguous, in order, up to the last


def test_services_import_nothing_from_run_and_write_no_log_through_a_link(harness, tmp_path):
    """A module planted in ``run/`` (every service's working folder) is not imported, and a
    link planted as a service's log is replaced, not written through (tests/support/
    fakeserver.py imports json, as every real service does)."""
    home = tmp_path / "home0"  # the harness's first state folder
    (home / "run").mkdir(parents=True)
    marker = tmp_path / "imported"
    for name in ("json", "threading", "http"):
        (home / "run" / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write('{name}')\nraise SystemExit(97)\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (home / "logs").mkdir()
    (home / "logs" / "standard.log").symlink_to(victim)
    h = harness(spec("standard"))
    for name in ("standard", "proxy"):
        h.wait_state(name, S.READY)
    assert not marker.exists()
    log = h.paths.log_file("standard")
    assert victim.read_text() == "precious\n"
    assert not log.is_symlink() and "starting standard" in log.read_text()
    h.wait(lambda: any("was a symbolic link" in w for w in h.sup.report.recent()),
           what="the replaced link reported")


def test_an_edit_restarts_only_what_changed_and_a_bad_edit_changes_nothing(harness):
    a, b = spec("standard"), spec("fast")
    h = harness(a, b)
    h.wait_state("proxy", S.READY)
    h.wait_state("fast", S.READY)
    pids = {n: h.pid(n) for n in ("standard", "fast", "proxy")}
    h.plan = ConfigError("stack.yaml", ["stack.yaml:3: tiers.fast.port: expected integer"])
    h.sup.reload_requested.set()
    h.wait(lambda: h.sup.stack_error is not None, what="stack error")
    time.sleep(0.5)
    assert {n: h.pid(n) for n in pids} == pids
    assert "tiers.fast.port" in (h.sup.snapshot().stack_error or "")
    changed = replace(b, argv=(*b.argv, "--tag", "v2"))
    h.plan = Plan((a, changed), h.sup.services["proxy"].spec, {})
    h.sup.reload_requested.set()
    h.wait(lambda: h.pid("fast") not in (None, pids["fast"]) and h.state("fast") is S.READY,
           what="fast restarted")
    assert h.sup.stack_error is None
    assert h.pid("standard") == pids["standard"] and h.pid("proxy") == pids["proxy"]


def test_the_start_deadline_extends_while_the_model_is_loading(harness):
    """A start with no progress for start_timeout_s fails; one that keeps logging does not."""
    settings = replace(FAST, start_timeout_s=1.0, start_timeout_max_s=30)
    h = harness(spec("standard", "--load-s", "3"),  # prints "loading..." every 0.2 s
                spec("fast", "--load-s", "3", "--silent"), settings=settings)
    h.wait_state("standard", S.READY, timeout=15)
    fast = h.sup.services["fast"]
    assert fast.restarts >= 1  # its silent 3 s load outlived the 1 s grace at least once
    assert "not ready after" in h.paths.log_file("fast").read_text()
