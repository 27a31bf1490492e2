"""schemathesis against a live embeddings server, and through the proxy: thousands of generated
requests, valid and invalid, and every answer checked against the server's own ``/openapi.json``.

The run is bounded (250 examples per operation, about 2500 requests, seed fixed, each answer
due within 60 s: 2048 inputs take ~7-12 s on a busy 2-core machine) and takes about two
minutes.
Every check schemathesis has is on: no 5xx, every status, header, content type and body as
documented, schema-valid requests accepted (the document names the model, its ``dimensions``
range and its vocabulary), schema-invalid ones refused, and 405 for undocumented methods.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from embedserver import child_env, metric_value, require, running_server
from stackenv import write_stack

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = 250
SEED = 1
MAX_RESPONSE_SECONDS = 60
"""A check like the others (its default, 10 s, is less than 2048 inputs take on a busy
2-core machine: ~7-12 s)."""
RUN_DEADLINE = 400.0
"""Seconds for the whole run before the test fails (it takes ~130 s here)."""


def schemathesis(location: str, *extra: str, examples: int) -> list[str]:
    return [
        sys.executable, "-m", "schemathesis.cli", "run", location, *extra,
        "--checks", "all",
        "--max-examples", str(examples),
        "--seed", str(SEED),
        "--generation-database", "none",
        "--workers", "1",
        "--request-timeout", "120",
        "--max-response-time", str(MAX_RESPONSE_SECONDS),
        "--no-color",
    ]  # fmt: skip


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    require("schemathesis")
    with running_server(tmp_path / "server.log") as server:
        command = schemathesis(f"{server.url}/openapi.json", examples=EXAMPLES_PER_OPERATION)
        started = time.monotonic()
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=child_env(),
            timeout=RUN_DEADLINE,
        )
        seconds = time.monotonic() - started
        metrics = httpx.get(f"{server.url}/metrics").text
        log = server.log.read_text()
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    generated = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert generated, report
    assert int(generated[1]) == int(generated[2]) >= 2000, report
    assert 'code="500"' not in metrics and 'type="internal"' not in metrics
    assert metric_value(metrics, 'mlx_embeddings_requests_total{code="200"}') > 100
    assert "Traceback" not in log, log[-3000:]
    print(f"schemathesis: {generated[1]} requests in {seconds:.0f} s")


PROXY_EXAMPLES = 400
"""For the one operation through the proxy: ~600 requests in ~2.5 min here (the coverage
phase, ~100 requests of every edge of the schema, costs half of it)."""


def test_schemathesis_through_the_proxy_finds_nothing(tmp_path: Path) -> None:
    """The same document, with the proxy's model name, against :4000's ``/v1/embeddings``: no
    5xx and every answer as documented, for bodies LiteLLM itself would have failed on."""
    require("schemathesis")
    env = write_stack(tmp_path / "stack", None)
    try:
        env.cli("up", check=True, timeout=600)
        document = httpx.get(env.url("embeddings") + "/openapi.json", timeout=30,
                             headers=env.backend_headers()).json()
        model = document["components"]["schemas"]["Request"]["properties"]["model"]
        assert "local-embed" in model["enum"]  # the server answers to the proxy's name too
        model["enum"] = ["local-embed"]  # the only name the proxy serves it under
        document["paths"] = {"/v1/embeddings": document["paths"]["/v1/embeddings"]}
        location = tmp_path / "proxy-openapi.json"
        location.write_text(json.dumps(document))
        command = schemathesis(str(location), "--url", env.url("proxy"),
                               "-H", f"Authorization: Bearer {env.key()}",
                               examples=PROXY_EXAMPLES)  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                                env=child_env(), timeout=RUN_DEADLINE)  # fmt: skip
        metrics = httpx.get(env.url("embeddings") + "/metrics", timeout=30,
                            headers=env.backend_headers()).text
    finally:
        env.cli("down", timeout=120)
        env.kill_everything()
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert env.key() not in report
    assert result.returncode == 0, report
    generated = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert generated, report
    assert int(generated[1]) == int(generated[2]) >= 400, report
    # schemathesis's own checks saw no 5xx at :4000; behind it, the server saw valid requests
    # (the body check answered most invalid ones) and no failure of its own either
    assert metric_value(metrics, 'mlx_embeddings_requests_total{code="200"}') > 100
    assert 'code="500"' not in metrics and 'type="internal"' not in metrics
