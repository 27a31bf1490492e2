"""The whole stack, for real: `mlx-stack up` starts mlx_lm.server tiers, the embeddings server
and the LiteLLM proxy as processes; clients talk to the proxy over HTTP; `down` leaves nothing.

Nothing is mocked. The chat model is a tiny random llama built by a fixture (no chat weights
reach this machine), so chat answers are gibberish: the tests check the protocol, not the prose.
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import psutil
import pytest

from mlx_stack import ports

pytestmark = pytest.mark.e2e


def proxy_client(env, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=env.url("proxy") + "/v1", api_key=env.key(), max_retries=0, **kw)


def test_status_json_shows_every_service_ready(live_stack):
    st = live_stack.status()
    by_name = {s["name"]: s for s in st["services"]}
    assert set(by_name) == {"standard", "fast", "embeddings", "proxy"}
    for name, s in by_name.items():
        assert s["state"] == "ready", s
        assert s["port"] == live_stack.ports[name]
        assert psutil.pid_exists(s["pid"])
        assert s["uptime_s"] >= 0 and s["rss_mb"] > 0
    assert by_name["embeddings"]["model"] == "all-minilm-l6-v2"
    assert by_name["standard"]["model"] == "tiny-chat"
    assert st["warnings"] == []
    served = json.loads((live_stack.home / "embeddings-model.json").read_text())["current"]
    assert served["model"] == "all-minilm-l6-v2" and len(served["weights"]) == 64


def test_the_recorded_embeddings_identity_is_the_one_the_server_reports(live_stack):
    """One model-folder identity: what `up` records equals the served content_sha256."""
    recorded = json.loads((live_stack.home / "embeddings-model.json").read_text())["current"]
    models = httpx.get(f"{live_stack.url('embeddings')}/v1/models", timeout=30,
                       headers=live_stack.backend_headers()).json()["data"]
    assert recorded["weights"] == models[0]["content_sha256"]


def test_curl_style_embedding_through_the_proxy(live_stack):
    """The README's curl: a JSON body with no Content-Type header (curl -d)."""
    r = httpx.post(
        live_stack.url("proxy") + "/v1/embeddings",
        content=json.dumps({"model": "local-embed", "input": "test query"}),
        headers={
            "Authorization": f"Bearer {live_stack.key()}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    vec = np.array(r.json()["data"][0]["embedding"])
    assert vec.shape == (384,)
    assert abs(np.linalg.norm(vec) - 1) < 1e-4


def test_openai_client_embeddings_base64_and_float(live_stack):
    client = proxy_client(live_stack)
    texts = [
        "How do I reduce API latency?",
        "Tips to make endpoints respond faster",
        "A recipe for banana bread",
    ]
    default = client.embeddings.create(model="local-embed", input=texts)  # SDK sends base64
    floats = client.embeddings.create(model="local-embed", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    assert a.shape == b.shape == (3, 384)
    assert np.allclose(a, b, atol=1e-6)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-4)
    sims = a @ a.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # a paraphrase is nearer than an unrelated text
    assert floats.usage.prompt_tokens > 0


def test_raw_base64_is_little_endian_float32(live_stack):
    r = httpx.post(
        live_stack.url("proxy") + "/v1/embeddings",
        timeout=60,
        headers={"Authorization": f"Bearer {live_stack.key()}"},
        json={"model": "local-embed", "input": "hello", "encoding_format": "base64"},
    )
    assert r.status_code == 200, r.text
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-4


@pytest.mark.parametrize("tier", ["standard", "fast"])
def test_openai_client_chat_and_streaming(live_stack, tier):
    client = proxy_client(live_stack)
    msgs = [{"role": "user", "content": "Say hello"}]
    out = client.chat.completions.create(model=tier, messages=msgs, max_tokens=4)
    assert out.choices[0].message.content
    assert out.usage.completion_tokens == 4
    stream = client.chat.completions.create(model=tier, messages=msgs, max_tokens=4, stream=True)
    pieces = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 2 and "".join(pieces).strip()


def test_the_proxy_requires_the_key(live_stack):
    body = {"model": "local-embed", "input": "x"}
    assert httpx.post(live_stack.url("proxy") + "/v1/embeddings", json=body).status_code == 401
    wrong = httpx.post(
        live_stack.url("proxy") + "/v1/embeddings",
        json=body,
        headers={"Authorization": "Bearer sk-wrong-key-0123456789"},
    )
    assert wrong.status_code in (400, 401)


def test_the_key_never_reaches_logs_config_or_output(live_stack):
    key = live_stack.key()
    home = live_stack.home
    for path in [*home.glob("logs/*.log"), *home.glob("run/*")]:
        assert key not in path.read_text(errors="replace"), path
    assert key not in live_stack.cli("status").stdout + live_stack.cli("status").stderr
    assert (home / "proxy.key").stat().st_mode & 0o077 == 0
    assert key in live_stack.cli("key", check=True).stdout  # only `key` shows it, on purpose


def test_backend_ports_answer_only_the_stack(live_stack):
    """Direct calls to a tier need the backend key; the proxy and the probes send it."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    embed = {"model": "all-minilm-l6-v2", "input": "x"}
    calls = [(live_stack.url("standard") + "/v1/chat/completions", chat),
             (live_stack.url("embeddings") + "/v1/embeddings", embed)]
    for url, body in calls:
        refused = httpx.post(url, json=body, timeout=60)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert "mlx-stack key --backend" in refused.json()["error"]["message"]
    for service in ("standard", "embeddings"):
        assert httpx.get(live_stack.url(service) + "/health").status_code == 200  # liveness
    backend_key = live_stack.cli("key", "--backend", check=True).stdout.strip()
    assert backend_key.startswith("bk-") and backend_key != live_stack.key()
    for url, body in calls:
        answer = httpx.post(url, json=body, timeout=60,
                            headers={"Authorization": f"Bearer {backend_key}"})
        assert answer.status_code == 200, answer.text
    home = live_stack.home
    for path in [*home.glob("logs/*.log"), *home.glob("run/*")]:
        if path.name != "backend.key":
            assert backend_key not in path.read_text(errors="replace"), path
    assert (home / "run" / "backend.key").stat().st_mode & 0o077 == 0
    for proc in psutil.process_iter(["cmdline"]):
        assert backend_key not in " ".join(proc.info["cmdline"] or ())
    assert backend_key not in live_stack.cli("status").stdout


def test_a_browser_page_gets_nothing_from_a_tier(live_stack):
    page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    for service in ("standard", "fast"):
        answer = httpx.post(live_stack.url(service) + "/v1/chat/completions", content=chat,
                            headers=page)
        assert answer.status_code == 403
        assert "access-control-allow-origin" not in answer.headers
        rebound = httpx.get(live_stack.url(service) + "/v1/models",
                            headers={"Host": f"evil.example:{live_stack.ports[service]}"})
        assert rebound.status_code == 403


def test_the_proxy_refuses_web_pages_and_rebinding(live_stack):
    """LiteLLM's CORS `*` and any-Host serving are gone; programs are served as before."""
    url = live_stack.url("proxy")
    auth = {"Authorization": f"Bearer {live_stack.key()}"}
    page = httpx.get(url + "/v1/models", headers={**auth, "Origin": "http://evil.example"})
    assert page.status_code == 403 and page.json()["error"]["code"] == "origin_not_allowed"
    assert not any(h.startswith("access-control-") for h in page.headers)
    preflight = httpx.options(url + "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers
    port = live_stack.ports["proxy"]
    rebound = httpx.get(url + "/v1/models", headers={**auth, "Host": f"evil.example:{port}"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    program = httpx.get(url + "/v1/models", headers={**auth, "Host": f"localhost:{port}"})
    assert program.status_code == 200
    assert not any(h.startswith("access-control-") for h in program.headers)


#: Bodies the embeddings server refuses; before the proxy checked them, LiteLLM answered the
#: first two with a 500 and the rest with the server's words inside its own prefixes.
BAD_EMBEDDINGS_BODIES = [
    b'{"model": "local-embed", "input": [[]]}',
    b'[{"model": "local-embed"}]',
    b'{"model": "local-embed", "input": 5}',
    b'{"model": "local-embed", "input": ["a", [1]]}',
    b'{"model": "local-embed", "input": ""}',
    b'{"model": "local-embed", "input": "hi", "encoding_format": "xx"}',
    b'{"model": "local-embed", "input": "hi", "dimensions": -1}',
    b'{"model": "local-embed", "input": "hi", "dimensions": 100000}',
    b'{"model": "local-embed", "input": [[1000000000]]}',
    b'{"model": "local-embed", "input": ["\\ud800"]}',
    b'{"model": "local-embed", "input": [' + b"1" * 5000 + b"]}",
    b"[" * 100_000,
    b'{"input": "\xff", "model": "local-embed"}',  # the bad byte before the model's name
]


@pytest.mark.parametrize("raw", BAD_EMBEDDINGS_BODIES, ids=range(len(BAD_EMBEDDINGS_BODIES)))
def test_bad_input_through_the_proxy_gets_what_the_server_says(live_stack, raw):
    """The same 4xx and the same message as from the embeddings server itself, in OpenAI's
    error shape, never a 5xx and never LiteLLM's prefixes."""
    json_type = {"Content-Type": "application/json"}
    direct = httpx.post(live_stack.url("embeddings") + "/v1/embeddings",
                        content=raw.replace(b"local-embed", b"all-minilm-l6-v2"),
                        headers={**live_stack.backend_headers(), **json_type}, timeout=60)
    proxied = httpx.post(live_stack.url("proxy") + "/v1/embeddings", content=raw, timeout=60,
                         headers={"Authorization": f"Bearer {live_stack.key()}", **json_type})
    assert 400 <= direct.status_code < 500, direct.text
    assert proxied.status_code == direct.status_code, proxied.text
    error = proxied.json()["error"]
    assert error["message"] == direct.json()["error"]["message"]
    assert error["type"] == "invalid_request_error"
    assert "litellm" not in error["message"].lower()


def test_a_bad_chat_request_costs_no_other_client_anything(live_stack):
    """mlx_lm answers an empty conversation with a 404, and a 404 made LiteLLM cool the tier
    down: every client then got 429 "No deployments available" for 5 s. Now the bad request
    gets a 400 that says why, the next good one is served at once, and mlx_lm's own errors
    come through in its words (they were lost: "Error code: 400")."""
    client = proxy_client(live_stack)
    messages = [{"role": "user", "content": "hi"}]
    for bad in ({"messages": []}, {"messages": "hi"}, {"messages": [1]}):
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model="standard", max_tokens=2, **bad)
        answer = client.chat.completions.create(model="standard", messages=messages,
                                                max_tokens=2)
        assert answer.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="standard", messages=messages,
                                       extra_body={"max_tokens": "many"})
    assert refused.value.body["message"] == "max_tokens must be of type int"
    direct = httpx.post(live_stack.url("fast") + "/v1/chat/completions", timeout=60,
                        headers=live_stack.backend_headers(),
                        json={"messages": messages, "temperature": "hot"})
    assert direct.status_code == 400
    assert "temperature" in direct.json()["error"]["message"]


def test_up_twice_is_harmless(live_stack):
    before = {s["name"]: s["pid"] for s in live_stack.status()["services"]}
    res = live_stack.cli("up", "--json", check=True)
    body = json.loads(res.stdout)  # stdout holds the JSON alone
    assert body["endpoint"] == live_stack.url("proxy") + "/v1"
    assert body["models"] == ["standard", "fast", "local-embed"]
    assert body["started"] == []  # all were running already
    assert {s["name"]: s["pid"] for s in body["services"]} == before
    after = live_stack.status()["services"]
    assert {s["name"]: s["pid"] for s in after} == before
    assert all(s["state"] == "ready" and s["restarts"] == 0 for s in after)


def test_up_on_a_terminal_shows_each_service_loading(live_stack):
    """A person running `up` sees a live line per model server: state, memory against the
    weights' size, elapsed time; the line ends ready. Scripts (no terminal) get plain lines."""
    stopped = json.loads(live_stack.cli("down", "--tier", "embeddings", "--json",
                                        check=True).stdout)
    assert stopped == {"stopped": ["embeddings"]}
    code, screen = live_stack.cli_on_terminal("up", "--tier", "embeddings", timeout=300)
    assert code == 0, screen
    assert "embeddings is up" in screen
    assert "weights" in screen and " MB" in screen  # memory / weights size of the model
    assert "\x1b[" in screen  # coloured: it is a terminal
    assert "━" in screen  # the bar
    last = [line for line in screen.splitlines() if "embeddings" in line and "weights" in line][-1]
    assert "ready" in last and "✓" in last, last
    assert {s["name"]: s["state"] for s in live_stack.status()["services"]}["embeddings"] == "ready"


def test_logs_command(live_stack):
    res = live_stack.cli("logs", "embeddings", "-n", "5", check=True)
    assert 0 < len(res.stdout.splitlines()) <= 5
    bad = live_stack.cli("logs", "nosuch")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "no service named 'nosuch'" in bad.stderr and "supervisor" in bad.stderr
    traversal = live_stack.cli("logs", "../proxy")  # a name, never a path
    assert traversal.returncode == 2 and "no service named" in traversal.stderr


def test_a_stopped_tier_falls_back_and_comes_back_alone(live_stack):
    proxy_pid = {s["name"]: s["pid"] for s in live_stack.status()["services"]}["proxy"]
    live_stack.cli("down", "--tier", "standard", check=True)
    states = {s["name"]: s["state"] for s in live_stack.status()["services"]}
    assert states["standard"] == "stopped" and states["fast"] == "ready"
    # The proxy's fallback sends "standard" requests to "fast" while standard is down.
    out = proxy_client(live_stack).chat.completions.create(
        model="standard", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert out.choices[0].message.content is not None
    up = json.loads(live_stack.cli("up", "--tier", "standard", "--json", check=True).stdout)
    assert up["started"] == ["standard"]
    after = {s["name"]: s for s in live_stack.status()["services"]}
    assert after["standard"]["state"] == "ready"
    assert after["proxy"]["pid"] == proxy_pid  # restarting a tier does not restart the proxy


def test_down_leaves_nothing_behind(live_stack):
    """Runs last in this module: stop everything and check every process and port is gone."""
    pids = [s["pid"] for s in live_stack.status()["services"]]
    res = live_stack.cli("down", "--json", check=True)
    assert sorted(json.loads(res.stdout)["stopped"]) == ["embeddings", "fast", "proxy", "standard"]
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    for port in live_stack.ports.values():
        assert ports.is_free(port)
    assert all(s["state"] == "stopped" for s in live_stack.status()["services"])
    assert live_stack.cli("down", check=True).stdout.strip() == "nothing was running"
    assert "STATE" in live_stack.cli("status", check=True).stdout
