"""A chat tier (``python -m mlx_stack.chat``: mlx_lm.server behind the guard) against web pages,
rebinding pages, strangers and requests that would swap its model (real process, tiny model).

Raw ``http.client`` requests set the exact headers a browser would send.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from embedserver import REPO, child_env, stop

from mlx_stack.ports import free_port

pytestmark = pytest.mark.e2e

KEY = "test-backend-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@dataclass
class Tier:
    port: int
    model: Path
    process: subprocess.Popen[bytes]
    log: Path

    def request(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        sent = {"Content-Type": "application/json", **AUTH, **(headers or {})}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.putrequest(method, path, skip_host="Host" in sent)
            for name, value in sent.items():
                connection.putheader(name, value)
            if data is not None:
                connection.putheader("Content-Length", str(len(data)))
            connection.endheaders(data)
            response = connection.getresponse()
            headers_in = {k.lower(): v for k, v in response.getheaders()}
            return response.status, headers_in, response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Tier]:
    folder = tmp_path_factory.mktemp("chat-guard")
    log = folder / "tier.log"
    (folder / "hf" / "hub").mkdir(parents=True)  # without it mlx_lm's /v1/models raises
    port = free_port()
    command = [sys.executable, "-m", "mlx_stack.chat", "--model", str(tiny_model),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            env={**child_env(), "MLX_STACK_BACKEND_KEY": KEY, "HF_HOME": str(folder / "hf")},
        )
    running = Tier(port, tiny_model, process, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if running.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        yield running
    finally:
        stop(process)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def error_of(body: bytes) -> dict[str, object]:
    error = json.loads(body)["error"]
    assert isinstance(error, dict) and error["message"] and error["code"], error
    return error


def no_cors(headers: dict[str, str]) -> bool:
    return not any(name.startswith("access-control-") for name in headers)


def test_a_plain_chat_and_a_stream_still_work(tier: Tier) -> None:
    status, headers, body = tier.request("POST", "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert json.loads(body)["choices"] and no_cors(headers)
    named = {**CHAT, "model": str(tier.model), "stream": True}
    status, headers, body = tier.request("POST", "/v1/chat/completions", named)
    assert status == 200 and headers["content-type"] == "text/event-stream", body
    assert b"data: [DONE]" in body
    status, _, body = tier.request("POST", "/v1/completions",
                                   {"prompt": "a", "max_tokens": 2, "model": "default_model"})
    assert status == 200, body


def test_models_and_health(tier: Tier) -> None:
    status, headers, body = tier.request("GET", "/v1/models")
    assert status == 200 and no_cors(headers)
    ids = [m["id"] for m in json.loads(body)["data"]]
    assert str(tier.model.resolve()) in ids
    resolved = {**CHAT, "model": str(tier.model.resolve())}
    assert tier.request("POST", "/v1/chat/completions", resolved)[0] == 200
    status, _, body = tier.request("GET", "/health", headers={"Authorization": ""})
    assert status == 200 and json.loads(body) == {"status": "ok"}


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "192.168.1.5", "a, b"])
def test_a_foreign_host_is_refused(tier: Tier, host: str) -> None:
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/health", None),
                               ("POST", "/v1/chat/completions", CHAT)):  # fmt: skip
        status, headers, answer = tier.request(method, path, body, {"Host": host})
        assert status == 403 and error_of(answer)["code"] == "host_not_allowed"
        assert no_cors(headers)


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:1", "127.0.0.1", "127.1.2.3:9", "[::1]:5"]
)
def test_loopback_hosts_are_served(tier: Tier, host: str) -> None:
    assert tier.request("GET", "/v1/models", headers={"Host": host})[0] == 200


@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
def test_a_web_page_gets_403_and_no_cors(tier: Tier, method: str) -> None:
    extra = {"Origin": "http://localhost:3000"}
    if method == "OPTIONS":
        extra["Access-Control-Request-Method"] = "POST"
    body = CHAT if method == "POST" else None
    status, headers, answer = tier.request(method, "/v1/chat/completions", body, extra)
    assert status == 403 and error_of(answer)["code"] == "origin_not_allowed"
    assert no_cors(headers)
    status, _, _ = tier.request("POST", "/v1/chat/completions", CHAT,
                                {"Sec-Fetch-Site": "cross-site"})
    assert status == 403


@pytest.mark.parametrize(
    "content_type", ["text/plain", "text/plain;charset=UTF-8", "multipart/form-data; boundary=x"]
)
def test_a_body_a_form_can_send_is_refused(tier: Tier, content_type: str) -> None:
    status, _, answer = tier.request("POST", "/v1/chat/completions", CHAT,
                                     {"Content-Type": content_type})
    assert status == 415 and error_of(answer)["code"] == "unsupported_media_type"


def test_curl_d_without_a_content_type_still_works(tier: Tier) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert tier.request("POST", "/v1/chat/completions", CHAT, form)[0] == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"model": "/etc"}, "model"),
        ({"model": "mlx-community/Qwen3-0.6B-4bit"}, "model"),
        ({"model": None}, "model"),
        ({"model": ["default_model"]}, "model"),
        ({"adapters": "/tmp"}, "adapters"),
        ({"draft_model": "default_model"}, "draft_model"),
    ],
)
def test_a_request_cannot_change_the_model(tier: Tier, extra: dict, param: str) -> None:
    status, _, answer = tier.request("POST", "/v1/chat/completions", {**CHAT, **extra})
    assert status == 400 and error_of(answer)["param"] == param
    assert tier.request("POST", "/v1/chat/completions", CHAT)[0] == 200


def test_bad_bodies_are_400_not_a_traceback(tier: Tier) -> None:
    for raw in (b"{", b"[1]", b'{"max_tokens": ' + b"9" * 5000 + b"}", b"[" * 100_000):
        status, _, answer = tier.request("POST", "/v1/chat/completions", raw=raw)
        assert status == 400, answer
        error_of(answer)


@pytest.mark.parametrize("auth", ["", "Bearer wrong", f"Basic {KEY}", KEY])
def test_a_stranger_without_the_backend_key_gets_401(tier: Tier, auth: str) -> None:
    for method, path, body in (("GET", "/v1/models", None),
                               ("POST", "/v1/chat/completions", CHAT)):  # fmt: skip
        status, _, answer = tier.request(method, path, body, {"Authorization": auth})
        assert status == 401 and error_of(answer)["code"] == "invalid_api_key"


def test_the_key_is_not_in_the_command_line(tier: Tier) -> None:
    cmdline = Path(f"/proc/{tier.process.pid}/cmdline").read_bytes()
    assert KEY.encode() not in cmdline
