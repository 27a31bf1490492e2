"""End-to-end tests of ``python -m mlx_stack.embeddings`` against the real MiniLM weights.

The API as a client sees it: shapes, formats, errors, options, ``/v1/models``, ``/health``,
``/metrics``, batching across requests and back-pressure. Numerical parity with
sentence-transformers is in ``test_embeddings_parity.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from embedserver import (
    MINILM_DIM,
    REPO,
    Server,
    assert_openai_error,
    child_env,
    embed,
    free_port,
    minilm_path,
    run_python,
    running_server,
)
from helpers import needs_root

pytestmark = pytest.mark.e2e

DIM = MINILM_DIM


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlx_stack.embeddings", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("embeddings") / "server.log"
    with running_server(log, "--alias", "text-embedding-3-small") as running:
        yield running


@pytest.fixture(scope="module")
def options_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Matryoshka sizes, prefixes, a short maximum with truncation off, little concurrency."""
    log = tmp_path_factory.mktemp("embeddings-options") / "server.log"
    extra = ["--dimensions", "256,128", "--query-prefix", "query: "]
    extra += ["--document-prefix", "passage: ", "--max-seq-len", "32", "--no-truncate"]
    extra += ["--max-concurrent", "2"]
    with running_server(log, *extra) as running:
        yield running


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


# --- readiness -------------------------------------------------------------------------------


def test_health_is_503_loading_until_model_ready(server: Server) -> None:
    first_status, first_body = server.health_statuses[0]
    assert first_status == 503, server.health_statuses
    assert isinstance(first_body, dict) and first_body["status"] == "loading"
    assert "warm-up" in first_body["reason"]
    assert server.health_statuses[-1] == (200, {"status": "ok"})


def test_startup_log_names_blas_model_and_port(server: Server) -> None:
    log = server.log.read_text()
    port = server.url.rsplit(":", 1)[1]
    line = next(line for line in log.splitlines() if "serving 'minilm'" in line)
    assert "BLAS:" in line and f":{port}" in line and "bert" in line
    assert "batches of <= 2048 tokens" in line and "longer inputs truncated" in line


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
    import openai

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
    response = client.post("/v1/embeddings", json={"model": "minilm", "input": [101, 30522]})
    assert_openai_error(response, 400)
    assert "30522" in response.json()["error"]["message"]
    assert "0..30521" in response.json()["error"]["message"]


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
    assert "no Matryoshka support" in response.json()["error"]["message"]


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
    "deeply nested": b"[" * 100_000,
    "unpaired surrogate": b'{"model": "minilm", "input": ["ok", "a\\ud800b"]}',
    "nan dimensions": b'{"model": "minilm", "input": "a", "dimensions": NaN}',
    "integer of 5000 digits in input": b'{"model": "minilm", "input": [' + b"7" * 5000 + b"]}",
    "integer of 5000 digits in dimensions": b'{"model": "minilm", "input": "a", "dimensions": '
    + b"7" * 5000
    + b"}",
    "bad UTF-8": b'{"model": "minilm", "input": "caf\xe9"}',
    "UTF-8 cut short": b'{"model": "minilm", "input": "\xe2\x82"}',
    "fractional token id": b'{"model": "minilm", "input": [101, 7592.5, 102]}',
    "token id past int32": b'{"model": "minilm", "input": [101, 4294967297]}',
    "deeply nested field": b'{"model": "minilm", "input": "a", "user": ' + b"[" * 50_000 + b"}",
    "nested encoding_format": b'{"model": "minilm", "input": "a", "encoding_format": '
    + b"[" * 900
    + b"]" * 900
    + b"}",
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
    assert card["engine"] in ("mlx", "onnx") and card["engine_choice"]["engine"] == card["engine"]
    assert card["aliases"] == ["text-embedding-3-small"]
    assert card["truncation"] is True and card["max_batch_tokens"] == 2048
    assert client.get("/v1/models/minilm").json()["id"] == "minilm"
    assert_openai_error(client.get("/v1/models/other"), 404)


