"""Everything the supervisor's loop does to the world, behind one seam.

The loop (``loop.py``) decides; a :class:`Runtime` acts: it spawns and signals children, checks
ports, reads memory and log sizes, runs probes, writes files, and tells the time. The real one,
:class:`OsRuntime`, does it for real; the unit tests pass a fake (``tests/support/fakeruntime.py``)
with a scripted clock, processes and probe answers, so any scenario (a crash, a hang, a full
disk, a garbage command) runs in milliseconds with no subprocess and no sleep.

Every method may raise ``OSError`` where the operation touches the operating system; the loop
contains those (a warning, a retry), it never lets one end the supervisor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import psutil

from mlx_stack import ports
from mlx_stack.atomic import write_atomic
from mlx_stack.config.plan import Probe
from mlx_stack.logfiles import tail
from mlx_stack.private import owner_only
from mlx_stack.supervisor import processes
from mlx_stack.supervisor.logsink import LogSink, RotatingLog
from mlx_stack.supervisor.probes import ProbeResult, run_liveness, run_probe
from mlx_stack.supervisor.processes import ProcessRecord, ProcStats


class ChildProcess(Protocol):
    """A started service process, as the loop sees it."""

    record: ProcessRecord

    def poll(self) -> int | None:
        """The exit code once it has ended (negative: killed by that signal), else None."""

    def signal_group(self, sig: int) -> None:
        """Signal its whole process group (a vanished group is not an error)."""

    def finish(self) -> None:
        """After exit: end what is left of its group and drain its output."""


class Runtime(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: LogSink,
              lifeline: int | None) -> ChildProcess:
        """Start a child in its own session, its output into ``log``; OSError if it cannot."""

    def port_free(self, port: int, host: str) -> bool: ...

    def port_holder(self, port: int) -> str:
        """Who holds a port, for the message that says what to stop."""

    def rss_bytes(self, record: ProcessRecord) -> int | None: ...

    def file_size(self, path: Path) -> int | None:
        """None if the file is absent or unreadable."""

    def tail(self, path: Path, n: int) -> list[str]: ...

    def probe(self, probe: Probe, timeout_s: float) -> Future[ProbeResult]:
        """Start a probe; the loop collects the result once the future is done."""

    def liveness(self, probe: Probe, timeout_s: float) -> Future[ProbeResult]:
        """Start a liveness check (the service's cheap health route)."""

    def proc_stats(self, record: ProcessRecord) -> ProcStats | None:
        """Stopped state and CPU time, or None if the process is gone."""

    def open_log(self, path: Path, max_bytes: int, backups: int) -> LogSink: ...

    def write_file(self, path: Path, text: str, mode: int) -> None:
        """Atomic: readers see the old file or the new one."""

    def me(self) -> ProcessRecord:
        """The supervisor's own identity, for the snapshot."""


class OsRuntime:
    """The real runtime: processes, sockets, files, clocks and HTTP probes of this machine."""

    def __init__(self, probe_workers: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=probe_workers, thread_name_prefix="probe")
        me = psutil.Process()
        self._me = ProcessRecord(os.getpid(), os.getpid(), me.create_time(), tuple(me.cmdline()))

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: LogSink,
              lifeline: int | None) -> ChildProcess:
        return processes.start_child(argv, env, cwd, log, lifeline=lifeline)

    def port_free(self, port: int, host: str) -> bool:
        return ports.is_free(port, host)

    def port_holder(self, port: int) -> str:
        return str(ports.holder(port))

    def rss_bytes(self, record: ProcessRecord) -> int | None:
        return processes.rss_bytes(record)

    def file_size(self, path: Path) -> int | None:
        try:
            return path.stat().st_size
        except OSError:
            return None

    def tail(self, path: Path, n: int) -> list[str]:
        return tail(path, n)

    def probe(self, probe: Probe, timeout_s: float) -> Future[ProbeResult]:
        return self._pool.submit(run_probe, probe, timeout_s)

    def liveness(self, probe: Probe, timeout_s: float) -> Future[ProbeResult]:
        return self._pool.submit(run_liveness, probe, timeout_s)

    def proc_stats(self, record: ProcessRecord) -> ProcStats | None:
        return processes.proc_stats(record)

    def open_log(self, path: Path, max_bytes: int, backups: int) -> LogSink:
        return RotatingLog(path, max_bytes, backups)

    def write_file(self, path: Path, text: str, mode: int) -> None:
        # Everything the supervisor writes is in the state folder, which is the user's alone:
        # whatever mode is asked for, group and others get nothing (private.py).
        write_atomic(path, text, mode=owner_only(mode))

    def me(self) -> ProcessRecord:
        return self._me

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
