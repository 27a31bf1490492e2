"""A real stack with ``replicas: 2`` on the embeddings tier (the MiniLM from PyPI, the real
LiteLLM proxy, the real supervisor through the CLI): requests through :4000 are served by both
replicas (each server's own /metrics says so), `restart embeddings` under steady load replaces
them one at a time with zero failed requests, and a replica killed with SIGKILL under load costs
clients nothing while the watchdog brings it back. Nothing is mocked."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from embedserver import metric_value
from stackenv import StackEnv, write_stack

REPLICAS = ("embeddings", "embeddings-2")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEnv]:
    env = write_stack(tmp_path_factory.mktemp("replicas"), None, embeddings=True, replicas=2)
    try:
        env.cli("up", check=True, timeout=900)
        yield env
    finally:
        env.cli("down", timeout=120)
        env.kill_everything()


class Load:
    """Client threads sending one-text embedding requests through the proxy, counting every
    answer that is not a 200 (and every request that got no answer)."""

    def __init__(self, env: StackEnv, clients: int = 3) -> None:
        self.url = env.url("proxy") + "/v1/embeddings"
        self.headers = {"Authorization": f"Bearer {env.key()}"}
        self.results: list[int] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True)
                        for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=60, trust_env=False) as c:
            while not self.stop.is_set():
                try:
                    status = c.post(self.url, headers=self.headers, json={
                        "model": "local-embed", "input": "a steady load"}).status_code
                except httpx.HTTPError:
                    status = 0
                self.results.append(status)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    @property
    def failed(self) -> Counter:
        return Counter(s for s in self.results if s != 200)


def services(env: StackEnv) -> dict[str, dict]:
    return {s["name"]: s for s in env.status()["services"]}


def wait_for(pred, within: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        if pred():
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"not within {within} s: {what}")


def texts_embedded(env: StackEnv, name: str) -> float:
    metrics = httpx.get(env.url(name) + "/metrics", headers=env.backend_headers(),
                        timeout=30, trust_env=False).text
    return metric_value(metrics, "mlx_embeddings_texts_total")


def test_status_shows_each_replica_on_its_own_port(stack: StackEnv) -> None:
    rows = services(stack)
    for name in REPLICAS:
        assert rows[name]["state"] == "ready" and rows[name]["port"] == stack.ports[name]
        assert rows[name]["tier"] == "embeddings" and rows[name]["in_route"] is True
    assert stack.ports["embeddings-2"] == stack.ports["embeddings"] + 1
    assert rows["embeddings"]["pid"] != rows["embeddings-2"]["pid"]
    table = stack.cli("status", check=True).stdout
    assert "embeddings-2" in table and str(stack.ports["embeddings-2"]) in table


def test_requests_through_the_proxy_are_served_by_both_replicas(stack: StackEnv) -> None:
    before = {n: texts_embedded(stack, n) for n in REPLICAS}
    texts = [f"text number {i}" for i in range(25)]
    with httpx.Client(timeout=60, trust_env=False) as c:
        for _ in range(40):  # 1000 texts; the supervisor's probes add one text per probe
            r = c.post(stack.url("proxy") + "/v1/embeddings",
                       headers={"Authorization": f"Bearer {stack.key()}"},
                       json={"model": "local-embed", "input": texts})
            assert r.status_code == 200 and len(r.json()["data"]) == 25
    served = {n: texts_embedded(stack, n) - before[n] for n in REPLICAS}
    assert all(v >= 300 for v in served.values()), served  # ~500 each, in turn


def test_logs_of_the_tier_show_every_replica(stack: StackEnv) -> None:
    out = stack.cli("logs", "embeddings", "-n", "3", check=True).stdout
    assert "==> embeddings <==" in out and "==> embeddings-2 <==" in out
    one = stack.cli("logs", "embeddings-2", "-n", "3", check=True).stdout
    assert "==>" not in one and one.strip()


def test_restart_of_the_tier_under_load_fails_no_request(stack: StackEnv) -> None:
    before = services(stack)
    with Load(stack) as load:
        time.sleep(2)
        began = time.monotonic()
        res = stack.cli("restart", "embeddings", "--json", timeout=600)
        took = time.monotonic() - began
        time.sleep(2)
    assert res.returncode == 0, res.stderr
    after = services(stack)
    for name in REPLICAS:
        assert after[name]["pid"] != before[name]["pid"] and after[name]["state"] == "ready"
    assert len(load.results) > 20, len(load.results)
    assert not load.failed, (load.failed, len(load.results))
    print(f"rolling restart of 2 replicas: {took:.1f} s, {len(load.results)} requests, "
          "0 failed")
    # One at a time: the supervisor's log says each was drained and put back in turn.
    log = (stack.home / "logs" / "supervisor.log").read_text()
    assert "embeddings: replacing embeddings, embeddings-2 one at a time" in log


def test_restart_of_one_replica_leaves_the_other_alone(stack: StackEnv) -> None:
    before = services(stack)
    with Load(stack, clients=2) as load:
        res = stack.cli("restart", "embeddings-1", timeout=600)
    assert res.returncode == 0, res.stderr
    after = services(stack)
    assert after["embeddings"]["pid"] != before["embeddings"]["pid"]
    assert after["embeddings-2"]["pid"] == before["embeddings-2"]["pid"]
    assert not load.failed, load.failed


def test_a_killed_replica_costs_clients_nothing_and_comes_back(stack: StackEnv) -> None:
    before = services(stack)
    victim = before["embeddings-2"]["pid"]
    with Load(stack) as load:
        time.sleep(2)
        os.kill(victim, signal.SIGKILL)
        back = wait_for(lambda: (s := services(stack)["embeddings-2"])["state"] == "ready"
                        and s["pid"] not in (None, victim), 180, "the watchdog restarts it")
        time.sleep(2)
    after = services(stack)
    assert after["embeddings-2"]["restarts"] == before["embeddings-2"]["restarts"] + 1
    assert after["embeddings"]["pid"] == before["embeddings"]["pid"]
    assert len(load.results) > 20
    assert not load.failed, (load.failed, len(load.results))
    print(f"replica killed: back in {back:.1f} s, {len(load.results)} requests, 0 failed")


RAW_MINILM = """\
models:
  - name: minilm-raw
    type: embedding
    source: local/minilm-raw
    description: the MiniLM weights without normalisation (another model, to the stack)
    architecture: bert
    params_m: 22.7
    dimensions: 384
    max_sequence_length: 256
    pooling: mean
    normalize: false
    mteb_score: 0
    memory_mb: 120
    quantizations:
      - {{id: fp32, source: "path:{path}", memory_mb: 120}}
