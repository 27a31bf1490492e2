"""The embeddings server against hostile clients, web pages and slow sockets (real process).

One server with short limits (head 2 s, body 3 s, 16 connections, 2 requests in progress),
one allowed host and one allowed origin. Raw sockets stand in for clients that trickle,
stall, hang up or speak broken HTTP; ``/metrics`` and the log show what the server made of it.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from embedserver import Server, assert_openai_error, embed, metric_value, running_server

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
MAX_CONNECTIONS = 16
ALLOWED_ORIGIN = "http://localhost:3000"
BODY = {"model": "minilm", "input": "x"}
SLACK = 1.5
"""How late a cut-off may come on a busy 2-core machine."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("embeddings-http") / "server.log"
    extra = ["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)]
    extra += ["--max-connections", str(MAX_CONNECTIONS), "--max-concurrent", "2"]
    extra += ["--allowed-hosts", "myhost.test", "--allowed-origins", ALLOWED_ORIGIN]
    with running_server(log, *extra) as running:
        yield running
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def connect(server: Server, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout)


def metrics(client: httpx.Client) -> str:
    return client.get("/metrics").text


def trickle(server: Server, data: bytes) -> tuple[float, bytes]:
    with connect(server) as sock:
        return trickle_on(sock, data)


def trickle_on(sock: socket.socket, data: bytes, every: float = 0.5) -> tuple[float, bytes]:
    """Send ``data`` a byte every ``every`` s; (seconds until the server hung up, its bytes)."""
    sock.settimeout(every)
    started = time.monotonic()
    received = b""
    for index in range(len(data)):
        try:
            sock.sendall(data[index : index + 1])
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed
            break
        if not chunk:
            break
        received += chunk
    else:
        raise AssertionError(f"still open after {time.monotonic() - started:.1f} s")
    return time.monotonic() - started, received


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def response_json(raw: bytes) -> dict[str, object]:
    _, _, body = raw.partition(b"\r\n\r\n")
    return json.loads(body)


# --- Host and Origin -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8003", "127.0.0.1.nip.io", "192.168.1.5", "localhost."]
)
def test_a_foreign_host_is_refused_in_openai_shape(client: httpx.Client, host: str) -> None:
    """DNS rebinding: a page's own name, pointed at 127.0.0.1, arrives as its Host."""
    for response in (
        client.get("/v1/models", headers={"Host": host}),
        client.post("/v1/embeddings", json=BODY, headers={"Host": host}),
    ):
        assert_openai_error(response, 403)
        assert response.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:1", "127.0.0.1", "127.9.9.9:8003", "[::1]:8003", "myhost.test"]
)
def test_loopback_and_allowed_hosts_are_served(client: httpx.Client, host: str) -> None:
    assert client.get("/health", headers={"Host": host}).status_code == 200


def test_a_cross_site_text_plain_post_is_refused_and_not_run(client: httpx.Client) -> None:
    """What a form or no-cors fetch on any web page can send: refused before anything runs."""
    before = metrics(client)
    response = client.post(
        "/v1/embeddings",
        content=json.dumps({"model": "minilm", "input": "from a web page"}),
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
    )
    assert_openai_error(response, 403)
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert not [h for h in response.headers if h.startswith("access-control-")]
    after = metrics(client)
    assert metric_value(after, "mlx_embeddings_texts_total") == metric_value(
        before, "mlx_embeddings_texts_total"
    )
    sample = 'mlx_embeddings_refused_total{reason="forbidden_origin"}'
    assert metric_value(after, sample) == metric_value(before, sample) + 1


def test_other_browser_requests_are_refused(client: httpx.Client) -> None:
    refused = [
        client.options(
            "/v1/embeddings",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        ),
        client.get("/v1/models", headers={"Origin": "null"}),
        client.get("/v1/models", headers={"Sec-Fetch-Site": "cross-site"}),
    ]
    for response in refused:
        assert_openai_error(response, 403)
        assert "access-control-allow-origin" not in response.headers


