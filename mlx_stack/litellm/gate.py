"""Runs in the proxy: send no request to a tier the supervisor does not see ready.

LiteLLM learns that a tier is down only by failing requests on it (a refused connection is
quick; a hung server is not: the request waits). The supervisor knows sooner: it checks every
service each second and writes what it sees to ``run/state.json``. This ASGI middleware reads
that snapshot (re-read when it changes) and, while a tier is not ``ready``:

- a chat request for it goes to the first ready tier among its fallbacks (the body's ``model``
  is rewritten, as LiteLLM's own fallback would answer; header ``x-mlx-stack-routed``);
- with no ready fallback (the embeddings and rerank tiers have none: vectors or scores would
  come from another model), the request waits up to ``HOLD_S`` for the tier to be ready
  again (a restart), then gets a 503 in OpenAI's error shape with ``Retry-After``: seconds,
  never a stall;
- a request that was already on its way when the tier failed (LiteLLM answers 500 once the
  supervisor kills the hung process) is sent again when its tier, or a fallback, is ready,
  for up to ``HOLD_S``; else its error becomes a 503 with ``Retry-After``.

A tier with replicas is available while any replica is ready (and not being drained before a
rolling replacement: ``in_route`` in the snapshot); the fast lane picks among them.

When every tier is ready, requests pass unchanged and unparsed (their bodies are kept, to be
sent again). Only requests that carry the
proxy's key are answered here; others go on to LiteLLM, which refuses them (401).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROUTES_ENV = "MLX_STACK_ROUTES"
STATE_ENV = "MLX_STACK_STATE_FILE"
GATED_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions",
                         "/completions", "/v1/embeddings", "/embeddings",
                         "/rerank", "/v1/rerank", "/v2/rerank"})
MAX_BODY = 64 * 1024 * 1024
REREAD_S = 0.2
RETRY_AFTER_S = 2
WENT_DOWN_WAIT_S = 0.5
#: LiteLLM's answers when an upstream died under a request (503: the new process is loading).
FAILED_UPSTREAM = frozenset({500, 502, 503, 504})
HOLD_S = 5.0
"""How long a request with nowhere to go waits for its tier to come back (a restart of a small
model takes a few seconds) before it gets the 503: bounded, and far below a hang's minutes."""

Scope = dict[str, Any]
Message = dict[str, Any]


@dataclass(frozen=True)
class Route:
    """A model name of the proxy: the supervisor's service behind it, and where to fall back.

    ``replicas``: (service, loopback port) of every server of a tier with replicas, the first
    being ``service``; empty for a tier of one server. A name is available while any of them
    is ready; the fast lane (``fastlane.py``) balances over the ready ones."""

    service: str
    fallbacks: tuple[str, ...] = ()
    replicas: tuple[tuple[str, int], ...] = ()

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.replicas) or (self.service,)


def routes_from_env(env: Mapping[str, str]) -> dict[str, Route]:
    raw = json.loads(env.get(ROUTES_ENV) or "{}")
    return {name: Route(r["service"], tuple(r.get("fallbacks", ())),
                        tuple((str(s), int(p)) for s, p in r.get("replicas", ())))
            for name, r in raw.items()}


def routes_to_env(routes: Mapping[str, Route]) -> str:
    return json.dumps({n: {"service": r.service, "fallbacks": list(r.fallbacks),
                           **({"replicas": [list(x) for x in r.replicas]} if r.replicas else {})}
                       for n, r in sorted(routes.items())})


#: The state a replica taken out of the route shows to the proxy (``in_route: false`` in the
#: snapshot while the supervisor drains it before a rolling replacement).
DRAINING = "draining"


@dataclass(frozen=True)
class Decision:
    """Pass (``model`` None), pass with another model, or refuse with a 503."""

    model: str | None = None
    refuse: str = ""


