"""The proxy's body check (mlx_stack/litellm/bodycheck.py) and the chat tier's shape check and
error translation (mlx_stack/chat/guard.py): pure decisions as tables, and the ASGI middleware
in-process in front of an app that answers like LiteLLM. Through the real proxy: tests/e2e."""

from __future__ import annotations

import asyncio
import json

import pytest

from mlx_stack.chat.guard import mlx_lm_refusal, shape_refusal
from mlx_stack.litellm import gate
from mlx_stack.litellm.bodycheck import BodyCheck, body_refusal, unwrapped

KEY = "sk-test-key"
AUTH = (b"authorization", f"Bearer {KEY}".encode())

#: LiteLLM 1.108's messages for a backend's refusal, as the proxy answered them.
WRAPPED = [
    ("litellm.BadRequestError: OpenAIException - Error code: 400 - 'input[0]' is an empty "
     "string\n\nLiteLLM: model group 'local-embed' failed with the error above. No fallback "
     "was attempted.", "'input[0]' is an empty string"),
    ("litellm.BadRequestError: OpenAIException - 'adapters' is not accepted: a chat tier "
     "serves only its own model\n\nLiteLLM: model group 'fast' failed with the error above. "
     "No fallback was attempted.", "'adapters' is not accepted: a chat tier serves only its "
     "own model"),
    ("Invalid request format: litellm.APIConnectionError: APIConnectionError: "
     "OpenAIException - 'str' object has no attribute 'get'\n\nLiteLLM: model group 'fast' "
     "failed with the error above. No fallback was attempted. LiteLLM Retried: 1 times",
     "'str' object has no attribute 'get'"),
    ('litellm.BadRequestError: CohereException - {"error": {"message": "\'top_n\' must be '
     'a positive integer, got 0", "type": "invalid_request_error"}}\n\nLiteLLM: model group '
     "'local-rerank' failed with the error above.", "'top_n' must be a positive integer, got 0"),
    # LiteLLM's own messages, and anything else, pass unchanged.
    ("/embeddings: Missing required parameter: 'input'.",
     "/embeddings: Missing required parameter: 'input'."),
    ("Authentication Error, Invalid proxy server token passed.",
     "Authentication Error, Invalid proxy server token passed."),
    ("litellm.BadRequestError: OpenAIException - \n\nLiteLLM: model group 'x' failed",
     "litellm.BadRequestError: OpenAIException - \n\nLiteLLM: model group 'x' failed"),
]  # fmt: skip


@pytest.mark.parametrize(("message", "expected"), WRAPPED)
def test_unwrapped(message, expected):
    assert unwrapped(message) == expected


@pytest.mark.parametrize(
    ("path", "raw", "param", "says"),
    [
        # LiteLLM answered these with a 500 (its own code failed):
        ("/v1/embeddings", b'{"model": "local-embed", "input": [[]]}', "input", "empty token"),
        ("/v1/embeddings", b"[1, 2]", None, "JSON object"),
        ("/v1/chat/completions", b"[1]", None, "JSON object"),
        # ... or retried them as a broken connection, or sent them on to a 404:
        ("/v1/chat/completions", b'{"model": "fast", "messages": "hi"}', "messages",
         "non-empty list"),
        ("/chat/completions", b'{"model": "fast", "messages": []}', "messages", "non-empty"),
        ("/v1/chat/completions", b'{"model": "fast", "messages": [1]}', "messages",
         "messages[0]"),
        ("/v1/completions", b'{"model": "fast"}', "prompt", "prompt"),
        # the embeddings server's own rules, in its words
        ("/v1/embeddings", b'{"model": "e", "input": "hi", "dimensions": 0}', "dimensions",
         "positive integer"),
        ("/embeddings", b'{"model": "e", "input": ["\\ud800"]}', "input", "surrogate"),
        ("/v1/embeddings", b'{"input": "hi"}', "model", "'model' is required"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', "model",
         "'model' is required"),
        # the rerank server's rules (checked once the rerank paths are gated)
        ("/v1/rerank", b'{"model": "local-rerank", "query": "q", "documents": []}',
         "documents", "non-empty list"),
        ("/v2/rerank", b'{"model": "local-rerank", "documents": ["a"]}', "query", "'query'"),
        # bytes no JSON parser should be left to fail on
        ("/v1/embeddings", b"[" * 100_000, None, "nested too deeply"),
        ("/v1/chat/completions", b'{"model": ' + b"1" * 5000 + b"}", None, "4300 digits"),
        ("/v1/embeddings", b'{"model": "\xff"}', None, "UTF-8"),
        ("/v1/embeddings", b"", None, "empty"),
    ],
)  # fmt: skip
def test_body_refusal(path, raw, param, says):
    refusal = body_refusal(path, raw)
    assert refusal is not None and refusal.status == 400, refusal
    assert refusal.param == param and says in refusal.message
    error = json.loads(refusal.body())["error"]
    assert error["type"] == "invalid_request_error" and error["message"] == refusal.message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": "local-embed", "input": ["a", "b"], "dimensions": 8}),
        ("/v1/embeddings", {"model": "local-embed", "input": [1, 2, 3], "user": "u"}),
        ("/v1/chat/completions", {"model": "fast", "messages": [{"role": "user",
                                                                 "content": "hi"}]}),
        ("/v1/completions", {"model": "fast", "prompt": "hi", "max_tokens": 3}),
    ],
)
def test_good_bodies_pass(path, body):
    assert body_refusal(path, json.dumps(body).encode()) is None


