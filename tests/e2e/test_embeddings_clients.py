"""Real clients get the server's vectors intact: the OpenAI SDK through the LiteLLM proxy.

The OpenAI Python SDK asks for ``encoding_format: base64`` by default and decodes it itself;
LiteLLM's proxy forwards to this server as an OpenAI-compatible upstream. Both paths must
yield the very vectors the server gives directly (the SDK talking straight to the server is
tested in ``test_embeddings_server.py``).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from embedserver import (
    MINILM_DIM,
    MIXED_TEXTS,
    Server,
    cosines,
    embed,
    free_port,
    running_server,
    stop,
)

pytestmark = pytest.mark.e2e

PROXY_DEADLINE = 120.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("clients") / "server.log"
    with running_server(log) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """LiteLLM's proxy with one embedding deployment: this server, under the name local-embed."""
    folder = tmp_path_factory.mktemp("litellm")
    key = "sk-" + secrets.token_hex(16)
    config = folder / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: local-embed\n"
        "    litellm_params:\n"
        "      model: openai/minilm\n"
        f"      api_base: {server.url}/v1\n"
        "      api_key: unused\n"
        "    model_info: {mode: embedding}\n"
        "general_settings:\n"
        "  master_key: os.environ/TEST_PROXY_KEY\n"
    )
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "OPENAI_API_KEY")
    }
    env.update(
        TEST_PROXY_KEY=key,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_MODE="PRODUCTION",
        DEFAULT_MAX_RETRIES="0",
        NO_PROXY="127.0.0.1,localhost",
    )
    litellm = Path(sys.executable).with_name("litellm")
    command = [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    log = folder / "proxy.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_proxy(url, process, log)
        yield url, key
    finally:
        stop(process)


def wait_for_proxy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + PROXY_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"LiteLLM exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health/readiness", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"LiteLLM not ready after {PROXY_DEADLINE} s:\n{log.read_text()[-3000:]}")


def test_openai_sdk_through_litellm_gets_the_servers_vectors(
    server: Server, proxy: tuple[str, str]
) -> None:
    import openai

    url, key = proxy
    with server.client() as http:
        direct = embed(http, MIXED_TEXTS)
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
    default = sdk.embeddings.create(model="local-embed", input=MIXED_TEXTS)  # base64 on the wire
    floats = sdk.embeddings.create(model="local-embed", input=MIXED_TEXTS, encoding_format="float")
    for result in (default, floats):
        got = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)])
        assert got.shape == (len(MIXED_TEXTS), MINILM_DIM)
        assert float(cosines(got, direct).min()) >= 0.99999
        assert float(np.abs(got - direct).max()) < 1e-5
        assert result.usage.prompt_tokens > len(MIXED_TEXTS)
    single = sdk.embeddings.create(model="local-embed", input="one text")
    assert len(single.data) == 1 and len(single.data[0].embedding) == MINILM_DIM


def test_litellm_passes_on_the_servers_4xx(proxy: tuple[str, str]) -> None:
    url, key = proxy
    response = httpx.post(
        f"{url}/v1/embeddings",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "local-embed", "input": ""},
        timeout=60,
    )
    assert 400 <= response.status_code < 500, response.text
    assert "empty string" in response.text
