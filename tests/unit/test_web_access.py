"""Pure decisions of the stack's web defences: the chat guard, the proxy's web guard, the
stack file's ``proxy.cors_origins`` and the exposure warning, the backend key's fingerprints."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from mlx_stack.backendkey import bearer_matches
from mlx_stack.chat.guard import ServedModel, body_refusal, content_type_refusal, header_refusal
from mlx_stack.config.catalog import load_catalog
from mlx_stack.config.plan import Probe, ProbeKind, ServiceKind, ServiceSpec
from mlx_stack.config.settings import ProxySettings
from mlx_stack.config.stackfile import parse_stack_text, render_stack
from mlx_stack.errors import ConfigError
from mlx_stack.litellm.webguard import WebAccess

SERVED = ServedModel.of("/models/tiny", "/real/models/tiny")


@pytest.mark.parametrize(
    ("hosts", "origins", "site", "auth", "status"),
    [
        (["localhost:8000"], [], None, "Bearer k", None),
        (["127.0.0.9"], [], None, "Bearer k", None),
        (["[::1]:1"], [], None, "bearer k", None),
        ([], [], None, "Bearer k", None),  # HTTP/1.0 without Host: a program
        (["evil.example"], [], None, "Bearer k", 403),
        (["localhost", "localhost"], [], None, "Bearer k", 403),
        (["localhost"], ["http://localhost:3000"], None, "Bearer k", 403),
        (["localhost"], ["null"], None, "Bearer k", 403),
        (["localhost"], [], "cross-site", "Bearer k", 403),
        (["localhost"], [], None, None, 401),
        (["localhost"], [], None, "Bearer kk", 401),
        (["localhost"], [], None, "Basic k", 401),
    ],
)
def test_chat_header_decisions(hosts, origins, site, auth, status):
    refusal = header_refusal(hosts, origins, site, auth, "k")
    assert (refusal.status if refusal else None) == status


def test_no_key_configured_means_no_key_check_and_health_is_open():
    assert header_refusal(["localhost"], [], None, None, None) is None
    assert header_refusal(["localhost"], [], None, None, "k", needs_key=False) is None


@pytest.mark.parametrize(
    ("ctype", "refused"),
    [("application/json", False), (None, False), ("application/x-www-form-urlencoded", False),
     ("text/plain", True), ("TEXT/PLAIN; charset=utf-8", True), ("multipart/form-data", True)],
)  # fmt: skip
def test_chat_content_types(ctype, refused):
    assert (content_type_refusal(ctype) is not None) is refused


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "other"}, "model"),
        ({"model": "../tiny"}, "model"),
        ({"model": 1}, "model"),
        ({"model": None}, "model"),
        ({"adapters": "x"}, "adapters"),
        ({"draft_model": "/models/tiny"}, "draft_model"),
    ],
)
def test_a_body_that_changes_the_model_is_refused(body, param):
    refusal, _ = body_refusal(json.dumps(body).encode(), SERVED)
    assert refusal is not None and refusal.status == 400
    assert json.loads(refusal.body())["error"]["param"] == param


def test_the_served_names_pass_and_the_resolved_path_becomes_the_given_one():
    for body in ({}, {"model": "default_model"}, {"model": "/models/tiny"}, {"adapters": None}):
        raw = json.dumps(body).encode()
        assert body_refusal(raw, SERVED) == (None, raw)
    refusal, raw = body_refusal(b'{"model": "/real/models/tiny"}', SERVED)
    assert refusal is None and json.loads(raw)["model"] == "/models/tiny"


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"1" * 5000, b"[" * 100_000])
def test_bodies_that_are_not_json_objects_are_400(raw):
    refusal, _ = body_refusal(raw, SERVED)
    assert refusal is not None and refusal.status == 400


def test_bearer_matches():
    assert bearer_matches("Bearer abc", "abc") and bearer_matches(" bearer  abc ", "abc")
    assert not bearer_matches(None, "abc") and not bearer_matches("abc", "abc")


@pytest.mark.parametrize(
    ("bind", "host", "allowed"),
    [
        ("127.0.0.1", "localhost:4000", True),
        ("127.0.0.1", "evil.example:4000", False),
        ("127.0.0.1", "192.168.1.5:4000", False),
        ("192.168.1.5", "192.168.1.5:4000", True),
        ("192.168.1.5", "10.0.0.1", False),
        ("0.0.0.0", "mymac.lan:4000", True),
        ("::", "anything", True),
    ],
)
def test_proxy_hosts(bind, host, allowed):
    access = WebAccess.from_env({"MLX_STACK_WEB_ACCESS": WebAccess.for_bind(bind).to_env()})
    assert (access.refusal([host], [], None) is None) is allowed


def test_proxy_origins():
    access = WebAccess.for_bind("127.0.0.1", ("http://localhost:3000/",))
    assert access.refusal(["localhost"], ["http://LOCALHOST:3000"], None) is None
    assert access.refusal(["localhost"], ["http://localhost:3001"], None) is not None
    assert access.refusal(["localhost"], ["null"], None) is not None
    assert access.refusal(["localhost"], [], "cross-site") is not None
    assert access.refusal(["localhost"], [], "same-origin") is None
    assert WebAccess.from_env({"MLX_STACK_WEB_ACCESS": "not json"}) == WebAccess()


STACK = """\
version: 1
tiers:
  standard:
    model: qwen3-8b
    port: 8000
