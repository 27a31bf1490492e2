"""`status` and `up` ask each ``url:`` tier themselves (``cli/endpoints.py``): a real HTTP server
(tests/support/fakeopenai.py's handler, in a thread on a free port) that answers, refuses the
key, does not know the model, or is not there."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import fakeopenai
import pytest

from mlx_stack.cli.endpoints import probe_endpoints, unreachable_warnings
from mlx_stack.config.plan import Endpoint, Probe, ProbeKind, ServiceKind
from mlx_stack.ports import free_port

KEY = "sk-endpoint-key-123456"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    fakeopenai.Options.model, fakeopenai.Options.key = "served", KEY
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), fakeopenai.Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def endpoint(name: str, url: str, model: str = "served", key: str | None = KEY,
             kind: ProbeKind = ProbeKind.CHAT) -> Endpoint:
    service = ServiceKind.EMBEDDINGS if kind is ProbeKind.EMBEDDING else ServiceKind.CHAT
    return Endpoint(name, service, Probe(kind, url, model, key, health="/v1/models"))


def test_reachable_failing_and_unreachable(server):
    closed = f"http://127.0.0.1:{free_port()}"
    seen = {e.name: e for e in probe_endpoints([
        endpoint("ok", server),
        endpoint("emb", server, kind=ProbeKind.EMBEDDING),
        endpoint("nokey", server, key=None),
        endpoint("nomodel", server, model="other"),
        endpoint("gone", closed),
    ])}
    assert seen["ok"].state == seen["emb"].state == "reachable"
    assert seen["ok"].latency_ms is not None and seen["ok"].latency_ms > 0
    assert seen["ok"].problem == "" and seen["ok"].port == int(server.rpartition(":")[2])
    assert seen["nokey"].state == "failing" and "HTTP 401" in seen["nokey"].problem
    assert seen["nomodel"].state == "failing" and "HTTP 404" in seen["nomodel"].problem
    assert seen["gone"].state == "unreachable" and seen["gone"].latency_ms is None
    assert "ConnectError" in seen["gone"].problem and closed in seen["gone"].detail
    assert KEY not in repr(seen)


def test_up_warns_of_each_url_tier_that_does_not_answer(server):
    closed = f"http://127.0.0.1:{free_port()}"
    warnings = unreachable_warnings([endpoint("ok", server), endpoint("gone", closed)])
    assert len(warnings) == 1 and warnings[0].startswith(f"gone ({closed}, a url: tier) is "
                                                         "unreachable (ConnectError")
    assert "chat requests fall back to the other tiers" in warnings[0]


def test_doctor_counts_external_servers_and_checks_a_command_tiers_port(tmp_path):
    from mlx_stack.cli.doctor import check_ports, check_stack
    from mlx_stack.config.catalog import load_catalog
    from mlx_stack.paths import StatePaths

    port = free_port()
    paths = StatePaths(tmp_path)
    paths.stack_file.write_text(f"tiers:\n  big:\n    command: [srv]\n    port: {port}\n"
                                "  remote:\n    url: http://10.0.0.5:8080\n")
    check, stack = check_stack(paths, load_catalog(None))
    assert stack is not None and "0 model server(s), 2 external server(s)" in check.detail
    assert any(c.name == f"port {port}" and "free for big" in c.detail
               for c in check_ports(stack, running=False))
