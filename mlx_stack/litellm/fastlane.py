"""Runs in the proxy: embeddings requests go straight to the embeddings server, past LiteLLM.

LiteLLM's own path for one embedding request (its ~20 middlewares, key auth, router, retry
wrapper, callbacks, cost calculation, response rebuilt through pydantic) cost 20-27 ms of CPU
per request on a 2-core AMD EPYC (its own ``x-litellm-overhead-duration-ms`` said 27): more
than computing the vector. None of it does anything for the local embeddings tier: there is no
spend database, no callback, no fallback (vectors from another model live in another space),
and the body was already checked by the server's own rules (``bodycheck.py``). So a POST to
``/v1/embeddings`` (or ``/embeddings``) that carries the proxy's key and names an embeddings
deployment of the generated config is forwarded here, verbatim, over pooled keep-alive
connections, with the backend key; the server answers to the proxy's model name (its alias)
and echoes it. Anything else goes on to LiteLLM unchanged. A server that cannot be reached
gives a 503 in OpenAI's error shape, which the gate (``gate.py``) holds and resends.

With ``replicas: N`` the lane balances over the tier's ready servers itself (LiteLLM's router
balances its own deployments only for requests that reach it). A model name that has any
deployment other than the stack's own servers is left to LiteLLM's router.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlx_stack.backendkey import KEY_ENV, LITELLM_API_KEY
from mlx_stack.litellm.gate import (
    RETRY_AFTER_S,
    STATE_ENV,
    Route,
    StateView,
    carries_key,
    read_body,
    replay,
    routes_from_env,
)

Scope = dict[str, Any]
Message = dict[str, Any]

PATHS = frozenset({"/v1/embeddings", "/embeddings"})
OFF_LOOP_BYTES = 256 * 1024
"""Bodies from this size are parsed in a worker thread, so the proxy keeps answering."""
_PASSED_HEADERS = ("content-type", "retry-after", "x-mlx-stack-truncated-inputs")
_SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"))
"""What LiteLLM's own security middleware adds to every answer."""
_LOOPBACK = "http://127.0.0.1:"
SUSPECT_S = 1.0
"""How long a replica that dropped a connection gets no request (the supervisor's snapshot
says more within a second: it is then down, restarting, or ready again)."""


@dataclass(frozen=True)
class Upstream:
    """One server of an embeddings model name: where to post, and the supervisor's name for it
    (what the snapshot says about it; "" when the proxy runs without a supervisor's view)."""

    url: str
    timeout: float
    service: str = ""


def upstreams_from_config(path: Path, routes: Mapping[str, Route] | None = None,
                          ) -> dict[str, tuple[Upstream, ...]]:
    """Embeddings model name -> its servers, from the generated LiteLLM config (``config.py``
    writes ``model_info.mode: embedding``).

    Only names served by the stack's own servers alone: a name with any other deployment (a
    remote stack, an external server) is left to LiteLLM's router, which balances, retries
    and cools down across all of them. With ``routes`` (the supervisor's), a server is the
    stack's own when its port is one of the route's replicas; without, when it is on
    127.0.0.1.
    """
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    found: dict[str, list[Upstream | None]] = {}
    for entry in config.get("model_list") or []:
        params = entry.get("litellm_params") or {}
        if (entry.get("model_info") or {}).get("mode") != "embedding":
            continue
        name = str(entry["model_name"])
        base = str(params.get("api_base", "")).rstrip("/")
        # An external server (``normalize.py``) never gets the stack's backend key: with the
        # routes, its port is no replica's; without, its key is not the backend key.
        foreign = routes is None and params.get("api_key") != LITELLM_API_KEY
        own = None if foreign else _own_service(name, base, routes)
        found.setdefault(name, []).append(None if own is None else Upstream(
            base + "/embeddings", float(params.get("timeout", 120)), own))
    return {name: tuple(u for u in ups if u is not None) for name, ups in found.items()
            if all(u is not None for u in ups)}


def _own_service(name: str, base: str, routes: Mapping[str, Route] | None) -> str | None:
    """The supervisor's service behind ``base`` if it is the stack's own server, else None."""
    if not base.startswith(_LOOPBACK):
        return None
    if routes is None:
        return ""
    route = routes.get(name)
    port = base[len(_LOOPBACK):].split("/", 1)[0]
    for service, p in route.replicas if route is not None else ():
        if str(p) == port:
            return service
    return None


