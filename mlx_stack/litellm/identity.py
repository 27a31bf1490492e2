"""Runs in the proxy: ``GET /mlx-stack/v1/identity`` lists this stack's local tiers and, for
the embeddings and rerank tiers, the identity of the model they serve.

Another stack that uses this one as a remote (``config/remotes.py``) reaches it only through
this proxy, whose ``/v1/models`` is LiteLLM's (names only). Vector models may share a name
across machines only with equal weights hash, pooling, normalisation, prefixes and
dimensions, so the remote's prober asks here: this route reads each local vector server's own
model card (``/v1/models``, with the backend key) and answers with the identity fields of it.
Only a caller with the proxy's key gets an answer (401 otherwise, as LiteLLM would); the
answer holds no key, no path, only what a card says about the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from mlx_stack.config.remotes import IDENTITY_PATH, identity_of
from mlx_stack.litellm.gate import carries_key

SOURCES_ENV = "MLX_STACK_IDENTITY_SOURCES"
CARD_TIMEOUT_S = 5.0

Scope = dict[str, Any]


def sources_to_env(sources: Mapping[str, Mapping[str, str]]) -> str:
    """``{proxy name: {"mode": chat|embedding|rerank, "url": a vector server's base}}``."""
    return json.dumps({n: dict(v) for n, v in sorted(sources.items())})


class IdentityRoute:
    """ASGI middleware: answer ``GET IDENTITY_PATH``; pass everything else on."""

    def __init__(self, app: Any, sources: Mapping[str, Mapping[str, str]], key: str,
                 backend_key: str) -> None:
        self.app = app
        self.sources = dict(sources)
        self.key = key.encode()
        self.backend_key = backend_key

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != IDENTITY_PATH:
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "GET":
            await _answer(send, 405, _error("use GET", "method_not_allowed"))
            return
        if not carries_key(scope, self.key):
            await _answer(send, 401, _error(
                "this route needs the proxy's key (Authorization: Bearer KEY)",
                "invalid_api_key"))
            return
        await _answer(send, 200, {"object": "mlx-stack.identity",
                                  "models": await self.models()})

    async def models(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, src in self.sources.items():
            entry: dict[str, Any] = {"mode": src.get("mode", "chat")}
            if src.get("external"):
                entry["external"] = True  # a server the stack does not build: no weights hash
            if src.get("url"):
                card, problem = await self._card(src["url"])
                if card:
                    entry["model"] = card.get("id")
                    entry.update(identity_of(card))
                entry["ready"] = bool(card and card.get("ready"))
                if problem:
                    entry["problem"] = problem
            out[name] = entry
        return out

    async def _card(self, base: str) -> tuple[dict[str, Any] | None, str]:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=CARD_TIMEOUT_S, trust_env=False,
                                         verify=False) as client:
                r = await client.get(f"{base}/v1/models",
                                     headers={"Authorization": f"Bearer {self.backend_key}"})
            data = r.json().get("data") if r.status_code == 200 else None
            if isinstance(data, list) and data and isinstance(data[0], dict):
                return data[0], ""
            return None, f"its server answered HTTP {r.status_code}"
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return None, f"its server did not answer ({type(exc).__name__})"


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": code}}


async def _answer(send: Any, status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def options_from_env(env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    from mlx_stack.backendkey import KEY_ENV
    from mlx_stack.config.proxykey import ENV_VAR

    raw = env.get(SOURCES_ENV)
    if not raw or not env.get(ENV_VAR):
        return None
    return {"sources": json.loads(raw), "key": env[ENV_VAR],
            "backend_key": env.get(KEY_ENV, "")}
