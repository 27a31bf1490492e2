"""Pure units of the embeddings server's HTTP face: who may call it (Host, Origin, CORS), how
bodies are read and decoded, the error kinds, the OpenAPI document. No subprocess, no socket:
the middleware runs in-process through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import json
import pickle

import httpx
import pytest
from embedserver import minilm_path
from openapi_spec_validator import validate
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from mlx_stack.embeddings.api.access import AccessGuard, AccessPolicy, normal_origin
from mlx_stack.embeddings.api.apierror import ApiError, ErrorKind, shown
from mlx_stack.embeddings.api.body import read_body
from mlx_stack.embeddings.api.connection import ConnectionLimits
from mlx_stack.embeddings.api.openapi import ModelLimits, openapi_document
from mlx_stack.embeddings.api.protocol import MAX_TOKEN_ID, decode_request
from mlx_stack.embeddings.api.server import ServedModel, create_app
from mlx_stack.embeddings.cpu.blas import BlasInfo
from mlx_stack.embeddings.model.settings import resolve
from mlx_stack.embeddings.serving.service import EmbeddingService

# --- Host ------------------------------------------------------------------------------------

LOOPBACK = ["localhost", "localhost:8003", "LOCALHOST:1", "localhost:", "127.0.0.1",
            "127.0.0.1:8003", "127.255.1.2:80", "[::1]", "[::1]:8003", "[::ffff:127.0.0.1]:1"]
FOREIGN = ["evil.example", "evil.example:8003", "localhost.evil.example", "127.0.0.1.nip.io",
           "0.0.0.0", "192.168.1.5:8003", "localhost:abc", "localhost:\uff18\uff10", "[::1",
           "::1", "", "[fe80::1]", "127.1", "[localhost]", "localhost.", "local host"]


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_hosts_are_served(host: str) -> None:
    assert AccessPolicy().allows_host(host)


@pytest.mark.parametrize("host", FOREIGN)
def test_other_hosts_are_refused(host: str) -> None:
    assert not AccessPolicy().allows_host(host)


def test_allowed_hosts_and_the_bound_address() -> None:
    policy = AccessPolicy.build(["MyHost.lan", "[fe80::1]", " 10.0.0.7 "], bind_host="192.168.1.5")
    for host in ("myhost.lan:8003", "MYHOST.LAN", "[fe80::1]:80", "10.0.0.7", "192.168.1.5:8003"):
        assert policy.allows_host(host), host
    assert not policy.allows_host("other.lan")
    assert not AccessPolicy.build(bind_host="0.0.0.0").allows_host("0.0.0.0")
    assert AccessPolicy.build(bind_host="127.0.0.1").hosts == frozenset()  # loopback already
    anything = AccessPolicy.build(["*"])
    assert anything.allows_host("whatever.example:1") and not anything.allows_host("[::1")


@pytest.mark.parametrize("entry", ["host:80", "a/b", "http://x", "[nothex]", "a b"])
def test_bad_allowed_host_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="--allowed-hosts"):
        AccessPolicy.build([entry])


# --- Origin ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("http://localhost:3000", "http://localhost:3000"),
        ("HTTP://LocalHost:3000", "http://localhost:3000"),
        ("https://app.example:443", "https://app.example"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("chrome-extension://abcdef", "chrome-extension://abcdef"),
        ("http://localhost:3000/path", None),
        ("http://user@host", None),
        ("http://host:99999", None),
        ("localhost:3000", None),
        ("null", None),
        ("", None),
    ],
)
def test_origins_normalise_like_browsers_send_them(text: str, normal: str | None) -> None:
    assert normal_origin(text) == normal


@pytest.mark.parametrize(("entry", "needle"), [("*", "any web page"), ("null", "any web page"),
                                               ("http://x/app", "not an origin")])
def test_wildcard_or_malformed_allowed_origins_are_refused(entry: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        AccessPolicy.build(origins=[entry])


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"vary", b"x")]})
    await send({"type": "http.response.body", "body": b"ran"})


def guarded(**headers: str) -> tuple[httpx.Response, list[str]]:
    """One request through :class:`AccessGuard` (allowing http://localhost:3000)."""
    refusals: list[str] = []
    policy = AccessPolicy.build(origins=["http://localhost:3000/"])
    guard = AccessGuard(ok_app, policy, refusals.append)
    method = headers.pop("method", "POST")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8003") as c:
            return await c.request(method, "/v1/embeddings", headers=headers, content=b"{}")

    return asyncio.run(call()), refusals


def test_requests_without_origin_pass_untouched() -> None:
    response, refusals = guarded()
    assert response.text == "ran" and not refusals
    assert "access-control-allow-origin" not in response.headers


def test_an_unlisted_origin_is_403_without_cors_headers() -> None:
    for headers in (
        {"origin": "http://evil.example", "content-type": "text/plain"},
        {"origin": "null"},
        {"origin": "http://localhost:3001"},
        {"sec-fetch-site": "cross-site"},
        {"method": "OPTIONS", "origin": "http://evil.example",
         "access-control-request-method": "POST"},
    ):
        response, refusals = guarded(**headers)
        assert response.status_code == 403, headers
        assert response.json()["error"]["code"] == "origin_not_allowed"
        assert response.headers["connection"] == "close"
        assert not any(h.startswith("access-control-") for h in response.headers), headers
        assert refusals == ["forbidden_origin"]


def test_a_foreign_host_is_403_naming_it() -> None:
    response, refusals = guarded(host="attacker.example:8003")
    assert response.status_code == 403 and refusals == ["forbidden_host"]
    error = response.json()["error"]
    assert error["param"] == "host" and "attacker.example" in error["message"]


def test_an_allowed_origin_gets_cors_headers() -> None:
    response, _ = guarded(origin="http://localhost:3000")
    assert response.text == "ran"
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-mlx-stack-truncated-inputs" in response.headers["access-control-expose-headers"]
    assert response.headers["vary"] == "x, Origin"


def test_an_allowed_origin_preflight_is_204() -> None:
    response, _ = guarded(
        method="OPTIONS",
        origin="http://localhost:3000",
        **{
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
            "access-control-request-private-network": "true",
        },
    )
    assert response.status_code == 204 and response.text == ""
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert response.headers["access-control-allow-methods"] == "GET, POST"
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert response.headers["access-control-allow-private-network"] == "true"
    assert response.headers["access-control-max-age"] == "600"


# --- errors ----------------------------------------------------------------------------------


def test_error_kinds_are_distinct_and_pickle_whole() -> None:
    labels = [kind.label for kind in ErrorKind]
    assert len(set(labels)) == len(labels) == len(ErrorKind)  # no silent enum aliases
    error = ApiError(ErrorKind.OVERLOADED, "busy", param="input", code="overloaded")
    again = pickle.loads(pickle.dumps(error))
    assert (again.kind, again.message, again.param, again.code) == (
        ErrorKind.OVERLOADED, "busy", "input", "overloaded")
    assert again.headers == {"Retry-After": "1"}
    assert ApiError(ErrorKind.REQUEST_TIMEOUT, "slow").headers == {"Connection": "close"}


def test_shown_bounds_what_a_message_echoes() -> None:
    assert len(shown("x" * 1_000_000)) < 100
    nested: list[object] = []
    for _ in range(5000):
        nested = [nested]
    assert len(shown(nested)) < 100  # no RecursionError either
    assert shown("minilm") == "'minilm'"


# --- decoding --------------------------------------------------------------------------------

BAD = {
    "integer of 5000 digits in input": (b'{"model":"m","input":[' + b"9" * 5000 + b"]}", "4300"),
    "integer of 5000 digits in dimensions": (
        b'{"model":"m","input":"a","dimensions":' + b"9" * 5000 + b"}", "4300"),
    "bad UTF-8": (b'{"model":"m","input":"\xff\xfe"}', "UTF-8"),
    "truncated UTF-8": (b'{"model":"m","input":"\xe2\x82"}', "UTF-8"),
    "lone surrogate": (b'{"model":"m","input":"a\\udc00"}', "surrogate"),
    "deep nesting": (b"[" * 100_000, "nested too deeply"),
    "deep nesting in a field": (b'{"model":"m","input":"a","user":' + b"[" * 5000 + b"}",
                                "nested too deeply"),
    "empty": (b"", "empty"),
    "fractional token id": (b'{"model":"m","input":[1, 2.5]}', "token ids"),
    "token id past int32": (b'{"model":"m","input":[[1, 2147483648]]}', "token ids"),
    "negative token id": (b'{"model":"m","input":[-1]}', "token ids"),
    "boolean dimensions": (b'{"model":"m","input":"a","dimensions":true}', "positive integer"),
    "empty encoding_format": (b'{"model":"m","input":"a","encoding_format":""}', "'float'"),
}


@pytest.mark.parametrize(("body", "needle"), BAD.values(), ids=BAD.keys())
def test_every_decoding_error_is_a_400(body: bytes, needle: str) -> None:
    with pytest.raises(ApiError) as caught:
        decode_request(body)
    assert caught.value.kind is ErrorKind.INVALID_REQUEST
    assert needle in caught.value.message
    assert len(caught.value.message) < 400  # nothing huge is echoed back


def test_a_huge_nested_value_is_not_echoed_whole() -> None:
    body = b'{"model":"m","input":"a","encoding_format":' + b"[" * 900 + b"]" * 900 + b"}"
    with pytest.raises(ApiError) as caught:
        decode_request(body)
    assert "'encoding_format'" in caught.value.message and len(caught.value.message) < 200


def test_integral_numbers_are_integers_as_in_json_schema() -> None:
    parsed = decode_request(b'{"model":"m","input":[101.0, 7592, 102],"dimensions":384.0}')
    assert parsed.dimensions == 384 and parsed.token_ids[0].tolist() == [101, 7592, 102]
    top = decode_request(b'{"model":"m","input":[[%d]]}' % MAX_TOKEN_ID).token_ids[0]
    assert top.tolist() == [MAX_TOKEN_ID]
    assert decode_request(b'{"model":"m","input":"a","encoding_format":null}').encoding_format \
        == "float"


# --- reading bodies --------------------------------------------------------------------------


def receiver(*messages: Message, then_wait: bool = False) -> Receive:
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then_wait:
            await asyncio.Event().wait()  # a client that stops sending
        raise AssertionError("read past the end")

    return receive


def read(receive: Receive, declared: str | None = None, timeout: float = 5.0) -> bytes:
    return asyncio.run(read_body(receive, declared, 100, timeout))


def test_read_body_joins_chunks() -> None:
    chunks = receiver({"type": "http.request", "body": b"ab", "more_body": True},
                      {"type": "http.request", "body": b"cd", "more_body": False})
    assert read(chunks) == b"abcd"


def test_read_body_refusals() -> None:
    cases = [
        (receiver(), "101", ErrorKind.PAYLOAD_TOO_LARGE),  # declared: nothing is read
        (receiver({"type": "http.request", "body": b"x" * 101}), None,
         ErrorKind.PAYLOAD_TOO_LARGE),
        (receiver({"type": "http.request", "body": b"{", "more_body": True}, then_wait=True),
         None, ErrorKind.REQUEST_TIMEOUT),
        (receiver({"type": "http.request", "body": b"{", "more_body": True},
                  {"type": "http.disconnect"}), None, ErrorKind.CLIENT_CLOSED),
    ]
    for receive, declared, kind in cases:
        with pytest.raises(ApiError) as caught:
            read(receive, declared, timeout=0.05)
        assert caught.value.kind is kind


def test_connection_limits_refuse_nonsense() -> None:
    for bad in ({"header_timeout": 0}, {"body_timeout": -1}, {"max_connections": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ConnectionLimits(**bad)  # type: ignore[arg-type]


# --- the OpenAPI document --------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_and_document() -> tuple[object, dict]:
    settings = resolve(minilm_path())
    service = EmbeddingService(settings, loader=lambda *_: None)  # type: ignore[arg-type,return-value]
    served = ServedModel("minilm", ("alias",), BlasInfo("test", None), 0)
    app = create_app(service, served)
    return app, openapi_document(served.names, 1000, ModelLimits((384, 384), 30522))


def test_openapi_document_is_valid_openapi_3_1(app_and_document: tuple[object, dict]) -> None:
    _, document = app_and_document
    assert document["openapi"] == "3.1.0"
    validate(document)
    json.dumps(document)  # served as JSON


def test_openapi_document_has_every_route(app_and_document: tuple[object, dict]) -> None:
    app, document = app_and_document
    routes = {
        route.path.replace(":path}", "}"): set(route.methods or ()) - {"HEAD"}
        for route in app.routes  # type: ignore[attr-defined]
        if isinstance(route, Route)
    }
    documented = {path: {m.upper() for m in item if m != "parameters"}
                  for path, item in document["paths"].items()}
    assert documented == routes


def test_openapi_document_names_every_status_and_the_model(
    app_and_document: tuple[object, dict],
) -> None:
    _, document = app_and_document
    statuses = {int(code) for item in document["paths"].values() for op in item.values()
                if isinstance(op, dict) for code in op.get("responses", {})}
    never_in_an_operation = {405, 499}  # wrong method (described in info); nobody to answer
    assert {k.status for k in ErrorKind} - never_in_an_operation | {200} <= statuses
    request = document["components"]["schemas"]["Request"]["properties"]
    assert request["model"]["enum"] == ["minilm", "alias"]
    assert request["dimensions"]["minimum"] == request["dimensions"]["maximum"] == 384
    token_ids = request["input"]["oneOf"][2]
    assert token_ids["items"]["maximum"] == 30521
    error_types = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error_types["properties"]["type"]["enum"]) == {k.error_type for k in ErrorKind}
