"""Child processes: start one in its own process group with its output pumped into a log,
recognise it later without trusting a bare PID, and stop its whole group.

A PID alone is not an identity (PIDs are reused, after a reboot in particular), so every record
keeps the process's start time and command line, and nothing is signalled unless both match.

``python -m X`` puts its working folder first on ``sys.path``, so a ``json.py`` left in it
would be imported instead of the real one. Our Python processes (the supervisor, and every
service through the child guard) therefore start with ``-P`` (Python 3.11+) or, on 3.10, a
one-line bootstrap that drops that entry before anything else is imported
(:func:`python_module`); services also get ``PYTHONSAFEPATH=1`` for the Python processes they
start themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from mlx_stack.supervisor.logsink import LogSink, pump

#: On Python 3.10 (no ``-P``): drop the working folder ('' first on sys.path under ``-c``)
#: before any import, then run the module as ``-m`` would.
_NO_CWD_BOOT = ("import sys; sys.path[:1] == [''] and sys.path.pop(0); import runpy; "
                "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")
#: Inherited by every service, so that Python processes it starts do not import from their
#: working folder either (ignored before Python 3.11).
SAFE_PATH_ENV = {"PYTHONSAFEPATH": "1"}

#: How close a recorded start time must be to the live process's (psutil rounds differently
#: across platforms).
_CREATE_TIME_SLACK_S = 0.05


@dataclass(frozen=True)
class ProcessRecord:
    """Who a started child is: enough to find it again and to be sure it is still the same one."""

    pid: int
    pgid: int
    create_time: float
    argv: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["argv"] = list(self.argv)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ProcessRecord:
        return cls(
            int(d["pid"]), int(d["pgid"]), float(d["create_time"]), tuple(str(a) for a in d["argv"])
        )


def _linux_pdeathsig() -> None:
    """In the child, before exec: die with SIGKILL when the parent dies (Linux only).

    The signal follows the *thread* that forked, so children must be started from a thread
    that lives as long as the supervisor (its main loop).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


