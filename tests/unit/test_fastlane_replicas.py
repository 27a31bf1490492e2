"""The fast lane with replicas (mlx_stack/litellm/fastlane.py), in-process on real aiohttp
servers: it balances over the ready replicas the supervisor's snapshot shows, sends nothing
to one being drained, fails over when one drops, keeps one model during a rolling model
change, and steps aside for a model name with a deployment that is not the stack's own."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from mlx_stack.litellm import gate
from mlx_stack.litellm.fastlane import FastLane, Upstream, upstreams_from_config
from mlx_stack.litellm.gate import Route, StateView
from mlx_stack.ports import free_port

KEY = "sk-test-key"
AUTH = (b"authorization", f"Bearer {KEY}".encode())
BODY = json.dumps({"model": "local-embed", "input": "hi"}).encode()
ROUTES = {"local-embed": Route("embeddings", replicas=(("embeddings", 8003),
                                                       ("embeddings-2", 8004)))}


def _deployment(base: str, name: str = "local-embed") -> dict:
    return {"model_name": name, "litellm_params": {"api_base": base, "timeout": 30},
            "model_info": {"mode": "embedding"}}


def test_every_replica_of_the_stack_is_an_upstream_under_its_service_name(tmp_path: Path):
    path = tmp_path / "litellm.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        _deployment("http://127.0.0.1:8003/v1"), _deployment("http://127.0.0.1:8004/v1")]}))
    assert upstreams_from_config(path, ROUTES) == {"local-embed": (
        Upstream("http://127.0.0.1:8003/v1/embeddings", 30.0, "embeddings"),
        Upstream("http://127.0.0.1:8004/v1/embeddings", 30.0, "embeddings-2"))}


@pytest.mark.parametrize("other", [
    "http://127.0.0.2:4000/v1",  # a remote stack's proxy (another address)
    "https://gpu-box.example:4000/v1",
    "http://127.0.0.1:4100/v1",  # loopback, but no service of this stack: another stack
])
def test_a_name_with_any_foreign_deployment_is_left_to_litellms_router(tmp_path: Path, other):
    path = tmp_path / "litellm.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        _deployment("http://127.0.0.1:8003/v1"), _deployment(other),
        _deployment("http://127.0.0.1:8005/v1", "other-embed")]}))
    routes = {**ROUTES, "other-embed": Route("x", replicas=(("x", 8005),))}
    assert upstreams_from_config(path, routes) == {"other-embed": (
        Upstream("http://127.0.0.1:8005/v1/embeddings", 30.0, "x"),)}


def _write_state(path: Path, services: dict[str, dict]) -> None:
    path.write_text(json.dumps({"services": services}))


async def _call(app, body: bytes = BODY):
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": [AUTH]},
              receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


async def _litellm(scope, receive, send):
    await send({"type": "http.response.start", "status": 299, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class Replicas:
    """Two real HTTP servers that answer with their own name (and can be slow or gone)."""

    def __init__(self) -> None:
        self.ports = {"embeddings": free_port(), "embeddings-2": free_port()}
        self.delay = {"embeddings": 0.0, "embeddings-2": 0.0}
        self.runners: dict[str, web.AppRunner] = {}

    async def start(self, name: str) -> None:
        async def answer(request: web.Request) -> web.Response:
            await asyncio.sleep(self.delay[name])
            return web.json_response({"object": "list", "served_by": name})

        app = web.Application()
        app.router.add_post("/v1/embeddings", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.ports[name]).start()
        self.runners[name] = runner

    async def stop(self, name: str) -> None:
        await self.runners.pop(name).cleanup()

    def lane(self, view: StateView | None) -> FastLane:
        ups = tuple(Upstream(f"http://127.0.0.1:{p}/v1/embeddings", 10.0, n)
                    for n, p in self.ports.items())
        return FastLane(_litellm, {"local-embed": ups}, KEY, "bk", view=view)


def _run(scenario) -> None:
    async def wrapped() -> None:
        r = Replicas()
        for name in r.ports:
            await r.start(name)
        lane = None
        try:
            lane = await scenario(r)
        finally:
            for name in list(r.runners):
                await r.stop(name)
            if lane is not None and lane._session is not None:
                await lane._session.close()

    asyncio.run(wrapped())


def _ready(model: str = "m", started: float = 1.0, in_route: bool = True) -> dict:
    return {"state": "ready", "model": model, "started_at": started, "in_route": in_route}


def test_requests_are_spread_over_the_ready_replicas(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gate, "REREAD_S", 0.0)
    state = tmp_path / "state.json"
    _write_state(state, {"embeddings": _ready(), "embeddings-2": _ready()})

    async def scenario(r: Replicas) -> FastLane:
        lane = r.lane(StateView(state))
        served = Counter([(await _call(lane))[1]["served_by"] for _ in range(20)])
        assert served == {"embeddings": 10, "embeddings-2": 10}  # in turn when idle
        # Concurrent requests: the one with fewer in flight gets the next.
        r.delay["embeddings"] = 0.3
        answers = await asyncio.gather(*(_call(lane) for _ in range(8)))
        assert all(status == 200 for status, _ in answers)
        busy = Counter(a["served_by"] for _, a in answers)
        assert busy["embeddings-2"] >= 4, busy
        return lane

    _run(scenario)


def test_a_replica_out_of_the_route_or_not_ready_gets_no_request(tmp_path: Path,
                                                                 monkeypatch) -> None:
    monkeypatch.setattr(gate, "REREAD_S", 0.0)
    state = tmp_path / "state.json"

    async def scenario(r: Replicas) -> FastLane:
        lane = r.lane(StateView(state))
        for other in ({**_ready(), "in_route": False},  # drained before a replacement
                      {"state": "starting"}, {"state": "stopping"}, {"state": "backoff"}):
            _write_state(state, {"embeddings": other, "embeddings-2": _ready()})
            await asyncio.sleep(0.01)  # a new mtime
            served = {(await _call(lane))[1]["served_by"] for _ in range(6)}
            assert served == {"embeddings-2"}, other
        return lane

    _run(scenario)


def test_a_replica_that_drops_gets_its_request_sent_to_the_other(tmp_path: Path,
                                                                  monkeypatch) -> None:
    monkeypatch.setattr(gate, "REREAD_S", 0.0)
    state = tmp_path / "state.json"
    _write_state(state, {"embeddings": _ready(), "embeddings-2": _ready()})

    async def scenario(r: Replicas) -> FastLane:
        lane = r.lane(StateView(state))
        await r.stop("embeddings")  # killed: the snapshot still says ready
        answers = [await _call(lane) for _ in range(6)]
        assert all(status == 200 and a["served_by"] == "embeddings-2" for status, a in answers)
        await r.stop("embeddings-2")  # both gone: a 503 the gate holds and resends
        status, answer = await _call(lane)
        assert status == 503 and answer["error"]["code"] == "upstream_unavailable"
        return lane

    _run(scenario)


def test_during_a_model_change_only_the_new_model_serves_once_it_is_ready(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gate, "REREAD_S", 0.0)
    state = tmp_path / "state.json"

    async def scenario(r: Replicas) -> FastLane:
        lane = r.lane(StateView(state))
        _write_state(state, {"embeddings": _ready("new-model", started=200.0),
                             "embeddings-2": _ready("old-model", started=100.0)})
        served = {(await _call(lane))[1]["served_by"] for _ in range(6)}
        assert served == {"embeddings"}  # never a mix of two vector spaces
        return lane

    _run(scenario)


def test_without_a_supervisor_view_every_replica_is_used(tmp_path: Path) -> None:
    async def scenario(r: Replicas) -> FastLane:
        lane = r.lane(StateView(tmp_path / "no-such-state.json"))
        served = {(await _call(lane))[1]["served_by"] for _ in range(4)}
        assert served == {"embeddings", "embeddings-2"}
        return lane

    _run(scenario)
