"""Child processes: start one in its own process group with its output appended to a log,
recognise it later without trusting a bare PID, and stop its whole group.

A PID alone is not an identity (PIDs are reused, after a reboot in particular), so every record
keeps the process's start time and command line, and nothing is signalled unless both match.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from mlx_stack.errors import ServiceStartError

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


def spawn(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> ProcessRecord:
    """Start ``argv`` in a new session (its own process group), output appended to ``log_path``.

    The log is opened in append mode, so a restart never truncates what came before.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(
            f"\n==== mlx-stack: starting {' '.join(argv)} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode()
        )
        log.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ServiceStartError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        create_time = 0.0  # it already exited; the caller's readiness wait will report it
    # Popen's object is dropped: the child lives on after `up` returns. Its exit status is
    # reaped by whoever waits (`wait_exit`) or by init once we are gone.
    return ProcessRecord(proc.pid, proc.pid, create_time, tuple(argv))


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


def uptime_s(rec: ProcessRecord) -> float:
    return max(0.0, time.time() - rec.create_time)


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