proxy:
  port: 4000
"""


def parse(text: str):
    return parse_stack_text(text, Path("stack.yaml"), load_catalog(), "Linux")


def test_cors_origins_in_the_stack_file():
    stack = parse(STACK + "  cors_origins: ['http://localhost:3000/', 'https://x.example']\n")
    assert stack.proxy.cors_origins == ("http://localhost:3000", "https://x.example")
    assert parse(render_stack(stack, header="t")).proxy == stack.proxy
    assert parse(STACK).proxy.cors_origins == ()


@pytest.mark.parametrize("entry", ["'*'", "'null'", "'localhost:3000'", "'http://x/path'", "3"])
def test_bad_cors_origins_are_named(entry):
    with pytest.raises(ConfigError, match=r"proxy\.cors_origins\[0\]"):
        parse(STACK + f"  cors_origins: [{entry}]\n")


@pytest.mark.parametrize(
    ("host", "warned"), [("127.0.0.1", False), ("::1", False), ("0.0.0.0", True),
                         ("::", True), ("192.168.1.5", True)],
)  # fmt: skip
def test_exposure_warning(host, warned):
    warning = ProxySettings(host=host).exposure()
    assert (warning is not None) is warned
    if warning:
        assert "reachable from other machines" in warning


def test_the_backend_key_changes_no_fingerprint():
    def spec(key: str | None) -> ServiceSpec:
        env = {"MLX_STACK_BACKEND_KEY": key} if key else {}
        return ServiceSpec(name="standard", kind=ServiceKind.CHAT, argv=("x",), port=8000,
                           host="127.0.0.1", probe=Probe(ProbeKind.CHAT, "u", key=key),
                           session_env=env)  # fmt: skip

    assert spec(None).fingerprint == spec("bk-1").fingerprint == spec("bk-2").fingerprint
    assert "bk-1" not in repr(spec("bk-1"))
    assert spec("bk-1").full_env()["MLX_STACK_BACKEND_KEY"] == "bk-1"


def test_the_name_of_the_python_changes_no_fingerprint(monkeypatch):
    """`mlx-stack status` run as `python -m` (python vs the script's python3) saw every
    service as "stack file changed: being applied"."""
    def spec() -> ServiceSpec:
        return ServiceSpec(name="standard", kind=ServiceKind.CHAT, port=8000, host="127.0.0.1",
                           argv=(sys.executable, "-m", "mlx_stack.chat", "--port", "8000"),
                           probe=Probe(ProbeKind.CHAT, "u"))  # fmt: skip

    before = spec().fingerprint
    monkeypatch.setattr(sys, "executable", sys.executable + "3")
    assert spec().fingerprint == before
    changed = spec()
    assert dataclasses.replace(changed, argv=(*changed.argv[:-1], "8001")).fingerprint != before


def _through_guard(access: WebAccess, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
    """One request through WebGuard to an app that answers like LiteLLM's CORS (``*``)."""
    import asyncio

    from mlx_stack.litellm.webguard import WebGuard

    async def litellm_like(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"access-control-allow-origin", b"*"), (b"access-control-allow-credentials", b"true"),
            (b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"{}"})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": headers}
    asyncio.run(WebGuard(litellm_like, access)(scope, receive, send))
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


def test_the_proxy_guard_rewrites_litellm_cors():
    access = WebAccess.for_bind("127.0.0.1", ("http://localhost:3000",))
    status, headers = _through_guard(access, [(b"host", b"localhost:4000")])
    assert status == 200 and not any(h.startswith("access-control-") for h in headers)
    status, headers = _through_guard(
        access, [(b"host", b"localhost:4000"), (b"origin", b"http://localhost:3000")])
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    assert headers["vary"] == "Origin"
    status, headers = _through_guard(
        access, [(b"host", b"localhost:4000"), (b"origin", b"http://evil.example")])
    assert status == 403 and not any(h.startswith("access-control-") for h in headers)
    status, _ = _through_guard(access, [(b"host", b"evil.example:4000")])
    assert status == 403
