"""Who may reach the server: the ``Host`` header (DNS rebinding) and ``Origin`` (web pages).

Any web page the user opens can make the browser send requests to ``127.0.0.1:8003``: a
cross-site form or ``fetch`` with a ``text/plain`` body needs no CORS permission (only the
answer is hidden from the page), and DNS rebinding points a page's own name at 127.0.0.1 so
that even the answer is readable. Browsers always send the name they connected to as ``Host``
and the page's origin as ``Origin`` on such requests, and programs (curl, SDKs, LiteLLM) send
no ``Origin``. So this middleware, before any route runs:

- refuses a ``Host`` that is not a loopback name or address (any port) nor an allowed host;
- refuses a request with an ``Origin`` that is not explicitly allowed (none by default), and a
  browser's cross-site request without one (``Sec-Fetch-Site: cross-site``), with no CORS
  headers, so the browser shows the page nothing;
- gives allowed origins CORS headers, and answers their preflight ``OPTIONS``;
- with a backend key (the stack's, from ``MLX_STACK_BACKEND_KEY``: see ``backendkey.py``),
  refuses every request but ``/health`` without ``Authorization: Bearer KEY`` (401).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...backendkey import bearer_matches
from ...loopback import host_name, is_ipv6, is_loopback, normal_origin
from .apierror import ApiError, ErrorKind, shown

ANY = "*"
#: Answered without the backend key: liveness checks.
OPEN_PATHS = frozenset({"/health"})
WILDCARD_BINDS = {"", "0.0.0.0", "::"}
CORS_METHODS = "GET, POST"
CORS_EXPOSED = "Retry-After, x-mlx-stack-truncated-inputs"
CORS_MAX_AGE = "600"
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?\.?", re.ASCII)


@dataclass(frozen=True)
class AccessPolicy:
    """Hosts beyond loopback (``any_host``: every one) and the web origins allowed in."""

    hosts: frozenset[str] = frozenset()
    any_host: bool = False
    origins: frozenset[str] = frozenset()
    key: str | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls, hosts: Iterable[str] = (), origins: Iterable[str] = (), bind_host: str | None = None,
        key: str | None = None,
    ) -> AccessPolicy:
        """From the options; ``ValueError`` names a bad entry. The bound address is allowed."""
        entries = [h.strip() for h in hosts if h.strip()]
        bound = (bind_host or "").strip("[]").lower()
        if bound not in WILDCARD_BINDS and not is_loopback(bound):
            entries.append(bound)
        names = frozenset(allowed_host(h) for h in entries if h != ANY)
        origin_set = frozenset(allowed_origin(o) for o in origins)
        return cls(names, ANY in entries, origin_set, key or None)

    def allows_host(self, header: str) -> bool:
        name = host_name(header)
        return name is not None and (self.any_host or is_loopback(name) or name in self.hosts)

    def allows_origin(self, header: str) -> bool:
        return normal_origin(header) in self.origins


def allowed_host(entry: str) -> str:
    """An ``--allowed-hosts`` entry, normalised: a name or address, no port."""
    name = entry.strip().lower()
    bracketed = name.startswith("[") and name.endswith("]")
    if bracketed:
        name = name[1:-1]
    if is_ipv6(name) or (_NAME.fullmatch(name) and not bracketed):
        return name
    raise ValueError(
        f"--allowed-hosts: {entry!r} is not a host name or address (give names like "
        "myhost.lan or 192.168.1.5, without a port; '*' allows every host)"
    )


def allowed_origin(entry: str) -> str:
    """An ``--allowed-origins`` entry, normalised like a browser's ``Origin`` header."""
    if entry.strip() in (ANY, "null"):
        raise ValueError(
            f"--allowed-origins: {entry.strip()!r} would let any web page you open use this "
            "server; list the origins you trust, e.g. http://localhost:3000"
        )
    origin = normal_origin(entry.strip().rstrip("/"))
    if origin is None:
        raise ValueError(
            f"--allowed-origins: {entry!r} is not an origin (scheme://host[:port], no path), "
            "e.g. http://localhost:3000"
        )
    return origin


class AccessGuard:
    """ASGI middleware applying an :class:`AccessPolicy` before routing."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, on_refusal: Callable[[str], None]):
        self.app = app
        self.policy = policy
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(headers)
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if refusal is None and not preflight and scope["path"] not in OPEN_PATHS:
            refusal = self._key_refusal(headers)
        if refusal is not None:
            self.on_refusal(refusal.kind.label)
            await refusal.response()(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
        elif preflight:
            await _preflight(origin, headers)(scope, receive, send)
        else:
            await self.app(scope, receive, _with_cors(send, origin))

    def _refusal(self, headers: Headers) -> ApiError | None:
        hosts = headers.getlist("host")
        if len(hosts) > 1 or (hosts and not self.policy.allows_host(hosts[0])):
            return ApiError(
                ErrorKind.FORBIDDEN_HOST,
                f"Host {shown(', '.join(hosts))} is not served here: only loopback names "
                "(localhost, 127.0.0.1, [::1]) and --allowed-hosts are; a web page may be "
                "trying to reach this server through DNS rebinding",
                param="host",
                code="host_not_allowed",
            )
        origins = headers.getlist("origin")
        if len(origins) > 1 or (origins and not self.policy.allows_origin(origins[0])):
            return ApiError(
                ErrorKind.FORBIDDEN_ORIGIN,
                f"requests from web pages are refused unless their origin is allowed, and "
                f"{shown(', '.join(origins))} is not; if you trust it, start the server with "
                "--allowed-origins ORIGIN",
                param="origin",
                code="origin_not_allowed",
            )
        if not origins and headers.get("sec-fetch-site") == "cross-site":
            return ApiError(
                ErrorKind.FORBIDDEN_ORIGIN,
                "a web page on another site sent this request (Sec-Fetch-Site: cross-site); "
                "web pages are refused unless their origin is in --allowed-origins",
                param="origin",
                code="origin_not_allowed",
            )
        return None


    def _key_refusal(self, headers: Headers) -> ApiError | None:
        key = self.policy.key
        if key is None or bearer_matches(headers.get("authorization"), key):
            return None
        return ApiError(
            ErrorKind.UNAUTHORIZED,
            "this backend only answers the stack: send the backend key as "
            "'Authorization: Bearer KEY' (print it with: mlx-stack key --backend), "
            "or call the proxy",
            code="invalid_api_key",
        )


def _preflight(origin: str, headers: Headers) -> Response:
    """The browser asks whether an allowed origin may send a request: yes, for 10 minutes."""
    answer = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Max-Age": CORS_MAX_AGE,
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    requested = headers.get("access-control-request-headers")
    if requested:
        answer["Access-Control-Allow-Headers"] = requested  # the origin is trusted: any header
    if headers.get("access-control-request-private-network") == "true":
        answer["Access-Control-Allow-Private-Network"] = "true"  # Chrome: public page -> loopback
    return Response(status_code=204, headers=answer)


def _with_cors(send: Send, origin: str) -> Send:
    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
            headers.add_vary_header("Origin")
        await send(message)

    return cors_send
