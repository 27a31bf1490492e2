"""The proxy's embeddings fast lane (mlx_stack/litellm/fastlane.py), in-process: which requests
it takes, what it sends upstream, what it answers. Through the real proxy: tests/e2e."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml
from aiohttp import web

from mlx_stack.backendkey import LITELLM_API_KEY
from mlx_stack.litellm.fastlane import FastLane, Upstream, upstreams_from_config
from mlx_stack.ports import free_port

KEY = "sk-test-key"
AUTH = (b"authorization", f"Bearer {KEY}".encode())


def test_upstreams_from_config_takes_loopback_embedding_deployments(tmp_path: Path) -> None:
    config = {"model_list": [
        {"model_name": "fast", "litellm_params": {"api_base": "http://127.0.0.1:1/v1"},
         "model_info": {"mode": "chat"}},
        {"model_name": "local-embed",
         "litellm_params": {"api_base": "http://127.0.0.1:8200/v1", "timeout": 30,
                            "api_key": LITELLM_API_KEY},
         "model_info": {"mode": "embedding"}},
        {"model_name": "remote", "litellm_params": {"api_base": "https://example.com/v1",
                                                    "api_key": LITELLM_API_KEY},
         "model_info": {"mode": "embedding"}},
        # An external server on loopback (Ollama): not the stack's, never given its backend
        # key; its vectors go through normalize.py and LiteLLM instead.
        {"model_name": "ollama-embed", "litellm_params": {
            "api_base": "http://127.0.0.1:11434/v1", "api_key": "no-key"},
         "model_info": {"mode": "embedding"}},
    ]}
    path = tmp_path / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    assert upstreams_from_config(path) == {
        "local-embed": (Upstream("http://127.0.0.1:8200/v1/embeddings", 30.0),)}


async def _call(app, path: str, body: bytes, headers: list[tuple[bytes, bytes]]):
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    await app(scope, receive, send)
    status = sent[0]["status"]
    return status, dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


async def _litellm(scope, receive, send):
    """Stands for LiteLLM: says it was reached."""
    await send({"type": "http.response.start", "status": 299, "headers": []})
    await send({"type": "http.response.body", "body": b"litellm"})


def test_takes_only_keyed_embedding_requests_for_its_models() -> None:
    async def scenario() -> None:
        seen: list[tuple[str, bytes]] = []

        async def upstream(request: web.Request) -> web.Response:
            seen.append((request.headers["authorization"], await request.read()))
            return web.json_response({"object": "list", "model": "local-embed"})

        app = web.Application()
        app.router.add_post("/v1/embeddings", upstream)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        lane = FastLane(_litellm, {"local-embed": (
            Upstream(f"http://127.0.0.1:{port}/v1/embeddings", 10.0),)}, KEY, "bk-backend")
        body = json.dumps({"model": "local-embed", "input": "hi"}).encode()
        try:
            status, headers, payload = await _call(lane, "/v1/embeddings", body, [AUTH])
            assert status == 200 and json.loads(payload)["model"] == "local-embed"
            assert headers[b"x-content-type-options"] == b"nosniff"
            assert seen == [("Bearer bk-backend", body)]  # verbatim, with the backend key
            for path, raw, headers_ in [
                ("/v1/embeddings", body, []),  # no key: LiteLLM answers 401
                ("/v1/embeddings", body, [(b"authorization", b"Bearer sk-wrong")]),
                ("/v1/embeddings", b'{"model": "other", "input": "x"}', [AUTH]),
                ("/v1/embeddings", b"not json", [AUTH]),
                ("/v1/chat/completions", body, [AUTH]),
            ]:
                assert (await _call(lane, path, raw, headers_))[0] == 299, (path, raw)
            await runner.cleanup()
            status, headers, payload = await _call(lane, "/v1/embeddings", body, [AUTH])
            assert status == 503 and "did not answer" in json.loads(payload)["error"]["message"]
            assert headers[b"retry-after"] == b"2"  # as the gate's own 503 says
        finally:
            await runner.cleanup()
            if lane._session is not None:
                await lane._session.close()

    asyncio.run(scenario())