def decide(model: str, routes: Mapping[str, Route], states: Mapping[str, str]) -> Decision:
    """Where a request for ``model`` goes, given each service's state (pure, table-tested)."""
    route = routes.get(model)
    if route is None or any(states.get(s, "ready") == "ready" for s in route.services):
        return Decision()
    for other in route.fallbacks:
        alt = routes.get(other)
        if alt is not None and any(states.get(s) == "ready" for s in alt.services):
            return Decision(model=other)
    seen = ", ".join(f"{s} is {states.get(s, 'unknown')}" for s in route.services)
    return Decision(refuse=f"model {model!r} is not available right now ({seen}; the "
                    f"supervisor is on it); retry in {RETRY_AFTER_S} s")


class StateView:
    """Each service's state from the supervisor's snapshot, re-read when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._states: dict[str, str] = {}
        #: When each service's current process started (wall clock): a restart shows here.
        self.started: dict[str, float] = {}
        #: The model each service runs (replicas of a tier differ during a model change).
        self.models: dict[str, str] = {}
        self._mtime = 0
        self._checked = 0.0

    def states(self, fresh: bool = False) -> dict[str, str]:
        now = time.monotonic()
        if self.path is None or (not fresh and now - self._checked < REREAD_S):
            return self._states
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime != self._mtime:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                services = raw["services"]
                self._states = {n: _effective_state(s) for n, s in services.items()}
                self.started = {n: float(s["started_at"]) for n, s in services.items()
                                if isinstance(s.get("started_at"), (int, float))}
                self.models = {n: str(s["model"]) for n, s in services.items()
                               if isinstance(s.get("model"), str)}
                self._mtime = mtime
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._states = {}  # no view: let LiteLLM decide, as without the gate
        return self._states


def _effective_state(service: Mapping[str, Any]) -> str:
    """A service's state as the proxy routes by it: a ready replica being drained is not."""
    state = str(service.get("state"))
    return DRAINING if state == "ready" and service.get("in_route") is False else state


class TierGate:
    """ASGI middleware in front of LiteLLM (see the module docstring)."""

    def __init__(self, app: Any, routes: Mapping[str, Route], view: StateView,
                 key: str, hold_s: float = HOLD_S) -> None:
        self.app = app
        self.hold_s = hold_s
        self.routes = dict(routes)
        self.view = view
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path") not in GATED_PATHS):
            await self.app(scope, receive, send)
            return
        body, more = await read_body(receive)  # kept: a request caught in a hang is sent again
        if self._degraded() and carries_key(scope, self.key) and not more:
            decision = await self._hold(body)
            if decision.refuse:
                await _unavailable(send, decision.refuse)
                return
            if decision.model is not None:
                body = _with_model(body, decision.model)
                headers = [(k, v) for k, v in scope.get("headers") or []
                           if k != b"content-length"]
                scope = dict(scope, headers=[*headers, (b"content-length",
                                                         str(len(body)).encode())])
                send = _tagged(send, decision.model)
        began = time.time()
        deadline: float | None = None
        while True:
            held = _Held(send)
            await self.app(scope, replay(body, more, receive), held)
            if held.start is None:
                return  # answered (or streamed) as usual
            if deadline is None:
                if not await self._went_down(began):
                    await held.release(as_503=False)  # an upstream error of its own
                    return
                deadline = time.monotonic() + self.hold_s
            # A tier failed under this request. Send it again once its tier (or a fallback)
            # is ready; after a restart LiteLLM's pool still holds connections to the dead
            # process, each good for one more failure, so keep trying until the deadline.
            if more or (await self._hold(body, deadline)).refuse \
                    or time.monotonic() >= deadline:
                await held.release(as_503=True)
                return
            await asyncio.sleep(0.05)

    async def _went_down(self, since: float) -> bool:
        """After an upstream failure: is a tier down, or did one restart since ``since`` (wall
        clock)? The supervisor's snapshot may lag the failure (a kill -9 is seen within its
        next tick), so look for half a second."""
        deadline = time.monotonic() + WENT_DOWN_WAIT_S
        while True:
            if self._degraded(fresh=True) or any(
                    self.view.started.get(s, 0.0) >= since
                    for r in self.routes.values() for s in r.services):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def _hold(self, body: bytes, deadline: float | None = None) -> Decision:
        """The decision for ``body``, waiting (up to ``hold_s``, or ``deadline``) while it is
        a refusal."""
        decision = self._decide(body)
        deadline = deadline if deadline is not None else time.monotonic() + self.hold_s
        while decision.refuse and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            decision = self._decide(body)
        return decision

    def _degraded(self, fresh: bool = False) -> bool:
        states = self.view.states(fresh)
        return any(states.get(s, "ready") != "ready"
                   for r in self.routes.values() for s in r.services)

    def _decide(self, body: bytes) -> Decision:
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return Decision()  # LiteLLM answers bad bodies itself
        model = parsed.get("model") if isinstance(parsed, dict) else None
        if not isinstance(model, str):
            return Decision()
        return decide(model, self.routes, self.view.states())


