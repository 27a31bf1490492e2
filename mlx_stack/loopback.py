"""Which ``Host`` headers name this machine's loopback: shared by every server of the stack.

(And how a browser spells a web page's ``Origin``, to compare it with an allowed list.)

A web page can make the browser reach ``127.0.0.1:PORT`` through DNS rebinding: its own name
briefly resolves to 127.0.0.1, so the browser sends ``Host: evil.example:PORT``. A server that
only answers loopback names refuses it. The embeddings server, the chat tiers (``chat/``) and
the proxy's gate all decide with these functions, so "loopback" means one thing everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

_PORT = re.compile(r"(:[0-9]*)?", re.ASCII)
_DEFAULT_PORTS = {"http": 80, "https": 443}


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


def normal_origin(text: str) -> str | None:
    """``HTTP://LocalHost:80`` -> ``http://localhost``; ``None`` if not an origin."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    if not (parts.scheme and parts.hostname) or parts.username or parts.password:
        return None
    if parts.path or parts.query or parts.fragment or text.endswith(("?", "#")):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


def is_ipv6(name: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address)
    except ValueError:
        return False