"""


def test_a_model_change_rolls_without_failure_or_mixing_and_leaves_the_proxy(
        stack: StackEnv) -> None:
    """The new model here is MiniLM without normalisation: its vectors have norms far from 1,
    so each answer says which model made it. Once the first answer of the new model has come
    back, no request sent later may get the old model's vector (two vector spaces mixed).

    With two replicas the roll's own order already keeps the models apart (the old replica is
    drained in the tick after the new one is ready); the fast lane's rule that only the newest
    model serves matters from three replicas on, and is checked in
    tests/unit/test_fastlane_replicas.py (a mutation that drops it passed this test)."""
    import numpy as np
    from embedserver import minilm_path

    (stack.home / "catalog").mkdir(exist_ok=True)
    (stack.home / "catalog" / "raw.yaml").write_text(RAW_MINILM.format(path=minilm_path()))
    before = services(stack)
    seen: list[tuple[float, float, int, str]] = []  # sent, answered, status, model
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60, trust_env=False) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post(stack.url("proxy") + "/v1/embeddings",
                               headers={"Authorization": f"Bearer {stack.key()}"},
                               json={"model": "local-embed", "input": "which model?",
                                     "encoding_format": "float"})
                    norm = (float(np.linalg.norm(r.json()["data"][0]["embedding"]))
                            if r.status_code == 200 else 0.0)
                    seen.append((sent, time.monotonic(), r.status_code,
                                 "old" if abs(norm - 1) < 1e-3 else "new"))
                except httpx.HTTPError:
                    seen.append((sent, time.monotonic(), 0, ""))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    stack_file = stack.home / "stack.yaml"
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        stack_file.write_text(stack_file.read_text().replace("all-minilm-l6-v2", "minilm-raw"))
        res = stack.cli("up", timeout=600)  # applies the edit, returns once it is applied
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    assert res.returncode == 0, res.stderr
    after = services(stack)
    assert after["proxy"]["pid"] == before["proxy"]["pid"]  # the proxy was not restarted
    for name in REPLICAS:
        assert after[name]["model"] == "minilm-raw" and after[name]["pid"] != before[name]["pid"]
    failed = [x for x in seen if x[2] != 200]
    assert not failed and len(seen) > 20, (failed, len(seen))
    first_new = min(answered for _, answered, _, model in seen if model == "new")
    late_old = [x for x in seen if x[0] > first_new and x[3] == "old"]
    assert not late_old, late_old
    assert any(m == "old" for *_, m in seen)  # the old model served until the switch
    print(f"model change: {len(seen)} requests, 0 failed, "
          f"{sum(1 for *_, m in seen if m == 'new')} from the new model")


def test_down_leaves_nothing(stack: StackEnv) -> None:
    pids = [s["pid"] for s in services(stack).values() if s["pid"]]
    stack.cli("down", check=True, timeout=120)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


# -- the rerank tier with replicas: balanced by LiteLLM's router -----------------------------

RERANK_CATALOG = """\
models:
  - name: tiny-rerank
    type: rerank
    source: local/tiny-rerank
    description: random-weight BERT cross-encoder built by the tests
    architecture: bert
    params_m: 0.1
    max_sequence_length: 256
    memory_mb: 30
    quantizations:
      - {{id: fp32, source: "path:{path}", memory_mb: 30}}
