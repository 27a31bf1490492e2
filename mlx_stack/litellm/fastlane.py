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
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mlx_stack.backendkey import KEY_ENV, LITELLM_API_KEY
from mlx_stack.litellm.gate import RETRY_AFTER_S, carries_key, read_body, replay

Scope = dict[str, Any]
Message = dict[str, Any]

PATHS = frozenset({"/v1/embeddings", "/embeddings"})
OFF_LOOP_BYTES = 256 * 1024
"""Bodies from this size are parsed in a worker thread, so the proxy keeps answering."""
_PASSED_HEADERS = ("content-type", "retry-after", "x-mlx-stack-truncated-inputs")
_SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"))
"""What LiteLLM's own security middleware adds to every answer."""


def upstreams_from_config(path: Path) -> dict[str, tuple[str, float]]:
    """Embeddings model name -> (the server's ``/embeddings`` URL, timeout s), from the
    generated LiteLLM config (``config.py`` writes ``model_info.mode: embedding``)."""
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out: dict[str, tuple[str, float]] = {}
    for entry in config.get("model_list") or []:
        params = entry.get("litellm_params") or {}
        base = str(params.get("api_base", ""))
        if (entry.get("model_info") or {}).get("mode") != "embedding":
            continue
        if not base.startswith("http://127.0.0.1:") or params.get("api_key") != LITELLM_API_KEY:
            continue  # only the stack's own loopback server (an external one: normalize.py)
        out[str(entry["model_name"])] = (base.rstrip("/") + "/embeddings",
                                         float(params.get("timeout", 120)))
    return out


class FastLane:
    """ASGI middleware: answer the stack's embedding requests from its server directly."""

    def __init__(self, app: Any, upstreams: Mapping[str, tuple[str, float]], key: str,
                 backend_key: str) -> None:
        self.app = app
        self.upstreams = dict(upstreams)
        self.key = key.encode()
        self.backend_key = backend_key
        self._session: Any = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path") not in PATHS or not self.upstreams
                or not carries_key(scope, self.key)):
            await self.app(scope, receive, send)
            return
        body, more = await read_body(receive)
        target = None if more else await self._target(body)
        if target is None:
            await self.app(scope, replay(body, more, receive), send)
            return
        await self._forward(target, body, send)

    async def _target(self, body: bytes) -> tuple[str, float] | None:
        try:
            parsed = (json.loads(body) if len(body) < OFF_LOOP_BYTES
                      else await asyncio.to_thread(json.loads, body))
        except (ValueError, RecursionError):
            return None  # not ours to answer: LiteLLM (and the body check) say why
        model = parsed.get("model") if isinstance(parsed, dict) else None
        return self.upstreams.get(model) if isinstance(model, str) else None

    async def _forward(self, target: tuple[str, float], body: bytes, send: Any) -> None:
        import aiohttp

        url, timeout = target
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256), trust_env=False)
        headers = {"content-type": "application/json",
                   "authorization": f"Bearer {self.backend_key}"}
        try:
            async with self._session.post(
                url, data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                payload = await response.read()
                status = response.status
                passed = [(k.lower().encode(), v.encode()) for k, v in response.headers.items()
                          if k.lower() in _PASSED_HEADERS]
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status = 503
            passed = [(b"content-type", b"application/json"),
                      (b"retry-after", str(RETRY_AFTER_S).encode())]
            payload = json.dumps({"error": {
                "message": f"the embeddings server did not answer ({type(exc).__name__}); "
                           "retry in a few seconds (`mlx-stack status` shows its state)",
                "type": "service_unavailable", "param": None, "code": "upstream_unavailable",
            }}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            *passed, *_SECURITY_HEADERS, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def options_from_env(config: Path | None, env: Mapping[str, str]) -> dict[str, Any] | None:
    """FastLane's arguments, when the proxy has a generated config, its key and a backend key."""
    from mlx_stack.config.proxykey import ENV_VAR

    if config is None or not config.is_file() or not env.get(ENV_VAR) or not env.get(KEY_ENV):
        return None
    upstreams = upstreams_from_config(config)
    if not upstreams:
        return None
    return {"upstreams": upstreams, "key": env[ENV_VAR], "backend_key": env[KEY_ENV]}
