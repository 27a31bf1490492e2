"""External servers as tiers, for real: `mlx-stack up` runs a ``command:`` chat tier and an
Ollama-shaped ``command:`` embeddings tier, routes a ``url:`` tier to a server this test runs,
and the LiteLLM proxy serves all three on :4000's API; the watchdog restarts a killed external
server; `status` shows the url: tier reachable, then unreachable; `down` leaves nothing.

The external servers are ``tests/support/fakeopenai.py``, a small real HTTP program (OpenAI's
chat and embeddings API; or Ollama's, which ignores ``encoding_format`` and ``dimensions``):
llama.cpp's server, vllm-mlx or Ollama are not needed to test what the stack does with them,
and none could run models here. Everything else is real: the supervisor, the proxy, clients.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
from fakeopenai import vector_for
from stackenv import StackEnv

from mlx_stack.config.proxykey import ensure_key
from mlx_stack.contract.snapshot import load_snapshot
from mlx_stack.ports import free_port, is_free

pytestmark = pytest.mark.e2e

FAKE = str(Path(__file__).parents[1] / "support" / "fakeopenai.py")
REMOTE_KEY = "sk-remote-tier-secret-4c1d0e9f"
DIMS = 64


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while is_free(port, "127.0.0.1"):
        assert proc.poll() is None, "the fake server exited"
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ext(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEnv]:
    home = tmp_path_factory.mktemp("external")
    home.chmod(0o700)
    ports = {name: free_port() for name in ("ext", "embeddings", "remote", "proxy")}
    (home / "remote.key").write_text(REMOTE_KEY + "\n")
    (home / "remote.key").chmod(0o600)
    # The url: tier's server: run by the test, not by the stack.
    remote = subprocess.Popen(
        [sys.executable, FAKE, "--port", str(ports["remote"]), "--model", "remote-model",
         "--key-file", str(home / "remote.key"), "--tag", "[remote] "],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ollama = (f"{sys.executable} {FAKE} --flavour ollama --model nomic-embed-text "
              f"--record {home / 'ollama.jsonl'}")
    stack = f"""\
version: 1
tiers:
  ext:
    command: [{sys.executable}, {FAKE}, --port, "{ports['ext']}", --model, ext-model,
              --tag, "[ext] ", --record, {home / 'ext.jsonl'}]
    port: {ports['ext']}
    served_model: ext-model
    ready_timeout_s: 60
  remote:
    url: http://127.0.0.1:{ports['remote']}/v1
    served_model: remote-model
    key_file: remote.key
embeddings:
  backend: ollama
  model: nomic-embed-text
  # no --port: the fake listens where OLLAMA_HOST says, as `ollama serve` does
  command: "{ollama}"
  port: {ports['embeddings']}
proxy:
  port: {ports['proxy']}
  timeout_s: 60
