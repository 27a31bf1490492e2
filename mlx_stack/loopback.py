"""Which ``Host`` headers name this machine's loopback: shared by every server of the stack.

A web page can make the browser reach ``127.0.0.1:PORT`` through DNS rebinding: its own name
briefly resolves to 127.0.0.1, so the browser sends ``Host: evil.example:PORT``. A server that
only answers loopback names refuses it. The embeddings server, the chat tiers (``chat/``) and
the proxy's gate all decide with these functions, so "loopback" means one thing everywhere.
"""

from __future__ import annotations

import ipaddress
import re

_PORT = re.compile(r"(:[0-9]*)?", re.ASCII)


def host_name(header: str) -> str | None:
    """``localhost:8003`` -> ``localhost``, ``[::1]:80`` -> ``::1``; ``None`` if malformed."""
    value = header.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or not is_ipv6(name):
            return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if not name or not _PORT.fullmatch(rest):
        return None
    return name


def is_loopback(name: str) -> bool:
    """``localhost``, 127.0.0.0/8, ``::1`` (and ``::ffff:127.x.y.z``)."""
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_loopback_host_header(header: str) -> bool:
    """A ``Host`` header naming loopback, any port (``localhost:8000``, ``[::1]``...)."""
    name = host_name(header)
    return name is not None and is_loopback(name)


def is_ipv6(name: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address)
    except ValueError:
        return False
