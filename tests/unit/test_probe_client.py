"""The probes' HTTP client: a fresh one per probe, with TLS set up only for https."""

from __future__ import annotations

import ssl

from mlx_stack.supervisor.probes import new_client


def _context(url: str) -> ssl.SSLContext:
    client = new_client(url, 1.0)
    try:  # httpx keeps the context on its transport's pool (private, but the point here)
        return client._transport._pool._ssl_context  # type: ignore[attr-defined]
    finally:
        client.close()


def test_a_loopback_http_probe_loads_no_certificates():
    """Loading the CA bundle cost ~40 ms of CPU per probe: most of an idle supervisor's CPU."""
    context = _context("http://127.0.0.1:8003")
    assert context.verify_mode == ssl.CERT_NONE
    assert context.cert_store_stats()["x509_ca"] == 0


def test_an_https_probe_still_verifies():
    context = _context("https://stack.example:4000")
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] > 0
