"""Is a port free, and if not, who holds it."""

from __future__ import annotations

import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class PortHolder:
    pid: int | None
    name: str | None

    def __str__(self) -> str:
        if self.pid is None:
            return "another program (run `lsof -i :PORT` to see which)"
        return f"pid {self.pid} ({self.name or 'unknown'})"


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port`` (we try to bind it, as a server would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def holder(port: int) -> PortHolder:
    """The process listening on ``port``, when the OS lets us see it."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError, OSError):
        return PortHolder(None, None)
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            if c.pid is None:
                return PortHolder(None, None)
            try:
                return PortHolder(c.pid, psutil.Process(c.pid).name())
            except psutil.Error:
                return PortHolder(c.pid, None)
    return PortHolder(None, None)


_handed_out: set[int] = set()


def free_port() -> int:
    """A free port for a server about to start (tests, benchmarks), never the same one twice
    in a process.

    Not one from ``bind(0)``: those come from the OS's ephemeral range, which is also where
    every outgoing connection gets its local port, so in the seconds before a server binds
    (it loads a model first) a client socket may take the port and the server fails with
    "address in use". Ports below that range are only ever taken on purpose.
    """
    low = _ephemeral_low()
    candidates = list(range(max(1024, low - 12000), low)) if low > 2048 else []
    random.shuffle(candidates)
    for port in candidates[:500]:
        if port not in _handed_out and is_free(port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _handed_out.add(port)
    return port


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free ports (a tier's replicas take consecutive ports),
    chosen and handed out as :func:`free_port` does."""
    low = _ephemeral_low()
    candidates = list(range(max(1024, low - 12000), low - n)) if low > 2048 + n else []
    random.shuffle(candidates)
    for base in candidates[:500]:
        run = range(base, base + n)
        if not any(p in _handed_out for p in run) and all(is_free(p) for p in run):
            _handed_out.update(run)
            return base
    raise OSError(f"no {n} consecutive free ports below {low}")


def _ephemeral_low() -> int:
    """The first port of the OS's ephemeral range (Linux: ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152 if sys.platform == "darwin" else 32768


def connect_host(bind_host: str) -> str:
    """The address to reach a server bound to ``bind_host`` from this machine: a wildcard
    bind (``0.0.0.0``, ``::``) is reached on loopback."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host