def test_models_names_the_exact_weights(client: httpx.Client, options_server: Server) -> None:
    """content_sha256 follows its documented definition and ignores serving options."""
    card = client.get("/v1/models").json()["data"][0]
    folder = minilm_path()
    assert card["hashed_files"] == ["config.json", "model.safetensors", "tokenizer.json"]
    outer = hashlib.sha256()
    for name in card["hashed_files"]:
        inner = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        outer.update(f"{name}\0{inner}\n".encode())
    assert card["content_sha256"] == outer.hexdigest()
    assert card["revision"] is None  # a package folder, not a hub snapshot
    with options_server.client() as http:
        other = http.get("/v1/models").json()["data"][0]
    assert other["content_sha256"] == card["content_sha256"]


# --- /metrics and batching across requests -------------------------------------------------


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_metrics_count_requests_texts_tokens_and_errors(client: httpx.Client) -> None:
    before = client.get("/metrics").text
    ok = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a b c", "d e"]})
    bad = client.post("/v1/embeddings", json={"model": "minilm", "input": []})
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = after.text
    assert ok.status_code == 200 and bad.status_code == 400
    tokens = ok.json()["usage"]["prompt_tokens"]
    for name, delta in (
        ('mlx_embeddings_requests_total{code="200"}', 1),
        ('mlx_embeddings_requests_total{code="400"}', 1),
        ('mlx_embeddings_errors_total{type="invalid_request"}', 1),
        ("mlx_embeddings_texts_total", 2),
        ("mlx_embeddings_tokens_total", tokens),
        ("mlx_embeddings_request_duration_seconds_count", 2),
    ):
        old = metric(before, name) if name + " " in before else 0.0
        assert metric(text, name) - old == delta, name
    assert metric(text, "process_resident_memory_bytes") > 50e6
    assert metric(text, "mlx_embeddings_queue_depth") == 0
    assert "# TYPE mlx_embeddings_batch_size histogram" in text
    assert 'mlx_embeddings_batch_size_bucket{le="+Inf"}' in text
    assert 'mlx_embeddings_model_info{architecture="bert"' in text


def test_concurrent_requests_share_forward_passes(server: Server, client: httpx.Client) -> None:
    """While a large request computes, 16 one-text requests queue up and run together."""
    passes_before = metric(client.get("/metrics").text, "mlx_embeddings_batch_size_count")
    big = [f"sentence number {i} for a large batch" for i in range(512)]
    texts = [f"small request {i}" for i in range(16)]

    def one(inputs: object) -> np.ndarray:
        with server.client(timeout=120) as http:
            return embed(http, inputs)

    with ThreadPoolExecutor(max_workers=17) as pool:
        large = pool.submit(one, big)
        time.sleep(0.05)
        smalls = list(pool.map(one, texts))
        assert large.result().shape == (512, DIM)
    passes = metric(client.get("/metrics").text, "mlx_embeddings_batch_size_count") - passes_before
    assert passes < 1 + 16, f"{passes} forward passes for 17 requests: nothing was merged"
    alone = embed(client, texts)
    for vector, reference in zip(smalls, alone, strict=True):
        assert float(vector[0] @ reference) >= 0.99999


# --- options: Matryoshka sizes, prefixes, max length, no truncation, concurrency ------------


def test_matryoshka_dimensions_truncate_and_renormalise(options_server: Server) -> None:
    with options_server.client() as http:
        full = embed(http, "matryoshka")[0]
        for size in (128, 200, 256):  # trained sizes and one in between
            small = embed(http, "matryoshka", dimensions=size)[0]
            assert small.shape == (size,)
            expected = full[:size] / np.linalg.norm(full[:size])
            np.testing.assert_allclose(small, expected, atol=1e-6)
        for bad in (64, 385):
            response = http.post(
                "/v1/embeddings", json={"model": "minilm", "input": "x", "dimensions": bad}
            )
            assert_openai_error(response, 400)
            assert "use 128 to 384" in response.json()["error"]["message"]
        card = http.get("/v1/models").json()["data"][0]
    assert card["matryoshka_dimensions"] == [256, 128]
    assert card["max_seq_length"] == 32 and card["truncation"] is False
    assert card["query_prefix"] == "query: " and card["document_prefix"] == "passage: "


