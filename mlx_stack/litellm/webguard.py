"""Who may reach the proxy from a browser: the ``Host`` (DNS rebinding) and ``Origin`` checks.

LiteLLM answers every web origin with ``Access-Control-Allow-Origin: *`` and serves any
``Host``. The master key keeps strangers out of the models, but a page the user opens can still
reach the proxy: through DNS rebinding it is same-origin and may read what it gets, and with
``*`` any page may call it (with a key it stole or guessed, or routes that need none). So this
ASGI middleware, the first thing a request meets in the proxy process:

- refuses a ``Host`` that is not loopback (any port), unless ``proxy.host`` binds another
  address (then that one too) or every address (``0.0.0.0``/``::``: any host, since the LAN
  names of a machine cannot be listed; the key then is the defence);
- refuses an ``Origin`` not in ``proxy.cors_origins`` (empty by default), and a browser's
  cross-site request without one (``Sec-Fetch-Site: cross-site``);
- rewrites LiteLLM's CORS answer: the exact allowed origin instead of ``*``; none at all
  for a request without an ``Origin``.

Its settings come from the supervisor in ``MLX_STACK_WEB_ACCESS`` (JSON, no secret).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlx_stack.loopback import host_name, is_loopback, normal_origin

ACCESS_ENV = "MLX_STACK_WEB_ACCESS"
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
_CORS_PREFIX = b"access-control-"


@dataclass(frozen=True)
class WebAccess:
    """The hosts beyond loopback (``any_host``: all) and the origins the proxy serves."""

    hosts: frozenset[str] = frozenset()
    any_host: bool = False
    origins: frozenset[str] = frozenset()

    @classmethod
    def for_bind(cls, bind_host: str, origins: tuple[str, ...] = ()) -> WebAccess:
        bound = bind_host.strip("[]").lower()
        wildcard = bound in WILDCARD_BINDS
        hosts = frozenset() if wildcard or is_loopback(bound) else frozenset({bound})
        normal = frozenset(o for o in (normal_origin(x.rstrip("/")) for x in origins) if o)
        return cls(hosts, wildcard, normal)

    def to_env(self) -> str:
        return json.dumps({"hosts": sorted(self.hosts), "any_host": self.any_host,
                           "origins": sorted(self.origins)})  # fmt: skip

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WebAccess:
        """Loopback only and no origin when the variable is absent or unreadable."""
        try:
            raw = json.loads(env.get(ACCESS_ENV) or "{}")
            return cls(frozenset(raw.get("hosts", ())), bool(raw.get("any_host")),
                       frozenset(raw.get("origins", ())))  # fmt: skip
        except (ValueError, TypeError, AttributeError):
            return cls()

    def allows_host(self, header: str) -> bool:
        name = host_name(header)
        return name is not None and (self.any_host or is_loopback(name) or name in self.hosts)

    def refusal(self, hosts: list[str], origins: list[str], fetch_site: str | None) -> str | None:
        """Why a request is refused (an OpenAI error code and message), or ``None``."""
        if len(hosts) > 1 or (hosts and not self.allows_host(hosts[0])):
            return (f"Host {', '.join(hosts)!r} is not served here: the proxy answers loopback "
                    "names and the address of proxy.host; a web page may be trying to reach it "
                    "through DNS rebinding")  # fmt: skip
        if len(origins) > 1 or (origins and normal_origin(origins[0]) not in self.origins):
            return (f"requests from web pages are refused unless their origin is listed in the "
                    f"stack file's proxy.cors_origins, and {', '.join(origins)!r} is not")
        if not origins and fetch_site == "cross-site":
            return ("a web page on another site sent this request (Sec-Fetch-Site: "
                    "cross-site); list its origin in proxy.cors_origins to allow it")
        return None


class WebGuard:
    """ASGI middleware applying a :class:`WebAccess` before LiteLLM (and its CORS) run."""

    def __init__(self, app: Any, access: WebAccess) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or [])
        hosts = [v.decode("latin-1") for k, v in headers if k == b"host"]
        origins = [v.decode("latin-1") for k, v in headers if k == b"origin"]
        site = next((v.decode("latin-1") for k, v in headers if k == b"sec-fetch-site"), None)
        problem = self.access.refusal(hosts, origins, site)
        if problem is not None:
            await _forbidden(send, problem)
            return
        origin = normal_origin(origins[0]) if origins else None
        await self.app(scope, receive, _cors_rewriter(send, origin))


def _cors_rewriter(send: Any, origin: str | None) -> Any:
    async def rewrite(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", [])
                    if not k.lower().startswith(_CORS_PREFIX)
                    or (origin is not None and k.lower() != b"access-control-allow-origin")]
            if origin is not None:
                kept += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
            message = {**message, "headers": kept}
        await send(message)

    return rewrite


async def _forbidden(send: Any, message: str) -> None:
    code = "host_not_allowed" if message.startswith("Host") else "origin_not_allowed"
    raw = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                "param": None, "code": code}}).encode()  # fmt: skip
    await send({"type": "http.response.start", "status": 403, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
        (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": raw})
