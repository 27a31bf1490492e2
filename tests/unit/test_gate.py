"""The proxy's gate (mlx_stack/litellm/gate.py): decisions as a table, and the ASGI middleware
in-process in front of a recording app. The real proxy with the gate is in tests/e2e."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from mlx_stack.litellm.gate import (
    Route,
    StateView,
    TierGate,
    decide,
    routes_from_env,
    routes_to_env,
)

ROUTES = {"standard": Route("standard", ("fast",)), "fast": Route("fast", ("standard",)),
          "local-embed": Route("embeddings")}
KEY = "sk-test-key"


@pytest.mark.parametrize(
    ("model", "states", "to", "refused"),
    [
        ("standard", {"standard": "ready", "fast": "ready"}, None, False),
        ("standard", {"standard": "unhealthy", "fast": "ready"}, "fast", False),
        ("standard", {"standard": "backoff", "fast": "starting"}, None, True),
        ("fast", {"standard": "ready", "fast": "stopping"}, "standard", False),
        ("local-embed", {"embeddings": "unhealthy"}, None, True),
        ("local-embed", {"embeddings": "ready", "standard": "fatal"}, None, False),
        ("not-a-model", {"standard": "fatal"}, None, False),  # LiteLLM answers that itself
        ("standard", {}, None, False),  # no view: pass
    ],
)
def test_decide(model, states, to, refused):
    d = decide(model, ROUTES, states)
    assert d.model == to and bool(d.refuse) == refused
    if refused:
        assert "retry in" in d.refuse


def test_routes_round_trip_through_the_environment():
    assert routes_from_env({"MLX_STACK_ROUTES": routes_to_env(ROUTES)}) == ROUTES


class Recorder:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def call(app, body: dict | bytes, key: str = KEY, path: str = "/v1/chat/completions"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"authorization", f"Bearer {key}".encode()),
                         (b"content-length", str(len(raw)).encode())]}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(msg):
        sent.append(msg)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = dict(start["headers"])
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def gate(tmp_path: Path, states: dict[str, str]) -> tuple[TierGate, Recorder]:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"services": {n: {"state": s} for n, s in states.items()}}))
    rec = Recorder()
    return TierGate(rec, ROUTES, StateView(state), KEY, hold_s=0.3), rec


def test_all_ready_passes_untouched(tmp_path):
    g, rec = gate(tmp_path, {"standard": "ready", "fast": "ready", "embeddings": "ready"})
    status, _, _ = call(g, {"model": "standard", "messages": []})
    assert status == 200 and json.loads(rec.bodies[0])["model"] == "standard"


def test_a_down_tier_is_routed_to_its_fallback(tmp_path):
    g, rec = gate(tmp_path, {"standard": "unhealthy", "fast": "ready", "embeddings": "ready"})
    status, headers, _ = call(g, {"model": "standard", "messages": [], "stream": True})
    sent = json.loads(rec.bodies[0])
    assert status == 200 and sent["model"] == "fast" and sent["stream"] is True
    assert headers[b"x-mlx-stack-routed"] == b"fast"


def test_embeddings_down_is_a_503_with_retry_after_after_the_hold(tmp_path):
    import time

    g, rec = gate(tmp_path, {"standard": "ready", "fast": "ready", "embeddings": "backoff"})
    t0 = time.monotonic()
    status, headers, body = call(g, {"model": "local-embed", "input": "x"}, path="/v1/embeddings")
    assert 0.3 <= time.monotonic() - t0 < 1.0  # held hold_s for the tier, then refused
    assert status == 503 and headers[b"retry-after"] == b"2" and rec.bodies == []
    err = json.loads(body)["error"]
    assert err["type"] == "service_unavailable" and "embeddings is backoff" in err["message"]


@pytest.mark.parametrize("key", ["", "wrong-key"])
def test_without_the_key_the_gate_says_nothing(tmp_path, key):
    """Only LiteLLM answers unauthenticated requests (with its 401)."""
    g, rec = gate(tmp_path, {"embeddings": "backoff"})
    status, _, _ = call(g, {"model": "local-embed", "input": "x"}, key=key,
                        path="/v1/embeddings")
    assert status == 200 and len(rec.bodies) == 1  # passed through to the app


@pytest.mark.parametrize("body", [b"not json", b"[" * 50000, b'{"model": 5}', b"[]"])
def test_odd_bodies_pass_through_for_litellm_to_answer(tmp_path, body):
    g, rec = gate(tmp_path, {"standard": "backoff", "fast": "backoff"})
    status, _, _ = call(g, body)
    assert status == 200 and rec.bodies == [body]


def test_an_unreadable_state_file_means_no_gate(tmp_path):
    (tmp_path / "state.json").mkdir()
    rec = Recorder()
    g = TierGate(rec, ROUTES, StateView(tmp_path / "state.json"), KEY)
    assert call(g, {"model": "local-embed", "input": "x"})[0] == 200


class Failing(Recorder):
    async def __call__(self, scope, receive, send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": {}}'})


@pytest.mark.parametrize(("states", "status"), [({"embeddings": "backoff"}, 503),
                                                ({"embeddings": "ready"}, 500)])
def test_a_500_while_a_tier_is_down_becomes_a_503(tmp_path, states, status):
    """A request already waiting on a tier that hung fails when the tier is killed."""
    g, _ = gate(tmp_path, states)
    g.app = Failing()
    got, headers, _ = call(g, {"model": "local-embed", "input": "x"}, key="other",
                           path="/v1/embeddings")
    assert got == status and (b"retry-after" in headers) == (status == 503)


def test_a_request_held_while_its_tier_restarts_goes_through_when_it_is_back(tmp_path):
    import threading

    g, rec = gate(tmp_path, {"embeddings": "starting"})
    g.hold_s = 5.0
    state = tmp_path / "state.json"

    def back() -> None:
        state.write_text(json.dumps({"services": {"embeddings": {"state": "ready"}}}))

    threading.Timer(0.5, back).start()
    status, _, _ = call(g, {"model": "local-embed", "input": "x"}, path="/v1/embeddings")
    assert status == 200 and len(rec.bodies) == 1


class FailsOnce(Recorder):
    """Fails the first request (the tier died under it), then the tier is back."""

    def __init__(self, state: Path) -> None:
        super().__init__()
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if self.bodies:
            await super().__call__(scope, receive, send)
            return
        self.bodies.append((await receive())["body"])
        self.state.write_text(json.dumps({"services": {"embeddings": {"state": "starting"}}}))

        def back() -> None:
            self.state.write_text(json.dumps({"services": {"embeddings": {"state": "ready"}}}))

        import threading

        threading.Timer(0.4, back).start()
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": "connection reset"}'})


def test_a_request_caught_by_a_failing_tier_is_sent_again_when_it_is_back(tmp_path):
    g, _ = gate(tmp_path, {"embeddings": "ready"})
    g.hold_s = 5.0
    g.app = FailsOnce(tmp_path / "state.json")
    status, _, _ = call(g, {"model": "local-embed", "input": "x"}, path="/v1/embeddings")
    assert status == 200
    assert len(g.app.bodies) == 2 and g.app.bodies[0] == g.app.bodies[1]


def test_an_error_after_the_tier_restarted_under_the_request_is_retried(tmp_path):
    """LiteLLM may answer only once the tier is ready again (its own retries took that long):
    the restart shows in the snapshot's started_at, so the gate still sends it again."""
    import time

    state = tmp_path / "state.json"

    class LoadingThenOk(Recorder):
        async def __call__(self, scope, receive, send) -> None:
            if self.bodies:
                await super().__call__(scope, receive, send)
                return
            self.bodies.append((await receive())["body"])
            state.write_text(json.dumps({"services": {"embeddings": {
                "state": "ready", "started_at": time.time()}}}))  # restarted, ready again
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": "still loading"}'})

    g, _ = gate(tmp_path, {"embeddings": "ready"})
    g.app = LoadingThenOk()
    status, _, _ = call(g, {"model": "local-embed", "input": "x"}, path="/v1/embeddings")
    assert status == 200 and len(g.app.bodies) == 2


@pytest.mark.parametrize(("body", "relabelled"), [(b'{"model": "x"}', True),
                                                  (b"{" + b'"a":[' * 30000, False),
                                                  (b"a=1&b=2", False)])
def test_the_content_type_shim_relabels_json_and_survives_any_body(body, relabelled):
    """curl -d sends JSON as a form; a deeply nested body must not become a 500 in the shim."""
    from mlx_stack.litellm.launch import JsonBodyShim

    seen: list[tuple[bytes, bytes]] = []

    async def app(scope, receive, send) -> None:
        msg = await receive()
        seen.append((dict(scope["headers"]).get(b"content-type", b""), msg["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings",
             "headers": [(b"content-type", b"application/x-www-form-urlencoded")]}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(_msg) -> None:
        pass

    asyncio.run(JsonBodyShim(app)(scope, receive, send))
    ctype, got = seen[0]
    assert got == body and (ctype == b"application/json") == relabelled
