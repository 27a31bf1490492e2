"""Runs in the proxy: correct vectors from an external embeddings server, whatever it honours.

The openai SDK asks for ``encoding_format: base64`` by default and decodes the answer as
little-endian float32. Ollama's OpenAI endpoint ignores ``encoding_format`` (floats always) and
handles ``dimensions`` its own way, version by version; another server may do either. A naive
proxy passes such answers on, and a client then reads vectors of the wrong length or values.
So for an embeddings deployment the stack does not build (``config/external.py``; the fast
lane serves the stack's own server, which honours both), this ASGI middleware:

- asks upstream for floats at full length (``encoding_format: float``, no ``dimensions``);
- reads the answer (floats, or base64 float32 if the server sent that anyway), cuts each vector
  to ``dimensions`` and renormalises it (what OpenAI's Matryoshka models and our own server
  do), or answers a 400 when ``dimensions`` exceeds the model's length;
- encodes each vector as the client asked: a list of floats, or base64 of little-endian
  float32.

Only requests that carry the proxy's key are read (the others go on to LiteLLM's 401).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mlx_stack.config.external import is_external_deployment
from mlx_stack.litellm.gate import carries_key, read_body, replay

Scope = dict[str, Any]
Message = dict[str, Any]

PATHS = frozenset({"/v1/embeddings", "/embeddings"})
OFF_LOOP_BYTES = 256 * 1024
"""Answers from this size are re-encoded in a worker thread, so the proxy keeps answering."""
FORMATS = ("float", "base64")


class NormalizeError(Exception):
    """A request or answer this layer refuses, with its HTTP status and OpenAI ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> bytes:
        kind = "invalid_request_error" if self.status < 500 else "upstream_error"
        return json.dumps({"error": {"message": self.message, "type": kind,
                                     "param": self.param, "code": str(self.status)}}).encode()


@dataclass(frozen=True)
class Wanted:
    """What the client asked for: its encoding and its length (None: the model's)."""

    encoding: str = "float"
    dimensions: int | None = None


def upstream_request(body: dict[str, Any]) -> tuple[dict[str, Any], Wanted]:
    """The body to send upstream (floats at full length), and what to give the client (pure)."""
    fmt = body.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if fmt not in FORMATS:
        raise NormalizeError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}",
                             "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise NormalizeError(400, f"dimensions must be a positive integer, got {dims!r}",
                             "dimensions")
    sent = {k: v for k, v in body.items() if k != "dimensions"}
    sent["encoding_format"] = "float"
    return sent, Wanted(fmt, dims)


def decode_vector(value: Any) -> np.ndarray:
    """One upstream vector: a list of numbers, or base64 of little-endian float32."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise NormalizeError(502, "the external embeddings server sent a vector that is "
                                 "neither numbers nor base64") from None
        if len(raw) % 4:
            raise NormalizeError(502, "the external embeddings server sent base64 that is not "
                                 "float32")
        return np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if (isinstance(value, list) and value
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        return np.asarray(value, dtype=np.float64)
    raise NormalizeError(502, "the external embeddings server sent an empty or malformed vector")


def encode_vector(vec: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vec]


def shaped(vec: np.ndarray, dims: int | None) -> np.ndarray:
    """``vec`` cut to ``dims`` and renormalised to unit length (unchanged without ``dims``)."""
    if dims is None or dims == len(vec):
        return vec
    if dims > len(vec):
        raise NormalizeError(400, f"dimensions {dims} is more than this model's {len(vec)}; "
                             f"ask for at most {len(vec)}", "dimensions")
    cut = vec[:dims]
    norm = float(np.linalg.norm(cut))
    return cut / norm if norm > 0 else cut


def client_answer(payload: Any, wanted: Wanted) -> dict[str, Any]:
    """The upstream answer with every vector as the client asked (pure)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise NormalizeError(502, "the external embeddings server's answer has no data list")
    out = []
    for item in data:
        vec = shaped(decode_vector(item.get("embedding")), wanted.dimensions)
        out.append({**item, "embedding": encode_vector(vec, wanted.encoding)})
    return {**payload, "data": out}


def models_from_config(path: Path) -> frozenset[str]:
    """Embeddings model names served by external servers in the generated LiteLLM config
    (``config.py``; their ``api_key`` is an external tier's, never the stack's backend key)."""
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return frozenset(
        str(e["model_name"]) for e in config.get("model_list") or []
        if (e.get("model_info") or {}).get("mode") == "embedding"
        and is_external_deployment((e.get("litellm_params") or {}).get("api_key")))


class Normalize:
    """ASGI middleware (see the module docstring); ``models``: the names it answers for."""

    def __init__(self, app: Any, models: frozenset[str], key: str) -> None:
        self.app = app
        self.models = models
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path") not in PATHS or not carries_key(scope, self.key)):
            await self.app(scope, receive, send)
            return
        raw, more = await read_body(receive)
        body = None if more else _json_object(raw)
        if body is None or body.get("model") not in self.models:
            await self.app(scope, replay(raw, more, receive), send)
            return
        try:
            sent, wanted = upstream_request(body)
        except NormalizeError as exc:
            await _answer(send, exc.status, exc.body(), [])
            return
        upstream = json.dumps(sent).encode()
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
        scope = dict(scope, headers=[*headers, (b"content-length", str(len(upstream)).encode())])
        caught = _Caught()
        await self.app(scope, replay(upstream, False, receive), caught)
        status, payload = caught.status, caught.body
        passed = [(k, v) for k, v in caught.headers if k not in (b"content-length",)]
        if status == 200:
            try:
                payload = (_reshape(payload, wanted) if len(payload) < OFF_LOOP_BYTES
                           else await asyncio.to_thread(_reshape, payload, wanted))
            except NormalizeError as exc:
                status, payload = exc.status, exc.body()
            except ValueError:
                status, payload = 502, NormalizeError(
                    502, "the external embeddings server's answer is not JSON").body()
        await _answer(send, status, payload, passed)


def _reshape(payload: bytes, wanted: Wanted) -> bytes:
    return json.dumps(client_answer(json.loads(payload), wanted)).encode()


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # the body check (``bodycheck.py``) and LiteLLM say why
    return body if isinstance(body, dict) else None


class _Caught:
    """Collects a whole response (an embeddings answer is one JSON document, never a stream)."""

    def __init__(self) -> None:
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    async def __call__(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            self.status = int(msg["status"])
            self.headers = list(msg.get("headers") or [])
        elif msg["type"] == "http.response.body":
            self.body += msg.get("body", b"")


async def _answer(send: Any, status: int, payload: bytes,
                  headers: list[tuple[bytes, bytes]]) -> None:
    if not any(k == b"content-type" for k, _ in headers):
        headers = [*headers, (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def options_from_env(config: Path | None, env: Mapping[str, str]) -> dict[str, Any] | None:
    """Normalize's arguments, when the generated config names an external embeddings server."""
    from mlx_stack.config.proxykey import ENV_VAR

    if config is None or not config.is_file() or not env.get(ENV_VAR):
        return None
    models = models_from_config(config)
    return {"models": models, "key": env[ENV_VAR]} if models else None
