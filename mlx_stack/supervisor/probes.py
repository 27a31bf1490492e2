"""Health probes through each service's real API.

An open port is not readiness: mlx_lm.server loads its model on the first request, and an
embeddings server is useless until a forward pass works. So a chat tier must answer a one-token
completion, the embeddings tier a one-text embedding, and the proxy its readiness route.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from mlx_stack.config.plan import Probe, ProbeKind


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_ms: float
    detail: str = ""


def _request(client: httpx.Client, probe: Probe) -> httpx.Response:
    if probe.kind is ProbeKind.CHAT:
        return client.post(
            f"{probe.url}/v1/chat/completions",
            json={
                "model": probe.model,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "ping"}],
            },
        )
    if probe.kind is ProbeKind.EMBEDDING:
        return client.post(
            f"{probe.url}/v1/embeddings", json={"model": probe.model, "input": "ping"}
        )
    return client.get(f"{probe.url}/health/readiness")


def _check(probe: Probe, r: httpx.Response) -> str:
    """An empty string if the response proves the service works, else what is wrong."""
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    try:
        body = r.json()
    except ValueError:
        return "answer is not JSON"
    if probe.kind is ProbeKind.CHAT and not body.get("choices"):
        return "no choices in the completion"
    if probe.kind is ProbeKind.EMBEDDING:
        data = body.get("data") or [{}]
        if not data[0].get("embedding"):
            return "no embedding in the answer"
    return ""


def run_probe(
    probe: Probe, timeout_s: float = 5.0, client: httpx.Client | None = None
) -> ProbeResult:
    """Send one real request; never raises for a network failure."""
    own = client is None
    c = client or httpx.Client(timeout=timeout_s, trust_env=False)
    start = time.monotonic()
    try:
        r = _request(c, probe)
        problem = _check(probe, r)
    except httpx.HTTPError as exc:
        problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        if own:
            c.close()
    return ProbeResult(not problem, (time.monotonic() - start) * 1000, problem)