@dataclass
class Child:
    """A started service process: the Popen, its identity record, and its log pump thread."""

    popen: subprocess.Popen[bytes]
    record: ProcessRecord
    pump: threading.Thread

    def poll(self) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal)."""
        return self.popen.poll()

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.record.pgid, sig)

    def finish(self) -> None:
        """After exit: kill what is left of its group and drain the rest of its output."""
        self.signal_group(signal.SIGKILL)
        self.pump.join(timeout=2)


def python_module(module: str, safe_path_flag: bool | None = None) -> list[str]:
    """The command that runs ``python -m module`` without importing from the working folder.

    ``safe_path_flag`` (default: Python >= 3.11) picks ``-P``; otherwise the 3.10 bootstrap.
    """
    if safe_path_flag if safe_path_flag is not None else sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module]
    return [sys.executable, "-c", _NO_CWD_BOOT, module]


def guarded(argv: Sequence[str], lifeline: int) -> list[str]:
    """``argv`` run through ``mlx_stack.supervisor.childguard`` when it is a Python program of ours.

    The guard ends the child's process group when ``lifeline`` (the read end of a pipe only the
    supervisor writes) reaches end-of-file: the supervisor's death, on macOS too.
    """
    if len(argv) > 1 and argv[0] == sys.executable:
        return [*python_module("mlx_stack.supervisor.childguard"), "--fd", str(lifeline),
                *argv[1:]]
    return list(argv)


def start_child(argv: Sequence[str], env: Mapping[str, str], cwd: Path,
                log: LogSink, lifeline: int | None = None) -> Child:
    """Start ``argv`` in a new session (its own process group), its output pumped into ``log``.

    It dies with its supervisor even on SIGKILL: through PR_SET_PDEATHSIG on Linux, and through
    the ``lifeline`` pipe (see ``guarded``) on every OS. Its environment gets
    ``PYTHONSAFEPATH=1``. Raises OSError if it cannot be run.
    """
    preexec = _linux_pdeathsig if sys.platform.startswith("linux") else None
    if lifeline is not None:
        argv = guarded(argv, lifeline)
    popen = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**env, **SAFE_PATH_ENV}, cwd=cwd, start_new_session=True, close_fds=True,
        preexec_fn=preexec, pass_fds=() if lifeline is None else (lifeline,),
    )
    try:
        create_time = psutil.Process(popen.pid).create_time()
    except psutil.Error:
        create_time = 0.0  # it already exited; the caller sees that at its next poll
    assert popen.stdout is not None
    thread = threading.Thread(target=pump, args=(popen.stdout, log), daemon=True,
                              name=f"log-{log.path.stem}")
    thread.start()
    return Child(popen, ProcessRecord(popen.pid, popen.pid, create_time, tuple(argv)), thread)


def is_running(rec: ProcessRecord) -> bool:
    """True if the recorded process is alive and is the very process we started."""
    try:
        p = psutil.Process(rec.pid)
        if abs(p.create_time() - rec.create_time) > _CREATE_TIME_SLACK_S:
            return False
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = tuple(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return False
    return cmd == rec.argv or not cmd


def exit_code(rec: ProcessRecord) -> int | None:
    """The exit status of a child of this process that has ended, if we can still reap it."""
    try:
        pid, status = os.waitpid(rec.pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if pid == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(rec: ProcessRecord, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(rec.pgid, sig)


def stop_all(records: Sequence[ProcessRecord], timeout_s: float = 10.0) -> dict[int, str]:
    """SIGTERM each record's whole group, wait up to ``timeout_s``, then SIGKILL what is left.

    Groups are signalled only if their leader is still the process we started (a reused PID is
    never touched); a group whose leader died but whose members live on is still ended, since
    its group id cannot be reused while any member lives. Returns how each pid ended.
    """
    outcome: dict[int, str] = {}
    live: list[ProcessRecord] = []
    for rec in records:
        leader_ok = is_running(rec)
        if leader_ok or (_group_alive(rec.pgid) and not _pid_reused(rec)):
            _signal_group(rec, signal.SIGTERM)
            live.append(rec)
        else:
            outcome[rec.pid] = "not running"
    deadline = time.monotonic() + timeout_s
    while live and time.monotonic() < deadline:
        for rec in list(live):
            exit_code(rec)  # reap our own children so they do not linger as zombies
            if not _group_alive(rec.pgid):
                outcome[rec.pid] = "terminated"
                live.remove(rec)
        if live:
            time.sleep(0.05)
    for rec in live:
        _signal_group(rec, signal.SIGKILL)
        outcome[rec.pid] = "killed after timeout"
    kill_deadline = time.monotonic() + 5
    while live and time.monotonic() < kill_deadline:
        for rec in list(live):
            exit_code(rec)
            if not _group_alive(rec.pgid):
                live.remove(rec)
        time.sleep(0.02)
    return outcome


def _pid_reused(rec: ProcessRecord) -> bool:
    """True if ``rec.pid`` now belongs to another process than the one recorded."""
    try:
        p = psutil.Process(rec.pid)
        return abs(p.create_time() - rec.create_time) > _CREATE_TIME_SLACK_S
    except psutil.Error:
        return False


def rss_bytes(rec: ProcessRecord) -> int | None:
    """Resident memory of the whole process tree (a server may fork workers)."""
    try:
        p = psutil.Process(rec.pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += c.memory_info().rss
        return total
    except psutil.Error:
        return None


@dataclass(frozen=True)
class ProcStats:
    """What the OS shows of a running service: is it stopped, how much CPU has it used."""

    stopped: bool
    cpu_s: float


def proc_stats(rec: ProcessRecord) -> ProcStats | None:
    """Stopped state and CPU time (user + system) of the process and its children."""
    try:
        p = psutil.Process(rec.pid)
        stopped = p.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        times = p.cpu_times()
        cpu = times.user + times.system
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                ct = c.cpu_times()
                cpu += ct.user + ct.system
        return ProcStats(stopped, cpu)
    except psutil.Error:
        return None
