"""Health probes through each service's real API: readiness, and a cheap liveness check.

An open port is not readiness: mlx_lm.server loads its model on the first request, and an
embeddings server is useless until a forward pass works. So a chat tier must answer a one-token
completion, the embeddings tier a one-text embedding, the rerank tier a one-document rerank, and
the proxy its readiness route.

Liveness is the service's own cheap health route, answered by its HTTP layer whatever the model
is doing: measured, mlx_lm.server answers ``/health`` in ~0.1 s during a long generation (and
503 once its generation thread has died), the embeddings server answers from its event loop
while a pass runs. A stopped or deadlocked server answers neither (see ``policy.judge_hang``).

A result says whether the service *answered* (an HTTP response, maybe a bad one) or not
(timeout, connection refused): a wrong answer means broken, no answer may mean busy.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from mlx_stack.config.plan import Probe, ProbeKind
from mlx_stack.loopback import is_loopback


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_ms: float
    detail: str = ""
    #: An HTTP response came back (a failed ``ok`` with ``answered`` is a broken service).
    answered: bool = True


#: The cheap route each kind answers from its HTTP layer alone.
LIVENESS_PATHS = {ProbeKind.CHAT: "/health", ProbeKind.EMBEDDING: "/health",
                  ProbeKind.RERANK: "/health", ProbeKind.PROXY: "/health/liveliness"}


def _auth(probe: Probe) -> dict[str, str]:
    return {"Authorization": f"Bearer {probe.key}"} if probe.key else {}


def _request(client: httpx.Client, probe: Probe) -> httpx.Response:
    if probe.kind is ProbeKind.CHAT:
        return client.post(
            f"{probe.url}/v1/chat/completions",
            headers=_auth(probe),
            json={
                "model": probe.model,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "ping"}],
            },
        )
    if probe.kind is ProbeKind.EMBEDDING:
        return client.post(
            f"{probe.url}/v1/embeddings", json={"model": probe.model, "input": "ping"},
            headers=_auth(probe),
        )
    if probe.kind is ProbeKind.RERANK:
        return client.post(
            f"{probe.url}/v1/rerank",
            json={"model": probe.model, "query": "ping", "documents": ["ping"]},
            headers=_auth(probe),
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
    if not isinstance(body, dict):
        return "answer is not a JSON object"
    if probe.kind is ProbeKind.CHAT and not body.get("choices"):
        return "no choices in the completion"
    if probe.kind is ProbeKind.EMBEDDING:
        data = body.get("data")
        first = data[0] if isinstance(data, list) and data else None
        if not isinstance(first, dict) or not first.get("embedding"):
            return "no embedding in the answer"
    if probe.kind is ProbeKind.RERANK:
        return _check_rerank(body)
    return ""


def _check_rerank(body: dict) -> str:
    """One result for the one document, with a numeric score (the server's whole path ran)."""
    results = body.get("results")
    first = results[0] if isinstance(results, list) and len(results) == 1 else None
    score = first.get("relevance_score") if isinstance(first, dict) else None
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        return "no relevance_score in the rerank answer"
    return ""


def run_probe(
    probe: Probe, timeout_s: float = 5.0, client: httpx.Client | None = None
) -> ProbeResult:
    """Send one real request; never raises for a network failure."""
    return _run(probe, lambda c: _check(probe, _request(c, probe)), timeout_s, client)


def run_liveness(
    probe: Probe, timeout_s: float = 2.0, client: httpx.Client | None = None
) -> ProbeResult:
    """Ask the service's cheap health route; 200 is alive, any other answer is broken."""

    def check(c: httpx.Client) -> str:
        # An external server's own route (``health:``), which may want its key.
        r = c.get(f"{probe.url}{probe.health or LIVENESS_PATHS[probe.kind]}",
                  headers=_auth(probe) if probe.health else {})
        return "" if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"

    return _run(probe, check, timeout_s, client)


def new_client(url: str, timeout_s: float) -> httpx.Client:
    """A fresh client per probe (no pooled connection to a process that was replaced).

    TLS settings only for an ``https`` URL: httpx's default context loads the CA bundle, ~40 ms
    of CPU per client, which at one liveness probe per service per second was most of an idle
    supervisor's CPU (12% of a core with two services, measured with py-spy)."""
    return httpx.Client(timeout=timeout_s, trust_env=False, verify=_verify(url))


def _verify(url: str) -> bool | ssl.SSLContext:
    """Check certificates for https, except on loopback: the stack's own proxy with
    ``proxy.tls`` (a certificate for the machine's network name, maybe self-signed) probed on
    127.0.0.1, where no one can sit between the supervisor and its child. ``SSL_CERT_FILE``
    (the CA bundle LiteLLM also honours) is trusted for a remote stack's certificate."""
    if not url.startswith("https:"):
        return False
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or is_loopback(host):
        return False
    bundle = os.environ.get("SSL_CERT_FILE")
    if bundle and os.path.isfile(bundle):
        return ssl.create_default_context(cafile=bundle)
    return True


def _run(probe: Probe, check: Callable[[httpx.Client], str], timeout_s: float,
         client: httpx.Client | None) -> ProbeResult:
    own = client is None
    c = client or new_client(probe.url, timeout_s)
    start = time.monotonic()
    answered = True
    try:
        problem = check(c)
    except httpx.HTTPError as exc:
        answered = False
        problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        if own:
            c.close()
    return ProbeResult(not problem, (time.monotonic() - start) * 1000, problem, answered)
