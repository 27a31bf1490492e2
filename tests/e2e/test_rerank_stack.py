"""The rerank tier in a real stack: `mlx-stack up` starts the embeddings server's program in
rerank mode on a tiny random-weight cross-encoder (tests/support/tinyrerank.py; no reranker
weights reach this machine), next to the embeddings tier and LiteLLM; the proxy's
``local-rerank`` ranks exactly as the rerank port does; `restart rerank` works; `down` leaves
nothing. Nothing is mocked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from stackenv import StackEnv, write_stack
from tinyrerank import build_tiny_reranker

from mlx_stack import ports

pytestmark = pytest.mark.e2e

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
QUERY = "how do I restart a crashed model server"
DOCUMENTS = [
    "The supervisor restarts a crashed server with a capped exponential backoff.",
    "Bananas are rich in potassium.",
    {"text": "mlx-stack restart SERVICE restarts one service and clears fatal."},
    "A reranker reads the query and the document together.",
    "",
]


@pytest.fixture(scope="module")
def rerank_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackEnv]:
    """The embeddings tier, the rerank tier and the proxy, on free ports, brought up once."""
    folder = build_tiny_reranker(tmp_path_factory.mktemp("models") / "tiny-rerank", "bert")
    env = write_stack(tmp_path_factory.mktemp("stack"), None, tiers=())
    (env.home / "catalog").mkdir(exist_ok=True)
    (env.home / "catalog" / "rerank.yaml").write_text(RERANK_CATALOG.format(path=folder))
    env.ports["rerank"] = ports.free_port()
    with (env.home / "stack.yaml").open("a") as f:
        f.write(f"rerank:\n  model: tiny-rerank\n  port: {env.ports['rerank']}\n")
    try:
        env.cli("up", check=True, timeout=900)
        yield env
    finally:
        env.cli("down", timeout=120)
        env.kill_everything()


def rerank_via_proxy(env: StackEnv, path: str = "/v1/rerank", **extra: object) -> httpx.Response:
    return httpx.post(env.url("proxy") + path, timeout=60,
                      headers={"Authorization": f"Bearer {env.key()}"},
                      json={"model": "local-rerank", "query": QUERY, "documents": DOCUMENTS,
                            **extra})


def rerank_direct(env: StackEnv, **extra: object) -> httpx.Response:
    return httpx.post(env.url("rerank") + "/v1/rerank", timeout=60,
                      headers=env.backend_headers(),
                      json={"model": "tiny-rerank", "query": QUERY, "documents": DOCUMENTS,
                            **extra})


def ranking(body: dict) -> list[tuple[int, float]]:
    return [(r["index"], r["relevance_score"]) for r in body["results"]]


def test_status_shows_the_rerank_tier_ready(rerank_stack):
    by_name = {s["name"]: s for s in rerank_stack.status()["services"]}
    assert set(by_name) == {"embeddings", "rerank", "proxy"}
    r = by_name["rerank"]
    assert r["state"] == "ready", r
    assert (r["model"], r["port"]) == ("tiny-rerank", rerank_stack.ports["rerank"])
    assert psutil.pid_exists(r["pid"])
    assert "--task" in psutil.Process(r["pid"]).cmdline()


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_the_proxy_ranks_exactly_as_the_rerank_port(rerank_stack, path):
    direct = rerank_direct(rerank_stack)
    assert direct.status_code == 200, direct.text
    via = rerank_via_proxy(rerank_stack, path)
    assert via.status_code == 200, via.text
    expected = ranking(direct.json())
    assert sorted(i for i, _ in expected) == list(range(len(DOCUMENTS)))
    assert [s for _, s in expected] == sorted((s for _, s in expected), reverse=True)
    assert len({s for _, s in expected}) > 1  # the tiny model spreads its scores
    assert ranking(via.json()) == expected


def test_top_n_and_return_documents_reach_the_server(rerank_stack):
    via = rerank_via_proxy(rerank_stack, top_n=2, return_documents=True, max_tokens_per_doc=64)
    assert via.status_code == 200, via.text
    direct = rerank_direct(rerank_stack, top_n=2, return_documents=True, max_tokens_per_doc=64)
    body = via.json()
    assert ranking(body) == ranking(direct.json())
    assert len(body["results"]) == 2
    for r in body["results"]:
        doc = DOCUMENTS[r["index"]]
        assert r["document"]["text"] == (doc["text"] if isinstance(doc, dict) else doc)


def test_keys_are_required_on_both_sides(rerank_stack):
    no_key = httpx.post(rerank_stack.url("proxy") + "/v1/rerank", timeout=30,
                        json={"model": "local-rerank", "query": "q", "documents": ["d"]})
    assert no_key.status_code == 401
    direct = httpx.post(rerank_stack.url("rerank") + "/v1/rerank", timeout=30,
                        json={"model": "tiny-rerank", "query": "q", "documents": ["d"]})
    assert direct.status_code == 401


@pytest.mark.parametrize("bad", [{"documents": "not a list"}, {"documents": []},
                                 {"query": ""}, {"top_n": 0}, {"documents": [{"txt": "a"}]},
                                 {"return_documents": "yes"}])  # fmt: skip
def test_bad_input_gets_the_servers_4xx_through_the_proxy(rerank_stack, bad):
    """The server's status and message, not LiteLLM's 500s or its CohereException wrapping."""
    body = {"query": "q", "documents": ["d"], **bad}
    direct = httpx.post(rerank_stack.url("rerank") + "/v1/rerank", timeout=30,
                        headers=rerank_stack.backend_headers(),
                        json={"model": "tiny-rerank", **body})  # fmt: skip
    via = httpx.post(rerank_stack.url("proxy") + "/v1/rerank", timeout=30,
                     headers={"Authorization": f"Bearer {rerank_stack.key()}"},
                     json={"model": "local-rerank", **body})  # fmt: skip
    assert 400 <= direct.status_code < 500, direct.text
    assert via.status_code == direct.status_code, via.text
    assert via.json()["error"]["message"] == direct.json()["error"]["message"]


def test_two_pass_retrieval_in_the_rag_example(rerank_stack, tmp_path, monkeypatch, capsys):
    """examples/rag/rag.py: an index of float, int8 and bit vectors from the server; `eval`
    measures recall@1/@5 of each search on the shipped questions (the tiny reranker is random,
    so only the protocol is checked for two-pass, not its quality); `ask --search two-pass`
    orders the binary scan's candidates exactly as the rerank tier scores them."""
    import importlib.util
    import json
    import sys

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("rag_two_pass", root / "examples/rag/rag.py")
    assert spec and spec.loader
    rag = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rag
    spec.loader.exec_module(rag)
    monkeypatch.setenv("MLX_STACK_URL", rerank_stack.url("proxy") + "/v1")
    monkeypatch.setenv("MLX_STACK_KEY", rerank_stack.key())
    store = tmp_path / "index"
    assert rag.main(["index", str(root / "examples/rag/corpus"), "--store", str(store)]) == 0
    index = rag.load_index(store)
    assert index.int8.dtype == np.int8 and index.int8.shape == index.vectors.shape
    assert index.bits.shape == (len(index.chunks), index.vectors.shape[1] // 8)
    capsys.readouterr()
    questions = root / "examples/rag/questions.json"
    assert rag.main(["eval", str(questions), "--store", str(store), "--json"]) == 0
    recall = json.loads(capsys.readouterr().out)["recall"]
    assert set(recall) == {"float", "int8", "binary", "two-pass"}
    assert recall["float"]["recall@5"] >= 0.9 and recall["int8"]["recall@5"] >= 0.9
    for r in recall.values():
        assert 0 <= r["recall@1"] <= r["recall@5"] <= 1
    query = "How do I reduce endpoint latency?"
    assert rag.main(["ask", "--search", "two-pass", "--no-chat", "--json", "-k", "3",
                     "--store", str(store), query]) == 0  # fmt: skip
    hits = json.loads(capsys.readouterr().out)["hits"]
    direct = httpx.post(rerank_stack.url("rerank") + "/v1/rerank", timeout=60,
                        headers=rerank_stack.backend_headers(),
                        json={"model": "tiny-rerank", "query": query,
                              "documents": [c.text for c in index.chunks]}).json()  # fmt: skip
    expected = [(index.chunks[r["index"]].source, r["relevance_score"])
                for r in direct["results"][:3]]  # all 9 chunks are candidates (< 50)
    assert [h["source"] for h in hits] == [source for source, _ in expected]
    assert [h["score"] for h in hits] == pytest.approx([score for _, score in expected])


@pytest.mark.parametrize("snippet", ["cohere_rerank.py", "litellm_rerank.py"])
def test_the_documented_rerank_clients_work_offline(rerank_stack, tmp_path, snippet):
    """docs/clients.md's rerank snippets, run as is with the internet cut off: they rank the
    documents as the rerank tier does, and try to reach nothing outside this machine."""
    import os
    import subprocess
    import sys

    from offline import OFFLINE_BOOT

    root = Path(__file__).resolve().parents[2]
    log = tmp_path / "refused"
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("OPENAI_", "LITELLM_", "CO_", "COHERE_"))}  # fmt: skip
    env |= {"MLX_STACK_URL": rerank_stack.url("proxy") + "/v1",
            "MLX_STACK_KEY": rerank_stack.key(), "HOME": str(tmp_path),
            "OFFLINE_GUARD_LOG": str(log)}  # fmt: skip
    run = subprocess.run([sys.executable, "-c", OFFLINE_BOOT,
                          str(root / "examples" / "clients" / snippet)],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert not log.exists(), log.read_text()
    documents = ["Optimize API response time", "Travel and expenses", "Load testing"]
    direct = httpx.post(rerank_stack.url("rerank") + "/v1/rerank", timeout=60,
                        headers=rerank_stack.backend_headers(),
                        json={"model": "tiny-rerank", "query": "reduce endpoint latency",
                              "documents": documents, "top_n": 2}).json()  # fmt: skip
    expected = [f"document {r['index']}: relevance {r['relevance_score']:.3f}"
                for r in direct["results"]]  # fmt: skip
    assert run.stdout.splitlines() == expected


def test_restart_rerank_and_its_log(rerank_stack):
    before = {s["name"]: s for s in rerank_stack.status()["services"]}["rerank"]["pid"]
    rerank_stack.cli("restart", "rerank", check=True, timeout=300)
    after = {s["name"]: s for s in rerank_stack.status()["services"]}["rerank"]
    assert after["state"] == "ready" and after["pid"] != before
    via = rerank_via_proxy(rerank_stack)
    assert via.status_code == 200, via.text
    assert ranking(via.json()) == ranking(rerank_direct(rerank_stack).json())
    logs = rerank_stack.cli("logs", "rerank", "-n", "200", check=True).stdout
    assert logs.strip()


def test_down_leaves_nothing(rerank_stack):
    pids = [s["pid"] for s in rerank_stack.status()["services"] if s.get("pid")]
    assert pids
    rerank_stack.cli("down", check=True, timeout=120)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    for name in ("embeddings", "rerank", "proxy"):
        assert ports.is_free(rerank_stack.ports[name]), name
