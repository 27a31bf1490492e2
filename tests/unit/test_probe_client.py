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


def test_an_https_probe_on_loopback_checks_no_certificate():
    """The stack's own proxy with proxy.tls, probed on 127.0.0.1: its certificate names the
    machine's network name (maybe self-signed), and nothing sits between the two processes."""
    context = _context("https://127.0.0.1:4000")
    assert context.verify_mode == ssl.CERT_NONE


def test_a_remote_https_probe_trusts_ssl_cert_file(tmp_path, monkeypatch):
    import subprocess

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=studio.example", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = _context("https://studio.example:4000")
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 1  # that bundle alone