"""
DOCUMENTS = ["The supervisor restarts a crashed server.", "Bananas are yellow.",
             "mlx-stack restart SERVICE restarts one service.", "A reranker reads both."]


@pytest.fixture(scope="module")
def rerank_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEnv]:
    from tinyrerank import build_tiny_reranker

    from mlx_stack.ports import free_port_run

    folder = build_tiny_reranker(tmp_path_factory.mktemp("models") / "tiny-rerank", "bert")
    env = write_stack(tmp_path_factory.mktemp("rerank-replicas"), None, tiers=(),
                      embeddings=False)
    (env.home / "catalog").mkdir(exist_ok=True)
    (env.home / "catalog" / "rerank.yaml").write_text(RERANK_CATALOG.format(path=folder))
    base = free_port_run(2)
    env.ports.update({"rerank": base, "rerank-2": base + 1})
    text = (env.home / "stack.yaml").read_text().replace("tiers: {}\n", "tiers: {}\n"
        f"rerank:\n  model: tiny-rerank\n  port: {base}\n  replicas: 2\n")
    (env.home / "stack.yaml").write_text(text)
    try:
        env.cli("up", check=True, timeout=900)
        yield env
    finally:
        env.cli("down", timeout=120)
        env.kill_everything()


def rerank_pairs(env: StackEnv, name: str) -> float:
    metrics = httpx.get(env.url(name) + "/metrics", headers=env.backend_headers(),
                        timeout=30, trust_env=False).text
    return metric_value(metrics, "mlx_embeddings_texts_total")


def test_rerank_requests_are_balanced_over_both_replicas(rerank_stack: StackEnv) -> None:
    env = rerank_stack
    before = {n: rerank_pairs(env, n) for n in ("rerank", "rerank-2")}
    with httpx.Client(timeout=60, trust_env=False) as c:
        for _ in range(30):
            r = c.post(env.url("proxy") + "/v1/rerank",
                       headers={"Authorization": f"Bearer {env.key()}"},
                       json={"model": "local-rerank", "query": "restart a server",
                             "documents": DOCUMENTS})
            assert r.status_code == 200, r.text
            assert sorted(x["index"] for x in r.json()["results"]) == [0, 1, 2, 3]
    served = {n: rerank_pairs(env, n) - before[n] for n in before}
    assert all(v >= 20 for v in served.values()), served  # 120 pairs, split at random


def test_rolling_restart_of_rerank_replicas_under_load(rerank_stack: StackEnv) -> None:
    env = rerank_stack
    results: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60, trust_env=False) as c:
            while not stop.is_set():
                try:
                    results.append(c.post(
                        env.url("proxy") + "/v1/rerank",
                        headers={"Authorization": f"Bearer {env.key()}"},
                        json={"model": "local-rerank", "query": "restart",
                              "documents": DOCUMENTS}).status_code)
                except httpx.HTTPError:
                    results.append(0)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        res = env.cli("restart", "rerank", timeout=600)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    assert res.returncode == 0, res.stderr
    failed = Counter(s for s in results if s != 200)
    print(f"rerank rolling restart: {len(results)} requests, failed: {dict(failed)}")
    assert len(results) > 10 and not failed, (failed, len(results))