"""
    (home / "stack.yaml").write_text(stack)
    ensure_key(home / "proxy.key")
    env = StackEnv(home, ports)
    try:
        _wait_port(ports["remote"], remote)
        env.cli("up", check=True, timeout=300)
        env.remote = remote  # type: ignore[attr-defined]
        yield env
    finally:
        env.cli("down", timeout=120)
        env.kill_everything()
        if remote.poll() is None:
            os.killpg(remote.pid, signal.SIGKILL)
            remote.wait()


def client(env: StackEnv) -> openai.OpenAI:
    return openai.OpenAI(base_url=env.url("proxy") + "/v1", api_key=env.key(), max_retries=0)


def services(env: StackEnv) -> dict[str, dict]:
    return {s["name"]: s for s in env.status()["services"]}


def unit(vec: np.ndarray) -> np.ndarray:
    return vec / np.linalg.norm(vec)


def test_status_shows_the_command_tiers_ready_and_the_url_tier_reachable(ext):
    by_name = services(ext)
    assert set(by_name) == {"ext", "embeddings", "proxy", "remote"}
    for name in ("ext", "embeddings", "proxy"):
        assert by_name[name]["state"] == "ready", by_name[name]
        assert psutil.pid_exists(by_name[name]["pid"])
    assert by_name["ext"]["model"] == "ext-model" and by_name["ext"]["port"] == ext.ports["ext"]
    assert by_name["embeddings"]["model"] == "nomic-embed-text"
    remote = by_name["remote"]
    assert remote["state"] == "reachable" and remote["pid"] is None, remote
    assert remote["port"] == ext.ports["remote"] and remote["probe_ms"] > 0
    assert "not run by the stack" in remote["detail"]
    text = ext.cli("status", check=True).stdout
    assert "reachable" in text and REMOTE_KEY not in text


def test_chat_through_the_proxy_reaches_each_external_server(ext):
    c = client(ext)
    msgs = [{"role": "user", "content": "hello there"}]
    assert c.chat.completions.create(model="ext", messages=msgs).choices[0].message.content \
        == "[ext] echo: hello there"
    # the url: tier wants its key: an answer proves the proxy sent it
    assert c.chat.completions.create(model="remote", messages=msgs).choices[0].message.content \
        == "[remote] echo: hello there"
    stream = c.chat.completions.create(model="ext", messages=msgs, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) \
        == "[ext] echo: hello there"


def test_the_ollama_fake_really_ignores_encoding_format(ext):
    """What makes the proxy's normalisation necessary: asked for base64, it sends floats."""
    r = httpx.post(ext.url("embeddings") + "/v1/embeddings", timeout=10, json={
        "model": "nomic-embed-text", "input": "x", "encoding_format": "base64",
        "dimensions": 8})
    assert r.status_code == 200 and isinstance(r.json()["data"][0]["embedding"], list)
    assert len(r.json()["data"][0]["embedding"]) == DIMS
    # and its own API agrees (what a user sees with `ollama list` and /api/embed)
    tags = httpx.get(ext.url("embeddings") + "/api/tags", timeout=10).json()
    assert [m["name"] for m in tags["models"]] == ["nomic-embed-text:latest"]
    native = httpx.post(ext.url("embeddings") + "/api/embed", timeout=10, json={
        "model": "nomic-embed-text:latest", "input": ["x"]}).json()["embeddings"][0]
    assert native == r.json()["data"][0]["embedding"]


