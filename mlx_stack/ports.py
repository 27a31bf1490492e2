"""Is a port free, and if not, who holds it."""

from __future__ import annotations

import socket
from dataclasses import dataclass

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


def free_port() -> int:
    """A port the OS says is free now (for tests and temporary servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
