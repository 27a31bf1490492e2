"""The proxy's normaliser of external embeddings (``litellm/normalize.py``): its pure rules, and
the middleware in process in front of a recording ASGI app that answers as Ollama does (floats
whatever ``encoding_format`` says, full length whatever ``dimensions`` says)."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from mlx_stack.litellm.normalize import (
    Normalize,
    NormalizeError,
    Wanted,
    client_answer,
    decode_vector,
    upstream_request,
)

KEY = "sk-proxy-key-0123456789abcdef"
VEC = np.array([3.0, 4.0, 12.0, 0.0])  # norm 13


def b64(vec) -> str:
    return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()


def unb64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def test_upstream_is_asked_for_floats_at_full_length():
    sent, wanted = upstream_request({"model": "m", "input": "x", "encoding_format": "base64",
                                     "dimensions": 2, "user": "u"})
    assert sent == {"model": "m", "input": "x", "encoding_format": "float", "user": "u"}
    assert wanted == Wanted("base64", 2)
    assert upstream_request({"model": "m", "input": "x"})[1] == Wanted("float", None)


@pytest.mark.parametrize(("body", "param"), [
    ({"encoding_format": "hex"}, "encoding_format"),
    ({"dimensions": 0}, "dimensions"),
    ({"dimensions": True}, "dimensions"),
    ({"dimensions": "8"}, "dimensions"),
])
def test_bad_asks_are_400s_that_name_the_field(body, param):
    with pytest.raises(NormalizeError) as info:
        upstream_request({"model": "m", "input": "x", **body})
    assert info.value.status == 400 and info.value.param == param


def test_floats_and_base64_from_upstream_decode_alike():
    assert np.allclose(decode_vector(VEC.tolist()), VEC)
    assert np.allclose(decode_vector(b64(VEC)), VEC)
    for bad in ("not base64!", base64.b64encode(b"abc").decode(), [], ["x"], None, [True]):
        with pytest.raises(NormalizeError) as info:
            decode_vector(bad)
        assert info.value.status == 502


def test_the_client_gets_the_encoding_it_asked_for():
    upstream = {"object": "list", "model": "m", "usage": {"prompt_tokens": 1},
                "data": [{"object": "embedding", "index": 0, "embedding": VEC.tolist()}]}
    as_float = client_answer(upstream, Wanted("float"))
    assert as_float["data"][0]["embedding"] == VEC.tolist()
    assert as_float["usage"] == {"prompt_tokens": 1} and as_float["model"] == "m"
    as_b64 = client_answer(upstream, Wanted("base64"))["data"][0]["embedding"]
    assert isinstance(as_b64, str) and np.allclose(unb64(as_b64), VEC)


def test_dimensions_cut_and_renormalise_or_refuse():
    upstream = {"data": [{"index": 0, "embedding": VEC.tolist()}]}
    cut = client_answer(upstream, Wanted("float", 2))["data"][0]["embedding"]
    assert np.allclose(cut, [0.6, 0.8])
    cut64 = unb64(client_answer(upstream, Wanted("base64", 3))["data"][0]["embedding"])
    assert np.allclose(cut64, VEC[:3] / 13) and cut64.dtype == np.dtype("<f4")
    assert client_answer(upstream, Wanted("float", 4))["data"][0]["embedding"] == VEC.tolist()
    with pytest.raises(NormalizeError, match="dimensions 5 is more than this model's 4") as info:
        client_answer(upstream, Wanted("float", 5))
    assert info.value.status == 400 and info.value.param == "dimensions"


# ----- the middleware, in process ------------------------------------------------------------


class OllamaLike:
    """An ASGI app answering as Ollama's /v1/embeddings does; it records each body it got."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        msg = await receive()
        body = json.loads(msg["body"])
        self.bodies.append(body)
        raw = json.dumps({"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "index": 0, "embedding": VEC.tolist()}]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})


def call(app, body: dict, key: str = KEY, path: str = "/v1/embeddings"):
    raw = json.dumps(body).encode()
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"authorization", f"Bearer {key}".encode()),
                         (b"content-length", str(len(raw)).encode())]}
    asyncio.run(app(scope, receive, send))
    headers = dict(sent[0]["headers"])
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    assert int(headers[b"content-length"]) == len(payload)
    return sent[0]["status"], json.loads(payload)


def test_the_middleware_gives_base64_and_dimensions_from_a_server_that_ignores_both():
    inner = OllamaLike()
    app = Normalize(inner, frozenset({"local-embed"}), KEY)
    status, body = call(app, {"model": "local-embed", "input": "x",
                              "encoding_format": "base64", "dimensions": 2})
    assert status == 200 and np.allclose(unb64(body["data"][0]["embedding"]), [0.6, 0.8])
    assert inner.bodies[-1] == {"model": "local-embed", "input": "x", "encoding_format": "float"}
    status, body = call(app, {"model": "local-embed", "input": "x", "dimensions": 9})
    assert status == 400 and body["error"]["param"] == "dimensions"


def test_the_middleware_leaves_other_models_and_keyless_requests_alone():
    inner = OllamaLike()
    app = Normalize(inner, frozenset({"local-embed"}), KEY)
    asked = {"model": "other", "input": "x", "encoding_format": "base64", "dimensions": 2}
    status, body = call(app, asked)
    assert status == 200
    assert inner.bodies[-1] == asked and body["data"][0]["embedding"] == VEC.tolist()
    keyless = {"model": "local-embed", "input": "x", "dimensions": 2}
    call(app, keyless, key="sk-someone-else-0000000000")
    assert inner.bodies[-1] == keyless  # LiteLLM answers it (401); this layer reads nothing


def test_a_large_answer_is_reshaped_off_the_event_loop_alike():
    """Many vectors: re-encoded in a worker thread (the proxy keeps serving), same result."""
    class Many(OllamaLike):
        async def __call__(self, scope, receive, send) -> None:
            msg = await receive()
            body = json.loads(msg["body"])
            raw = json.dumps({"object": "list", "data": [
                {"object": "embedding", "index": i, "embedding": VEC.tolist() * 64}
                for i in range(200)]}).encode()
            assert len(raw) > 256 * 1024 and body["encoding_format"] == "float"
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": raw})

    app = Normalize(Many(), frozenset({"local-embed"}), KEY)
    status, body = call(app, {"model": "local-embed", "input": ["x"] * 200,
                              "encoding_format": "base64", "dimensions": 2})
    assert status == 200 and len(body["data"]) == 200
    assert all(np.allclose(unb64(d["embedding"]), [0.6, 0.8]) for d in body["data"])