def test_openai_sdk_gets_exact_vectors_base64_by_default_and_float(ext):
    c = client(ext)
    texts = ["How do I reduce latency?", "banana bread"]
    want = np.array([vector_for(t, DIMS) for t in texts])
    default = c.embeddings.create(model="local-embed", input=texts)  # the SDK asks for base64
    floats = c.embeddings.create(model="local-embed", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    assert a.shape == b.shape == (2, DIMS)
    assert np.allclose(a, want, atol=1e-6) and np.allclose(b, want, atol=1e-12)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_dimensions_cut_and_renormalise_through_the_proxy(ext, encoding):
    c = client(ext)
    out = c.embeddings.create(model="local-embed", input=["a text"], dimensions=16,
                              encoding_format=encoding)  # type: ignore[arg-type]
    vec = out.data[0].embedding
    if encoding == "base64":  # the SDK leaves an explicit base64 answer encoded
        assert isinstance(vec, str)
        vec = np.frombuffer(base64.b64decode(vec), dtype="<f4")
    assert np.allclose(vec, unit(vector_for("a text", DIMS)[:16]), atol=1e-6)


def test_raw_http_base64_float_and_too_many_dimensions(ext):
    url = ext.url("proxy") + "/v1/embeddings"
    headers = {"Authorization": f"Bearer {ext.key()}"}
    r = httpx.post(url, headers=headers, timeout=30, json={
        "model": "local-embed", "input": "hello", "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, vector_for("hello", DIMS), atol=1e-6)
    r = httpx.post(url, headers=headers, timeout=30, json={"model": "local-embed",
                                                           "input": "hello"})
    assert r.status_code == 200 and r.json()["data"][0]["embedding"] == \
        vector_for("hello", DIMS).tolist()
    r = httpx.post(url, headers=headers, timeout=30, json={
        "model": "local-embed", "input": "hello", "dimensions": DIMS + 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == (
        f"dimensions {DIMS + 1} is more than this model's {DIMS}; ask for at most {DIMS}")


def test_what_the_ollama_server_was_sent(ext):
    """The path taken: normaliser then LiteLLM (not the fast lane): floats at full length, and
    never the stack's backend key."""
    calls = [json.loads(line) for line in (ext.home / "ollama.jsonl").read_text().splitlines()]
    proxied = [c for c in calls if c["path"] == "/v1/embeddings"
               and json.loads(c["body"]).get("input") == ["a text"]]
    assert proxied, calls[-3:]
    for c in proxied:
        body = json.loads(c["body"])
        assert body["encoding_format"] == "float" and "dimensions" not in body
        assert body["model"] == "nomic-embed-text"
    backend_key = (ext.home / "run" / "backend.key").read_text().strip()
    assert all(backend_key not in json.dumps(c["headers"]) for c in calls)


def test_the_remote_key_never_reaches_logs_config_or_output(ext):
    for path in [*ext.home.glob("logs/*.log"), *ext.home.glob("run/*")]:
        assert REMOTE_KEY not in path.read_text(errors="replace"), path
    assert "os.environ/MLX_STACK_TIER_KEY_REMOTE" in (ext.home / "run" / "litellm.yaml").read_text()
    out = ext.cli("status", "--json")
    assert REMOTE_KEY not in out.stdout + out.stderr


def test_logs_of_a_command_tier(ext):
    out = ext.cli("logs", "ext", "-n", "200", check=True).stdout
    assert f"fakeopenai (openai) serving ext-model on 127.0.0.1:{ext.ports['ext']}" in out


def test_a_killed_command_tier_is_restarted_and_routed_again(ext):
    before = services(ext)["ext"]
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        now = services(ext)["ext"]
        if now["state"] == "ready" and now["pid"] not in (None, before["pid"]):
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.3)
    assert now["restarts"] == before["restarts"] + 1
    assert "SIGKILL" in (now["last_exit"] or "")
    out = client(ext).chat.completions.create(model="ext", messages=[
        {"role": "user", "content": "again"}])
    assert out.choices[0].message.content == "[ext] echo: again"


def test_a_stopped_url_tier_shows_unreachable_and_its_requests_fall_back(ext):
    ext.remote.terminate()
    ext.remote.wait(timeout=10)
    remote = services(ext)["remote"]
    assert remote["state"] == "unreachable", remote
    assert "Connect" in remote["detail"] and remote["probe_ms"] is None
    out = client(ext).chat.completions.create(model="remote", messages=[
        {"role": "user", "content": "anyone?"}])
    assert out.choices[0].message.content == "[ext] echo: anyone?"  # LiteLLM's fallback


def test_down_leaves_no_process_and_frees_the_ports(ext):
    snap = load_snapshot(ext.home / "run" / "state.json")
    assert snap is not None
    pids = [snap.pid, *(s.process.pid for s in snap.services if s.process is not None)]
    assert len(pids) == 4  # supervisor, ext, embeddings, proxy
    ext.cli("down", check=True, timeout=120)
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
              for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if psutil.pid_exists(p)]
        time.sleep(0.1)
    for name in ("ext", "embeddings", "proxy"):
        assert is_free(ext.ports[name], "127.0.0.1"), name


def test_a_command_tier_that_never_answers_right_fails_its_start_in_time(tmp_path):
    """The fake logs every request, as Ollama and llama.cpp do: with the watchdog's
    progress-based deadline its failing probes (here: a served_model it does not serve) would
    read as loading for start_timeout_max_s. A command: tier's deadline is fixed."""
    home = tmp_path / "stuck"
    home.mkdir(mode=0o700)
    port, proxy = free_port(), free_port()
    (home / "stack.yaml").write_text(
        f"tiers:\n  wrong:\n    command: [{sys.executable}, {FAKE}, --port, '{port}', "
        "--model, real-name]\n"
        f"    port: {port}\n    served_model: not-this-one\n"
        f"proxy:\n  port: {proxy}\n"
        "watchdog:\n  start_timeout_s: 3\n  start_timeout_max_s: 120\n")
    ensure_key(home / "proxy.key")
    env = StackEnv(home, {"wrong": port, "proxy": proxy})
    try:
        began = time.monotonic()
        res = env.cli("up", timeout=120)
        took = time.monotonic() - began
        assert res.returncode != 0, res.stdout
        assert "not ready after 3 s" in res.stderr, res.stderr
        assert "The model `not-this-one` does not exist" in res.stderr, res.stderr
        assert took < 60, took  # far from start_timeout_max_s
    finally:
        env.cli("down", timeout=120)
        env.kill_everything()
