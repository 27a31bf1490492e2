"""schemathesis against a live embeddings server: thousands of generated requests, valid and
invalid, and every answer checked against the server's own ``/openapi.json``.

The run is bounded (250 examples per operation, about 2500 requests, seed fixed, each answer
due within 60 s: 2048 inputs take ~7-12 s on a busy 2-core machine) and takes about two
minutes.
Every check schemathesis has is on: no 5xx, every status, header, content type and body as
documented, schema-valid requests accepted (the document names the model, its ``dimensions``
range and its vocabulary), schema-invalid ones refused, and 405 for undocumented methods.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from embedserver import child_env, metric_value, require, running_server

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = 250
SEED = 1
MAX_RESPONSE_SECONDS = 60
"""A check like the others (its default, 10 s, is less than 2048 inputs take on a busy
2-core machine: ~7-12 s)."""
RUN_DEADLINE = 400.0
"""Seconds for the whole run before the test fails (it takes ~130 s here)."""


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    require("schemathesis")
    with running_server(tmp_path / "server.log") as server:
        command = [
            sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
            "--checks", "all",
            "--max-examples", str(EXAMPLES_PER_OPERATION),
            "--seed", str(SEED),
            "--generation-database", "none",
            "--workers", "1",
            "--request-timeout", "120",
            "--max-response-time", str(MAX_RESPONSE_SECONDS),
            "--no-color",
        ]  # fmt: skip
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
