"""Runs in the proxy: a body the backend would refuse is refused here, in the backend's words.

LiteLLM reads a request before it calls a backend, and fails on bodies it does not expect:
``{"model": "local-embed", "input": [[]]}`` or a JSON array as the body are 500s from its own
code; ``"messages": "hi"`` is retried as if the connection had broken. The bodies it passes on
come back with the backend's message inside its prefixes ("litellm.BadRequestError:
OpenAIException - Error code: 400 - ..."). So, for requests that carry the proxy's key (the
others go on to LiteLLM, which answers 401 without reading them):

- the body is read up to ``MAX_BODY`` (more: 413) and checked by the backends' own rules: an
  embeddings body by the embeddings server's parser (``embeddings/api/protocol.py``), a rerank
  body by the rerank server's (``embeddings/api/rerank.py``), a chat
  or completions body by the chat guard's shape check (``chat/guard.py``). Undecodable JSON,
  bad UTF-8, huge integers, deep nesting, a body that is not an object: a 400 in OpenAI's
  error shape, before LiteLLM. Large bodies are parsed off the event loop.
- a 4xx that LiteLLM answers on these paths is passed on without LiteLLM's prefixes: the
  client reads what the backend said, with LiteLLM's status, type and ``param``.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from mlx_stack.chat.guard import Refusal, shape_refusal
from mlx_stack.embeddings.api.apierror import ApiError
from mlx_stack.embeddings.api.openapi import RERANK_PATHS
from mlx_stack.embeddings.api.protocol import load_json, parse_request
from mlx_stack.embeddings.api.rerank import parse_rerank_request
from mlx_stack.litellm.gate import GATED_PATHS, MAX_BODY, carries_key, read_body, replay

Scope = dict[str, Any]
Message = dict[str, Any]

EMBEDDINGS_PATHS = frozenset({"/v1/embeddings", "/embeddings"})
OFF_LOOP_BYTES = 256 * 1024
"""Bodies from this size are parsed in a worker thread: the proxy keeps answering meanwhile."""
MAX_ERROR_BYTES = 256 * 1024
"""An error answer larger than this is passed on as it is (no error message is this long)."""

_LITELLM_WRAPPING = re.compile(
    r"^(?:Invalid request format: )?litellm\.\w+: (?:\w+: )?\w*Exception - "
    r"(?:Error code: \d{3}(?: - |$))?(?P<message>.*?)"
    r"(?:\n+LiteLLM: model group .*)?$",
    re.DOTALL,
)


def body_refusal(path: str, raw: bytes) -> Refusal | None:
    """Why the backend behind ``path`` would refuse ``raw``; ``None`` if it would not (pure)."""
    try:
        body = load_json(raw)
        if path in EMBEDDINGS_PATHS:
            parse_request(body)
            return None
        if path in RERANK_PATHS:
            parse_rerank_request(body)
            return None
    except ApiError as exc:
        return Refusal(exc.kind.status, exc.message, exc.code or "invalid_value", exc.param,
                       exc.kind.error_type)  # fmt: skip
    if not isinstance(body, dict):
        return Refusal(400, "the request body must be a JSON object", "invalid_value")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return Refusal(400, "'model' is required and must be a non-empty string (one of "
                       "GET /v1/models)", "invalid_value", "model")  # fmt: skip
    return shape_refusal(path, body)


def unwrapped(message: str) -> str:
    """LiteLLM's error message without its prefixes and suffix: the backend's own words."""
    match = _LITELLM_WRAPPING.match(message)
    if match is None or not match["message"].strip():
        return message
    inner = match["message"].strip()
    if inner.startswith("{"):  # some providers (cohere/) quote the backend's whole body
        try:
            quoted = json.loads(inner)["error"]["message"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return inner
        return quoted if isinstance(quoted, str) and quoted else inner
    return inner


class BodyCheck:
    """ASGI middleware in front of the gate and LiteLLM (see the module docstring)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path")
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or path not in GATED_PATHS or not carries_key(scope, self.key)):
            await self.app(scope, receive, send)
            return
        body, more = await read_body(receive)
        if more:
            refusal: Refusal | None = Refusal(
                413, f"the request body is over {MAX_BODY // 2**20} MiB; send fewer inputs "
                "per request", "payload_too_large")  # fmt: skip
        elif len(body) >= OFF_LOOP_BYTES:
            refusal = await asyncio.to_thread(body_refusal, path, body)
        else:
            refusal = body_refusal(path, body)
        if refusal is not None:
            await _answer(send, refusal)
            return
        await self.app(scope, replay(body, more, receive), _unwrapping(send))


def _unwrapping(send: Any) -> Any:
    """A ``send`` that rewrites the message of a 4xx JSON error (kept whole until its end)."""
    held: list[Message] = []

    async def unwrapping(msg: Message) -> None:
        if msg["type"] == "http.response.start" and 400 <= msg.get("status", 200) < 500 \
                and msg.get("status") != 429:
            held.append(msg)
            return
        if not held:
            await send(msg)
            return
        held.append(msg)
        if msg.get("more_body") and sum(len(m.get("body", b"")) for m in held[1:]) \
                <= MAX_ERROR_BYTES:
            return
        for out in _rewritten(held):
            await send(out)
        held.clear()

    return unwrapping


def _rewritten(held: list[Message]) -> list[Message]:
    """The held error answer with its message unwrapped (unchanged if it is not LiteLLM's)."""
    start, parts = held[0], held[1:]
    if parts and parts[-1].get("more_body"):
        return held  # too long to be one of LiteLLM's errors: as it is
    raw = b"".join(m.get("body", b"") for m in parts)
    try:
        body = json.loads(raw)
        error = body["error"]
        message = unwrapped(error["message"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return held
    if message == error["message"]:
        return held
    error["message"] = message
    new = json.dumps(body).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
    return [dict(start, headers=[*headers, (b"content-length", str(len(new)).encode())]),
            {"type": "http.response.body", "body": new}]


async def _answer(send: Any, refusal: Refusal) -> None:
    raw = refusal.body()
    await send({"type": "http.response.start", "status": refusal.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})