def test_input_type_applies_configured_prefix(options_server: Server) -> None:
    with options_server.client() as http:
        as_query = embed(http, "what is mlx", input_type="query")[0]
        by_hand = embed(http, "query: what is mlx")[0]
        plain = embed(http, "what is mlx")[0]
        as_document = embed(http, "what is mlx", input_type="document")[0]
        as_passage = embed(http, "passage: what is mlx")[0]
    assert float(as_query @ by_hand) >= 0.99999
    assert float(as_document @ as_passage) >= 0.99999
    assert float(as_query @ plain) < 0.99999
    assert float(as_document @ as_query) < 0.99999


def test_no_truncate_refuses_long_input_naming_the_limit(options_server: Server) -> None:
    with options_server.client() as http:
        response = http.post(
            "/v1/embeddings", json={"model": "minilm", "input": ["short", "w " * 500]}
        )
        assert_openai_error(response, 400)
        message = response.json()["error"]["message"]
        assert "input[1]" in message and "502 tokens" in message and "maximum of 32" in message
        ids = http.post("/v1/embeddings", json={"model": "minilm", "input": [101] * 40})
        assert_openai_error(ids, 400)
        assert "40 tokens" in ids.json()["error"]["message"]
        ok = http.post("/v1/embeddings", json={"model": "minilm", "input": "w " * 30})
        assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 32


def test_overload_is_429_with_retry_after(options_server: Server) -> None:
    """--max-concurrent 2: while two requests run, a third is refused, not queued."""
    big = {"model": "minilm", "input": [f"sentence {i} keeps the worker busy" for i in range(600)]}

    def post(body: object) -> httpx.Response:
        with options_server.client(timeout=120) as http:
            return http.post("/v1/embeddings", json=body)

    with ThreadPoolExecutor(max_workers=2) as pool:
        running = [pool.submit(post, big) for _ in range(2)]
        time.sleep(0.3)
        with options_server.client() as http:
            refused = http.post("/v1/embeddings", json={"model": "minilm", "input": "one more"})
        results = [future.result() for future in running]
    assert all(r.status_code == 200 for r in results), [r.text[:200] for r in results]
    assert_openai_error(refused, 429)
    assert refused.headers["retry-after"] == "1"
    assert "maximum 2" in refused.json()["error"]["message"]


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
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    result = run_cli("--model-path", str(tmp_path), "--served-name", "x")
    assert_one_line_error(result, "'t5'", "nomic_bert", "xlm_roberta")


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


def test_importing_the_package_does_not_import_mlx() -> None:
    """The BLAS must be preloaded before ``mlx.core``: nothing imported first may pull MLX."""
    run_python(
        "import sys, mlx_stack.embeddings as e, mlx_stack.embeddings.api.server, "
        "mlx_stack.embeddings.cli, mlx_stack.embeddings.cpu.blas, "
        "mlx_stack.embeddings.model.architectures, mlx_stack.embeddings.model.settings, "
        "mlx_stack.embeddings.api, mlx_stack.embeddings.serving, mlx_stack.embeddings.model, "
        "mlx_stack.embeddings.cpu\n"
        "assert 'mlx.core' not in sys.modules, 'mlx imported'\n"
        "assert {'bert', 'nomic_bert'} <= e.SUPPORTED_ARCHITECTURES\n"
    )