class FastLane:
    """ASGI middleware: answer the stack's embedding requests from its servers directly.

    With replicas, each request goes to the ready replica with the fewest requests in flight
    (ties in turn), as the supervisor's snapshot (``view``) shows them: a replica being drained
    before a rolling replacement, restarted or down gets no new request. A server that
    refuses or drops the connection (killed) is left aside for ``SUSPECT_S`` and the request
    goes to the next one: an embedding request can be sent twice without harm.
    """

    def __init__(self, app: Any, upstreams: Mapping[str, Sequence[Upstream]], key: str,
                 backend_key: str, view: StateView | None = None) -> None:
        self.app = app
        self.upstreams = {name: tuple(ups) for name, ups in upstreams.items() if ups}
        self.key = key.encode()
        self.backend_key = backend_key
        self.view = view
        self._session: Any = None
        self._outstanding: dict[str, int] = {}
        self._suspect_until: dict[str, float] = {}
        self._turn = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path") not in PATHS or not self.upstreams
                or not carries_key(scope, self.key)):
            await self.app(scope, receive, send)
            return
        body, more = await read_body(receive)
        model = None if more else await self._model(body)
        if model is None:
            await self.app(scope, replay(body, more, receive), send)
            return
        await self._forward(self.candidates(model), body, send)

    async def _model(self, body: bytes) -> str | None:
        try:
            parsed = (json.loads(body) if len(body) < OFF_LOOP_BYTES
                      else await asyncio.to_thread(json.loads, body))
        except (ValueError, RecursionError):
            return None  # not ours to answer: LiteLLM (and the body check) say why
        model = parsed.get("model") if isinstance(parsed, dict) else None
        return model if isinstance(model, str) and model in self.upstreams else None

    def candidates(self, model: str) -> list[Upstream]:
        """The servers to try for ``model``, best first (see the class docstring)."""
        ups = self.upstreams[model]
        if len(ups) == 1:
            return list(ups)
        states = self.view.states() if self.view is not None else {}
        ready = [u for u in ups if not states or states.get(u.service) == "ready"]
        ready = _one_model(ready, self.view) if self.view is not None else ready
        now = time.monotonic()
        usable = [u for u in ready if self._suspect_until.get(u.url, 0.0) <= now]
        pool = usable or ready or list(ups)  # none ready: try anyway, the gate holds a 503
        self._turn += 1
        n = len(pool)
        order = sorted(range(n), key=lambda i: (self._outstanding.get(pool[i].url, 0),
                                                (i - self._turn) % n))
        first = [pool[i] for i in order]
        return first + [u for u in ready if u not in first]

    async def _forward(self, candidates: list[Upstream], body: bytes, send: Any) -> None:
        for i, target in enumerate(candidates):
            self._outstanding[target.url] = self._outstanding.get(target.url, 0) + 1
            try:
                answer = await self._post(target, body)
            except _Unreachable as exc:
                self._suspect_until[target.url] = time.monotonic() + SUSPECT_S
                if i + 1 < len(candidates) and not exc.timed_out:
                    continue  # dropped or refused: the next replica answers instead
                answer = _unavailable(exc.reason)
            else:
                self._suspect_until.pop(target.url, None)
            finally:
                self._outstanding[target.url] -= 1
            break
        status, passed, payload = answer
        await send({"type": "http.response.start", "status": status, "headers": [
            *passed, *_SECURITY_HEADERS, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def _post(self, target: Upstream, body: bytes) -> _Answer:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256), trust_env=False)
        headers = {"content-type": "application/json",
                   "authorization": f"Bearer {self.backend_key}"}
        try:
            async with self._session.post(
                target.url, data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=target.timeout),
            ) as response:
                payload = await response.read()
                passed = [(k.lower().encode(), v.encode()) for k, v in response.headers.items()
                          if k.lower() in _PASSED_HEADERS]
                return response.status, passed, payload
        except asyncio.TimeoutError as exc:
            raise _Unreachable(type(exc).__name__, timed_out=True) from None
        except aiohttp.ClientError as exc:
            raise _Unreachable(type(exc).__name__) from None


_Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


class _Unreachable(Exception):
    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


def _one_model(ready: list[Upstream], view: StateView) -> list[Upstream]:
    """During a rolling model change, replicas run two models: vectors of both must not be
    mixed. Once a replica with the new model is ready (the most recently started), only
    replicas of that model are used."""
    models = {view.models.get(u.service) for u in ready}
    if len(models) <= 1:
        return ready
    newest = max(ready, key=lambda u: view.started.get(u.service, 0.0))
    return [u for u in ready if view.models.get(u.service) == view.models.get(newest.service)]


def _unavailable(reason: str) -> _Answer:
    payload = json.dumps({"error": {
        "message": f"the embeddings server did not answer ({reason}); "
                   "retry in a few seconds (`mlx-stack status` shows its state)",
        "type": "service_unavailable", "param": None, "code": "upstream_unavailable",
    }}).encode()
    return 503, [(b"content-type", b"application/json"),
                 (b"retry-after", str(RETRY_AFTER_S).encode())], payload
def options_from_env(config: Path | None, env: Mapping[str, str]) -> dict[str, Any] | None:
    """FastLane's arguments, when the proxy has a generated config, its key and a backend key
    (and, from the supervisor, its routes and snapshot: which replica is ready)."""
    from mlx_stack.config.proxykey import ENV_VAR

    if config is None or not config.is_file() or not env.get(ENV_VAR) or not env.get(KEY_ENV):
        return None
    routes = routes_from_env(env) or None
    upstreams = upstreams_from_config(config, routes)
    if not upstreams:
        return None
    state = env.get(STATE_ENV)
    return {"upstreams": upstreams, "key": env[ENV_VAR], "backend_key": env[KEY_ENV],
            "view": StateView(Path(state)) if state and routes else None}