class _Held:
    """Forwards a response, except an upstream failure (``FAILED_UPSTREAM``): that one is
    kept, so the gate can send the request again, or answer 503 if a tier went down."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.start: Message | None = None
        self.rest: list[Message] = []

    async def __call__(self, msg: Message) -> None:
        if msg["type"] == "http.response.start" and msg.get("status") in FAILED_UPSTREAM:
            self.start = msg
        elif self.start is not None:
            self.rest.append(msg)
        else:
            await self.send(msg)

    async def release(self, *, as_503: bool) -> None:
        assert self.start is not None
        start = self.start
        if as_503:
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"retry-after"]
            start = dict(start, status=503,
                         headers=[*headers, (b"retry-after", str(RETRY_AFTER_S).encode())])
        await self.send(start)
        for msg in self.rest:
            await self.send(msg)


def carries_key(scope: Scope, key: bytes) -> bool:
    """Whether a request carries the proxy's key (as LiteLLM reads it: bearer or bare)."""
    auth = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), b"")
    token = auth[7:] if auth[:7].lower() == b"bearer " else auth
    return bool(key) and hmac.compare_digest(token.strip(), key)


async def read_body(receive: Any) -> tuple[bytes, bool]:
    """The body up to MAX_BODY; ``more`` is True if it was longer (then it is not inspected)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        msg: Message = await receive()
        if msg["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(msg.get("body", b""))
        size += len(chunks[-1])
        if not msg.get("more_body"):
            return b"".join(chunks), False
        if size > MAX_BODY:
            return b"".join(chunks), True


def replay(body: bytes, more: bool, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` first (with ``more`` if it was cut), then the rest."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replayed


def _tagged(send: Any, model: str) -> Any:
    """Say in the response which tier answered instead (``x-mlx-stack-routed``)."""

    async def tagged(msg: Message) -> None:
        if msg["type"] == "http.response.start":
            msg = dict(msg, headers=[*msg.get("headers", []),
                                     (b"x-mlx-stack-routed", model.encode())])
        await send(msg)

    return tagged


def _with_model(body: bytes, model: str) -> bytes:
    parsed = json.loads(body)
    parsed["model"] = model
    return json.dumps(parsed).encode()


async def _unavailable(send: Any, message: str) -> None:
    raw = json.dumps({"error": {"message": message, "type": "service_unavailable",
                                "param": None, "code": "503"}}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": raw})


def options_from_env(env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """TierGate's arguments, when the supervisor gave the proxy its routes and state file."""
    from mlx_stack.config.proxykey import ENV_VAR

    routes = routes_from_env(env)
    state = env.get(STATE_ENV)
    if not routes or not state:
        return None
    return {"routes": routes, "view": StateView(Path(state)), "key": env.get(ENV_VAR, "")}