def test_fast_gelu_matches_exact_gelu() -> None:
    out = run_python(
        "import mlx.core as mx, mlx.nn as nn\n"
        "from mlx_stack.embeddings.cpu.fastgelu import fast_gelu\n"
        "x = mx.linspace(-12.0, 12.0, 200001)\n"
        "print(mx.abs(fast_gelu(x) - nn.gelu(x)).max().item())\n"
    )
    assert float(out) < 2e-6


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="the mkl wheel is a dependency on Linux x86_64 only",
)
def test_mkl_from_the_dependency_is_preferred_and_in_effect() -> None:
    """Without a model folder to measure on, the generic order puts MKL first (with one, the
    libraries are timed on its products: test_blas_choice_e2e.py).

    In effect means MLX's products run in it: MKL loads its compute library for this CPU
    (libmkl_avx512, _avx2, _def...) on its first sgemm, so that library is mapped only if MLX
    really called MKL (a timing check would be at the mercy of this machine's load)."""
    out = run_python(
        "import json, re\n"
        "from mlx_stack.embeddings.cpu import blas\n"
        "info = blas.preload()\n"
        "import mlx.core as mx\n"
        "def mapped():\n"
        "    return sorted({l.split()[-1].rsplit('/', 1)[-1] for l in open('/proc/self/maps')\n"
        "                   if re.search(r'libmkl_(avx\\d*|def|mc\\d*)\\.so', l)})\n"
        "before = mapped()\n"
        "a = mx.random.normal((256, 256))\n"
        "mx.eval(a @ a)\n"
        "print(json.dumps([info.name, before, mapped()]))\n"
    )
    name, before, after = json.loads(out)
    assert name.startswith("MKL 20"), name
    assert before == [] and after, (before, after)


# --- the compiled kernels' cache -------------------------------------------------------------

KERNEL_TEXTS = ["hi", "The quick brown fox jumps over the lazy dog.", "Mittelgroßer Satz. " * 20]


def kernel_cache(tmp_path: Path, compiler: str, body: bytes) -> Path:
    """A private cache folder holding ``body`` where the server looks for its kernels."""
    from mlx_stack.embeddings.cpu import kernels

    folder = tmp_path / "cache" / "mlx-stack" / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    (folder.parent).chmod(0o700)
    library = folder / kernels.library_name(kernels.read_source(), compiler)
    library.write_bytes(body)
    return library


def ready_line(log: Path) -> str:
    """The log line naming the fast kernels in use."""
    return next(line for line in log.read_text().splitlines() if "model ready in" in line)


def test_a_broken_cached_library_falls_back_to_mlx_with_the_same_vectors(
    server: Server, tmp_path: Path
) -> None:
    """A damaged library (no matching checksum) is not loaded; with no compiler to rebuild it
    the server keeps MLX's own kernels, says so, and serves the same vectors."""
    library = kernel_cache(tmp_path, "false", b"\x7fELF\x02\x01\x01" + b"\0" * 57)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "CXX": "false"}
    with running_server(tmp_path / "fallback.log", "--engine", "mlx", env=env) as fallback:
        log = fallback.log.read_text()
        assert f"not using the cached CPU kernels {library}" in log
        assert "fast CPU kernels unavailable, using MLX's" in log
        assert "fused encoder layers" not in ready_line(fallback.log)
        with fallback.client() as http, server.client() as reference:
            got, want = embed(http, KERNEL_TEXTS), embed(reference, KERNEL_TEXTS)
    np.testing.assert_allclose(got, want, atol=2e-5)  # the reference: either engine


@needs_root
def test_a_planted_library_is_not_loaded_and_the_rebuilt_one_serves(
    server: Server, tmp_path: Path
) -> None:
    """Another user's library with a constructor where the server looks for its kernels:
    never loaded (its code would run inside the server); the server builds its own."""
    import os

    marker = tmp_path / "planted-ran"
    source = tmp_path / "planted.cpp"
    source.write_text(
        "#include <cstdio>\n__attribute__((constructor)) static void planted() {\n"
        f'  FILE* f = std::fopen("{marker}", "a"); if (f) {{ std::fputs("ran", f); '
        "std::fclose(f); }\n}\n"
    )
    built = tmp_path / "planted.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(built)], check=True,
                   timeout=120)
    library = kernel_cache(tmp_path, "g++", built.read_bytes())
    os.chown(library, 54321, 54321)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "CXX": "g++"}
    with running_server(tmp_path / "rebuilt.log", "--engine", "mlx", env=env) as rebuilt:
        assert not marker.exists()
        assert "belongs to uid 54321" in rebuilt.log.read_text()
        assert "fused encoder layers" in ready_line(rebuilt.log)
        with rebuilt.client() as http, server.client() as reference:
            got, want = embed(http, KERNEL_TEXTS), embed(reference, KERNEL_TEXTS)
    assert library.stat().st_uid == os.geteuid()
    np.testing.assert_allclose(got, want, atol=1e-6)
