"""Real clients against a real stack, through the proxy: the documented snippets, run as is.

Each snippet of docs/clients.md is a file under examples/clients/ (tests/test_docs.py checks the
doc holds it verbatim); here each file runs in its own Python against the live stack, with the
internet cut off: a small boot script refuses every connection and name lookup that is not
loopback and logs the attempt, and tiktoken gets an empty cache. A snippet passes only if it
works and tried to reach nothing outside this machine. The chat model is a tiny random one, so
chat checks are about the protocol, not the prose.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from offline import OFFLINE_BOOT

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "examples" / "clients"



SNIPPETS = (
    "openai_embeddings.py",
    "openai_chat.py",
    "openai_input_type.py",
    "langchain_embeddings.py",
    "langchain_chat.py",
    "llamaindex_embeddings.py",
    "litellm_embedding.py",
)
CONTROL = "langchain_defaults"


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    refused: list[str]


class ProxyTrap:
    """A web proxy on loopback that serves nothing and records who tried to use it.

    The snippets run with HTTP(S)_PROXY pointing here and NO_PROXY for 127.0.0.1, as
    docs/clients.md advises: a connection here is a request meant for the internet.
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.requests: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    first = conn.recv(1024).split(b"\r\n", 1)[0].decode(errors="replace")
                except OSError:
                    first = "?"
                self.requests.append(f"through the web proxy: {first}")

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def runs(live_stack, tmp_path_factory) -> dict[str, Run]:
    """Every snippet, plus a control, run at once (mostly imports: they overlap well).

    The environment is a user's who followed docs/clients.md, on a machine with no internet,
    no OpenAI or LiteLLM variables, an empty tiktoken cache, an empty home folder, and a web
    proxy configured with NO_PROXY for the loopback address.
    """
    tmp = tmp_path_factory.mktemp("offline")
    (tmp / "tiktoken").mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("OPENAI_", "LITELLM_", "LANGCHAIN_", "LANGSMITH_"))
        and k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
    } | {
        "MLX_STACK_URL": live_stack.url("proxy") + "/v1",
        "MLX_STACK_KEY": live_stack.key(),
        "TIKTOKEN_CACHE_DIR": str(tmp / "tiktoken"),
        "HOME": str(tmp),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    # The control: LangChain's defaults, i.e. the snippet without check_embedding_ctx_length.
    control = tmp / f"{CONTROL}.py"
    control.write_text(
        (CLIENTS / "langchain_embeddings.py")
        .read_text()
        .replace("    check_embedding_ctx_length=False,\n", "")
    )
    assert "check_embedding_ctx_length=" not in control.read_text()
    scripts = {name: CLIENTS / name for name in SNIPPETS} | {CONTROL: control}
    procs = {}
    for name, script in scripts.items():
        log, trap = tmp / f"{name}.refused", ProxyTrap()
        proxies = {"HTTP_PROXY": trap.url, "HTTPS_PROXY": trap.url}
        proc = subprocess.Popen(
            [sys.executable, "-c", OFFLINE_BOOT, str(script)],
            env=env | proxies | {"OFFLINE_GUARD_LOG": str(log)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs[name] = (proc, log, trap)
    out = {}
    for name, (proc, log, trap) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        trap.close()
        refused = log.read_text().splitlines() if log.exists() else []
        refused += trap.requests
        out[name] = Run(proc.returncode, stdout, stderr, refused)
    return out


def snippet_output(runs: dict[str, Run], name: str) -> str:
    run = runs[name]
    assert run.returncode == 0, f"{name} failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    assert run.refused == [], f"{name} tried to reach the internet: {run.refused}"
    return run.stdout


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text}"
    return float(m[1])


RERANK_SNIPPETS = ("cohere_rerank.py", "litellm_rerank.py")
"""Run against a stack with a rerank tier, in tests/e2e/test_rerank_stack.py."""


def test_every_client_example_is_run():
    assert sorted(SNIPPETS + RERANK_SNIPPETS) == sorted(p.name for p in CLIENTS.glob("*.py"))


def test_the_guard_cuts_the_internet_and_langchain_defaults_need_it(runs):
    """Without check_embedding_ctx_length=False, LangChain fetches tiktoken's tables."""
    run = runs[CONTROL]
    assert run.returncode != 0
    assert any("openaipublic.blob.core.windows.net" in r for r in run.refused), run.refused


def test_openai_embeddings_base64_and_float(runs):
    out = snippet_output(runs, "openai_embeddings.py")
    assert "3 vectors of 384 dimensions" in out
    assert number(r"base64 vs float: (\S+)", out) < 1e-6
    assert number(r"paraphrase (\S+),", out) > number(r"unrelated (\S+)", out) + 0.2


def test_openai_chat_and_streaming(runs):
    out = snippet_output(runs, "openai_chat.py")
    m = re.search(r"finish_reason=(\w+) tokens=(\d+)", out)
    assert m and m[1] in ("stop", "length") and 1 <= int(m[2]) <= 32, out
    assert number(r"streamed in (\d+) chunks", out) >= 2
    assert out.splitlines()[0].strip()  # the reply's text


def test_openai_input_type(runs):
    out = snippet_output(runs, "openai_input_type.py")
    assert out.startswith("best passage 0 ") and "backed up nightly" in out


def test_langchain_embeddings(runs):
    out = snippet_output(runs, "langchain_embeddings.py")
    assert "2 documents, 384 dimensions" in out
    assert number(r"scores (\S+) ", out) > number(r"scores \S+ (\S+)", out) + 0.2


def test_langchain_chat_and_streaming(runs):
    out = snippet_output(runs, "langchain_chat.py")
    assert 1 <= number(r"tokens=(\d+)", out) <= 32
    assert number(r"streamed in (\d+) chunks", out) >= 2


def test_llamaindex_embedding_class(runs):
    out = snippet_output(runs, "llamaindex_embeddings.py")
    hits = [line.split("  ", 1) for line in out.strip().splitlines()]
    assert len(hits) == 2
    assert hits[0][1].startswith("Optimize API response time")
    assert float(hits[0][0]) > float(hits[1][0]) + 0.1


def test_litellm_library(runs):
    out = snippet_output(runs, "litellm_embedding.py")
    assert "2 vectors of 384 dimensions" in out
    assert number(r"similarity (\S+)", out) > 0.3


def _curl_commands(doc: Path) -> list[str]:
    """Every `curl ...` command (continuation lines joined) in the doc's bash blocks."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]


@pytest.mark.parametrize(
    "doc", ["README.md", "docs/clients.md", "docs/embeddings.md", "docs/operations.md"]
)
def test_curl_examples(live_stack, doc):
    """The docs' curl commands, verbatim but for the proxy's address in this test."""
    commands = _curl_commands(ROOT / doc)
    assert commands, f"no curl example in {doc}"
    env = os.environ | {
        "KEY": live_stack.key(),  # the README's name for it
        "MLX_STACK_KEY": live_stack.key(),
        "MLX_STACK_HOME": str(live_stack.home),  # so that $(mlx-stack key) gives this stack's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for cmd in commands:
        cmd = cmd.replace("http://127.0.0.1:4000", live_stack.url("proxy"))
        res = subprocess.run(
            ["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert res.returncode == 0, f"{cmd}\n{res.stderr}"
        if res.stdout.startswith("data: "):
            events = [ln[6:] for ln in res.stdout.splitlines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]", res.stdout[-300:]
            deltas = [json.loads(e)["choices"] for e in events[:-1]]
            assert sum(1 for c in deltas if c and c[0]["delta"].get("content")) >= 2
            continue
        body = json.loads(res.stdout)
        assert "error" not in body, f"{cmd}\n{body}"
        if "/embeddings" in cmd:
            assert all(len(d["embedding"]) == 384 for d in body["data"])
        elif "/chat/completions" in cmd:
            assert body["choices"][0]["message"]["content"]
        elif "/models" in cmd:
            assert {"local-embed", "standard"} <= {m["id"] for m in body["data"]}


def test_input_type_reaches_the_embeddings_server(live_stack):
    """docs/embeddings.md relies on the proxy forwarding input_type (query/document prefixes)."""
    client = openai.OpenAI(
        base_url=live_stack.url("proxy") + "/v1", api_key=live_stack.key(), max_retries=0
    )
    ok = client.embeddings.create(
        model="local-embed", input=["a query"], extra_body={"input_type": "query"}
    )
    assert len(ok.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError, match="input_type"):
        client.embeddings.create(
            model="local-embed", input=["x"], extra_body={"input_type": "bogus"}
        )


def test_dimensions_behaves_as_documented(live_stack):
    """docs/embeddings.md: the embeddings server refuses a size the model cannot give, and the
    proxy forwards `dimensions` (not dropped by drop_params), so its 400 comes through."""
    body = {"model": "local-embed", "input": "x", "dimensions": 100}
    headers = {"Authorization": f"Bearer {live_stack.key()}"}
    proxied = httpx.post(live_stack.url("proxy") + "/v1/embeddings", json=body, headers=headers,
                         timeout=60)
    assert proxied.status_code == 400, proxied.text
    assert "dimensions" in proxied.json()["error"]["message"]
    full = httpx.post(live_stack.url("proxy") + "/v1/embeddings", json=body | {"dimensions": 384},
                      headers=headers, timeout=60)
    assert full.status_code == 200 and len(full.json()["data"][0]["embedding"]) == 384
    direct = httpx.post(
        live_stack.url("embeddings") + "/v1/embeddings",
        json=body | {"model": "all-minilm-l6-v2"},
        headers=live_stack.backend_headers(),
    )
    assert direct.status_code == 400 and direct.json()["error"]["param"] == "dimensions"


def test_truncation_header_through_the_proxy(live_stack):
    """docs/embeddings.md: over-long inputs are cut, and the response says how many were."""
    r = httpx.post(
        live_stack.url("proxy") + "/v1/embeddings",
        json={"model": "local-embed", "input": ["word " * 600, "short"]},
        headers={"Authorization": f"Bearer {live_stack.key()}"},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.headers["x-mlx-stack-truncated-inputs"] == "1"  # the fast lane passes it on