def test_an_allowed_origin_gets_cors_and_its_preflight(client: httpx.Client) -> None:
    preflight = client.options(
        "/v1/embeddings",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    response = client.post(
        "/v1/embeddings",
        json={"model": "minilm", "input": "from a trusted page"},
        headers={"Origin": ALLOWED_ORIGIN},
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "Origin" in response.headers["vary"]


def test_a_websocket_upgrade_is_plain_http_and_checked(server: Server) -> None:
    """No WebSocket routes: a browser's cross-site WebSocket handshake meets the same checks."""
    handshake = (
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    for origin, status in ((b"Origin: http://evil.example\r\n", b"403"), (b"", b"200")):
        with connect(server) as sock:
            sock.sendall(handshake + origin + b"Connection: close\r\n\r\n")
            assert read_all(sock).startswith(b"HTTP/1.1 " + status), origin
    assert "WebSocket library" not in server.log.read_text()


def test_the_startup_log_states_the_http_limits(server: Server) -> None:
    line = next(ln for ln in server.log.read_text().splitlines() if "HTTP: Host" in ln)
    assert "Host loopback + myhost.test; web origins http://localhost:3000" in line
    assert "head within 2 s, body within 3 s; <= 16 connections" in line


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "text/plain", "application/json"]
)
def test_programs_without_origin_work_with_any_content_type(
    client: httpx.Client, content_type: str | None
) -> None:
    """curl -d sends a form type; SDKs and LiteLLM send JSON; none sends an Origin."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"model": "minilm", "input": "hello"}).encode()
    response = client.post("/v1/embeddings", content=body, headers=headers)
    assert response.status_code == 200, response.text


# --- slow, silent and broken clients ---------------------------------------------------------


def test_a_trickled_request_head_is_cut_off(server: Server, client: httpx.Client) -> None:
    before = metric_value(metrics(client), 'mlx_embeddings_refused_total{reason="header_timeout"}')
    head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100
    seconds, received = trickle(server, head)
    assert HEADER_TIMEOUT - 0.2 < seconds < HEADER_TIMEOUT + SLACK, seconds
    assert received.startswith(b"HTTP/1.1 408 ")
    assert response_json(received)["error"]["code"] == "header_timeout"  # type: ignore[index]
    after = metric_value(metrics(client), 'mlx_embeddings_refused_total{reason="header_timeout"}')
    assert after == before + 1


def test_a_silent_connection_is_closed(server: Server) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed, nothing said to a client that said nothing
        assert time.monotonic() - started < HEADER_TIMEOUT + SLACK


def test_a_trickled_body_gets_408_within_the_body_timeout(
    server: Server, client: httpx.Client
) -> None:
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head)
        seconds, received = trickle_on(sock, b"{" + b" " * 999)
    assert BODY_TIMEOUT - 0.2 < seconds < BODY_TIMEOUT + SLACK, seconds
    assert received.startswith(b"HTTP/1.1 408 ")
    assert response_json(received)["error"]["code"] == "body_timeout"  # type: ignore[index]
    assert metric_value(metrics(client), 'mlx_embeddings_errors_total{type="request_timeout"}')


def test_a_body_nobody_reads_is_cut_off(server: Server) -> None:
    """After an early answer (405 here) the body is drained, but not for longer than allowed."""
    head = b"POST /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head)
        seconds, received = trickle_on(sock, b"x" * 100)
    assert received.startswith(b"HTTP/1.1 405 ")
    assert seconds < BODY_TIMEOUT + 1 + SLACK, seconds


def test_a_full_server_refuses_before_reading_the_body(
    server: Server, client: httpx.Client
) -> None:
    """--max-concurrent 2: two uploads in progress hold both places; a third request gets 429
    as soon as its head arrives, though it announced 16 MB. The two then hang up mid-body: no
    500, no traceback, not an internal error."""
    before = metrics(client)
    upload = b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{"
    holders = [connect(server), connect(server)]
    try:
        for sock in holders:
            sock.sendall(upload)
        time.sleep(0.3)
        with connect(server) as third:
            started = time.monotonic()
            third.sendall(upload.replace(b"1000", b"16000000")[:-1])
            answer = third.recv(65536)
            seconds = time.monotonic() - started
    finally:
        for sock in holders:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
    assert b"retry-after: 1" in answer.lower() and seconds < 1.0
    time.sleep(0.3)
    after = metrics(client)
    closed = 'mlx_embeddings_errors_total{type="client_closed"}'
    assert metric_value(after, closed) == metric_value(before, closed) + 2
    assert 'type="internal"' not in after and 'code="500"' not in after
    assert embed(client, "still serving").shape[0] == 1


def test_connections_over_the_cap_get_503(server: Server, client: httpx.Client) -> None:
    sockets = [connect(server) for _ in range(MAX_CONNECTIONS + 1)]
    try:
        last = sockets[-1]
        last.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = read_all(last)
    finally:
        for sock in sockets:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert b"retry-after: 1" in answer.lower()
    assert response_json(answer)["error"]["code"] == "too_many_connections"  # type: ignore[index]
    time.sleep(0.2)
    assert client.get("/health").status_code == 200
    sample = 'mlx_embeddings_refused_total{reason="connection_limit"}'
    assert metric_value(metrics(client), sample) >= 1


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 40_000,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
    ],
    ids=["garbage", "unfinished head over 16 KiB", "negative length"],
)
def test_malformed_http_is_400_in_openai_shape(server: Server, raw: bytes) -> None:
    with connect(server) as sock:
        sock.sendall(raw)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    error = response_json(answer)["error"]
    assert error["code"] == "invalid_http"  # type: ignore[index]


# --- large bodies: decoded off the event loop ------------------------------------------------


def test_a_16_mib_token_id_body_does_not_stall_health(server: Server) -> None:
    """CPython's JSON parser holds the GIL for the whole parse (~1-2.5 s for this body): it
    runs in the decoder process, so /health keeps answering in milliseconds meanwhile."""
    rng = random.Random(7)
    ids = ",".join(str(rng.randrange(10000, 30000)) for _ in range(2_796_000))
    body = f'{{"model":"minilm","input":[{ids}]}}'.encode()
    assert 16 * 2**20 - 4096 < len(body) <= 16 * 2**20
    result: dict[str, httpx.Response] = {}

    def big() -> None:
        with server.client(timeout=120) as http:
            result["big"] = http.post("/v1/embeddings", content=body)

    worker = threading.Thread(target=big)
    worst = 0.0
    polls = 0
    with server.client() as http:
        worker.start()
        while worker.is_alive():
            started = time.monotonic()
            assert http.get("/health").status_code == 200
            worst = max(worst, time.monotonic() - started)
            polls += 1
            time.sleep(0.01)
    worker.join()
    assert result["big"].status_code == 200, result["big"].text[:300]
    assert result["big"].json()["usage"]["prompt_tokens"] == 256  # truncated
    assert polls >= 5
    assert worst < 0.5, f"/health took {worst:.2f} s during the parse"  # before: 2.4 s


LARGE_TEXT = b"a" * 70_000
"""Larger than the inline limit (64 KiB): these bodies go through the decoder process."""
LARGE_BAD = {
    "integer of 5000 digits": b'{"model":"minilm","input":"'
    + LARGE_TEXT
    + b'","dimensions":'
    + b"9" * 5000
    + b"}",
    "bad UTF-8": b'{"model":"minilm","input":"' + LARGE_TEXT + b'\xff"}',
    "lone surrogate": b'{"model":"minilm","input":"' + LARGE_TEXT + b'\\ud800"}',
    "deep nesting": b"[" * 100_000,
    "empty lists": b'{"model":"minilm","input":[' + b",".join([b"[]"] * 30_000) + b"]}",
}


@pytest.mark.parametrize("body", LARGE_BAD.values(), ids=LARGE_BAD.keys())
def test_large_bad_bodies_are_400(client: httpx.Client, body: bytes) -> None:
    assert len(body) > 64 * 1024
    assert_openai_error(client.post("/v1/embeddings", content=body), 400)


def test_a_large_good_body_is_served(client: httpx.Client) -> None:
    response = client.post(
        "/v1/embeddings", content=b'{"model":"minilm","input":"' + b"word " * 20_000 + b'"}'
    )
    assert response.status_code == 200 and response.headers["x-mlx-stack-truncated-inputs"] == "1"


# --- the OpenAPI document ------------------------------------------------------------------


def test_openapi_document_is_served_for_this_model(client: httpx.Client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    request = document["components"]["schemas"]["Request"]["properties"]
    assert request["model"]["enum"] == ["minilm"]
    assert request["input"]["oneOf"][2]["items"]["maximum"] == 30521  # MiniLM's vocabulary
    assert set(document["paths"]) >= {"/v1/embeddings", "/v1/models", "/health", "/metrics"}


# --- the decoder process -------------------------------------------------------------------


def decoder_processes(server_pid: int) -> list[psutil.Process]:
    """The server's multiprocessing children: the decoder (and its resource tracker)."""
    try:
        children = psutil.Process(server_pid).children()
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if "multiprocessing" in " ".join(c.cmdline())]


def large_body(text: str = "word ") -> bytes:
    return json.dumps({"model": "minilm", "input": text * 20_000}).encode()


def test_a_killed_decoder_is_replaced(server: Server, client: httpx.Client) -> None:
    assert client.post("/v1/embeddings", content=large_body()).status_code == 200
    (decoder,) = [p for p in decoder_processes(server.process.pid)
                  if "spawn_main" in " ".join(p.cmdline())]
    decoder.kill()
    decoder.wait(timeout=10)
    response = client.post("/v1/embeddings", content=large_body("again "))
    assert response.status_code == 200, response.text
    assert "body decoder process ended" in server.log.read_text()


def test_the_decoder_ends_with_the_server(tmp_path: Path) -> None:
    """The server leaves with os._exit (or SIGKILL), telling no one: its decoder notices."""
    with running_server(tmp_path / "server.log") as server, server.client() as http:
        assert http.post("/v1/embeddings", content=large_body()).status_code == 200
        children = decoder_processes(server.process.pid)
        assert children
        server.process.kill()
        server.process.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