def test_the_chat_shape_check_is_for_chat_paths_only():
    assert shape_refusal("/v1/models", {}) is None
    assert shape_refusal("/v1/chat/completions", {"messages": [{"role": "user"}]}) is None
    assert shape_refusal("/v1/chat/completions", {"messages": [{"content": "x"}]}) is not None


@pytest.mark.parametrize(
    ("status", "raw", "path", "to", "message"),
    [
        # mlx_lm's 404 when generation cannot start (an empty conversation): LiteLLM would cool
        # the tier down for every client
        (404, b'{"error": "Cannot apply chat template to an empty conversation."}',
         "/v1/chat/completions", 400, "Cannot apply chat template to an empty conversation."),
        (400, b'{"error": "max_tokens must be of type int"}', "/v1/completions", 400,
         "max_tokens must be of type int"),
        (404, b"Not Found", "/v1/nothing", 404, "Not Found"),
        (411, b'{"error": "Content-Length header is required"}', "/v1/chat/completions", 411,
         "Content-Length header is required"),
        (400, b"", "/v1/chat/completions", 400, "the chat tier refused the request (400)"),
    ],
)  # fmt: skip
def test_mlx_lm_errors_in_openai_shape(status, raw, path, to, message):
    refusal = mlx_lm_refusal(status, raw, path)
    assert refusal.status == to and refusal.message == message
    assert json.loads(refusal.body())["error"]["message"] == message


class LiteLLMLike:
    """An app that records what reached it and answers with a canned status and body."""

    def __init__(self, status: int = 200, body: bytes = b"{}", chunks: int = 1) -> None:
        self.status, self.body, self.chunks = status, body, chunks
        self.received: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.received.append(body)
        await send({"type": "http.response.start", "status": self.status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode())]})  # fmt: skip
        step = max(1, len(self.body) // self.chunks)
        parts = [self.body[i:i + step] for i in range(0, len(self.body), step)] or [b""]
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part,
                        "more_body": i < len(parts) - 1})  # fmt: skip


def _call(app, body: bytes, *, path: str = "/v1/embeddings", headers=(AUTH,),
          pieces: int = 1) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict] = []
    step = max(1, len(body) // pieces)
    chunks = [body[i:i + step] for i in range(0, len(body), step)] or [b""]

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(BodyCheck(app, KEY)(scope, receive, send))
    start = sent[0]
    return (start["status"], dict(start["headers"]),
            b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_bad_body_is_answered_before_litellm_sees_it():
    app = LiteLLMLike()
    status, headers, body = _call(app, b'{"model": "local-embed", "input": [[]]}', pieces=3)
    assert status == 400 and app.received == []
    assert json.loads(body)["error"]["param"] == "input"
    assert int(headers[b"content-length"]) == len(body)


def test_a_good_body_reaches_litellm_whole():
    app = LiteLLMLike()
    raw = json.dumps({"model": "local-embed", "input": ["x" * 1000] * 400}).encode()
    assert len(raw) > 256 * 1024  # parsed off the event loop
    status, _, _ = _call(app, raw, pieces=7)
    assert status == 200 and app.received == [raw]


def test_a_request_without_the_key_is_litellms_to_refuse():
    app = LiteLLMLike(401, b'{"error": {"message": "Authentication Error"}}')
    status, _, _ = _call(app, b"[1]", headers=())
    assert status == 401 and app.received == [b"[1]"]
    status, _, _ = _call(app, b"[1]", headers=((b"authorization", b"Bearer wrong"),))
    assert status == 401 and len(app.received) == 2


def test_an_oversized_body_is_413(monkeypatch):
    monkeypatch.setattr(gate, "MAX_BODY", 1000)
    app = LiteLLMLike()
    status, _, body = _call(app, b'{"model": "e", "input": "' + b"x" * 5000 + b'"}', pieces=10)
    assert status == 413 and app.received == [] and b"MiB" in body


@pytest.mark.parametrize("chunks", [1, 3])
def test_litellms_wrapping_is_taken_off_its_errors(chunks):
    message, expected = WRAPPED[0]
    error = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                       "code": "400"}}  # fmt: skip
    app = LiteLLMLike(400, json.dumps(error).encode(), chunks=chunks)
    status, headers, body = _call(app, b'{"model": "local-embed", "input": "x"}')
    assert status == 400
    assert json.loads(body)["error"] == {**error["error"], "message": expected}
    assert int(headers[b"content-length"]) == len(body)


def test_other_answers_pass_unchanged():
    for status, raw in [(200, b'{"data": []}'), (500, b'{"error": {"message": "litellm.X: '
                                                         b'OpenAIException - boom"}}'),
                        (429, b'{"error": {"message": "litellm.RateLimitError: '
                         b'OpenAIException - slow down"}}'), (400, b"not json")]:
        app = LiteLLMLike(status, raw)
        got, _, body = _call(app, b'{"model": "local-embed", "input": "x"}')
        assert (got, body) == (status, raw)
