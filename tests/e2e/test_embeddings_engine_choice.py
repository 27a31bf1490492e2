"""The embeddings server picks its engine by measurement, caches it, and says which and why.

Real server processes on MiniLM (and a tiny qwen3 folder, which only MLX runs), each with its
own empty cache folder (``XDG_CACHE_HOME``): the first start times both engines and stores the
choice; the next start reads it back and loads one engine; ``MLX_STACK_ENGINE`` and
``--engine`` force one; a folder the ONNX engine cannot build stays on MLX, and forcing ONNX
on it is refused in one line before the port is bound. The ONNX engine runs without torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from embedserver import MIXED_TEXTS, REPO, Server, child_env, cosines, embed, running_server
from tinyembed import build
from tinyrerank import build_tiny_reranker

from mlx_stack.embeddings.engine.choice import Timing, decide
from mlx_stack.ports import free_port

pytestmark = pytest.mark.e2e


def card(server: Server) -> dict[str, Any]:
    with server.client() as http:
        models: dict[str, Any] = http.get("/v1/models").json()
    return models["data"][0]


def cache_env(folder: Path, **extra: str) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(folder), "MLX_STACK_ENGINE": "", **extra}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlx_stack.embeddings", *args],
                          capture_output=True, text=True, env={**child_env(), **(env or {})},
                          timeout=120, cwd=REPO)  # fmt: skip


def test_first_start_measures_and_caches_the_next_reads_it(tmp_path: Path) -> None:
    env = cache_env(tmp_path / "cache")
    with running_server(tmp_path / "first.log", env=env) as first:
        chosen = card(first)
        vectors = embed(first.client(), MIXED_TEXTS)
    choice = chosen["engine_choice"]
    assert chosen["engine"] == choice["engine"] and choice["from_cache"] is False
    measured = {name: Timing(**t) for name, t in choice["measured_ms"].items()}
    assert sorted(measured) == ["mlx", "onnx"]
    assert all(t.short_ms > 0 and t.batch_ms > t.short_ms for t in measured.values())
    assert decide(measured).engine == choice["engine"]  # the rule, applied to what it measured
    assert chosen["blas"] == ("ONNX Runtime's own kernels (MLAS)" if choice["engine"] == "onnx"
                              else chosen["blas"])  # fmt: skip
    log = first.log.read_text()
    assert f"engine: {choice['engine']} (" in log and "timed in" in log
    # the batcher's pass cost comes from the chosen engine's own timings
    chosen_ms = measured[choice["engine"]]
    assert (f"derived from the engine measurement ({chosen_ms.short_ms:.1f} ms short, "
            f"{chosen_ms.batch_ms:.0f} ms for 8x32)") in log  # fmt: skip
    stored = tmp_path / "cache" / "mlx-stack" / "engine" / f"{choice['key']}.json"
    assert json.loads(stored.read_text())["engine"] == choice["engine"]
    assert stored.stat().st_mode & 0o077 == 0
    graphs = list((tmp_path / "cache" / "mlx-stack" / "onnx").glob("*.onnx"))
    assert len(graphs) == 1 and graphs[0].name.startswith(chosen["content_sha256"][:32])

    with running_server(tmp_path / "second.log", env=env) as second:
        again = card(second)
        vectors_again = embed(second.client(), MIXED_TEXTS)
    assert again["engine_choice"] == {**choice, "from_cache": True}
    assert "timed in" not in second.log.read_text()
    assert "derived from the engine measurement" in second.log.read_text()  # from the cache
    assert float(cosines(vectors, vectors_again).min()) >= 0.99999


def test_the_environment_forces_an_engine_and_nothing_is_measured(tmp_path: Path) -> None:
    for engine in ("mlx", "onnx"):
        env = cache_env(tmp_path / engine, MLX_STACK_ENGINE=engine)
        with running_server(tmp_path / f"{engine}.log", env=env) as server:
            chosen = card(server)
        assert chosen["engine"] == engine
        assert chosen["engine_choice"]["reason"].startswith("forced")
        assert chosen["engine_choice"]["measured_ms"] == {}
        assert not list((tmp_path / engine / "mlx-stack").glob("engine/*.json"))


def test_the_onnx_engine_runs_without_torch(tmp_path: Path) -> None:
    """The graph is built from the weights with onnx's helpers: no torch in the process."""
    with running_server(tmp_path / "onnx.log", "--engine", "onnx",
                        env=cache_env(tmp_path / "cache")) as server:  # fmt: skip
        embed(server.client(), "hello")
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        modules = subprocess.run(["cat", f"/proc/{server.process.pid}/cmdline"],
                                 capture_output=True, text=True).stdout  # fmt: skip
    assert "mlx_stack.embeddings" in modules
    assert "onnxruntime" in maps
    assert "libtorch" not in maps and "/torch/" not in maps


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("qwen3", tmp_path_factory.mktemp("qwen3") / "model").folder


def test_an_architecture_onnx_cannot_build_stays_on_mlx(tmp_path: Path, qwen3: Path) -> None:
    with running_server(tmp_path / "auto.log", model=qwen3, name="tiny",
                        env=cache_env(tmp_path / "cache")) as server:  # fmt: skip
        chosen = card(server)
    assert chosen["engine"] == "mlx" and chosen["engine_choice"]["measured_ms"] == {}
    assert "qwen3" in chosen["engine_choice"]["reason"]
    assert not list((tmp_path / "cache" / "mlx-stack").glob("engine/*.json"))


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--engine", "onnx"], {}, "--engine onnx: the ONNX engine cannot serve this model: "
         "architecture qwen3"),
        ([], {"MLX_STACK_ENGINE": "onnx"}, "use --engine mlx or auto"),
        ([], {"MLX_STACK_ENGINE": "torch"}, "MLX_STACK_ENGINE='torch': use one of auto, mlx, onnx"),
        (["--engine", "torch"], {}, "invalid choice: 'torch'"),
    ],
)  # fmt: skip
def test_a_forced_engine_that_cannot_serve_is_refused_in_one_line(
    qwen3: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_cli("--model-path", str(qwen3), "--served-name", "x", "--port",
                     str(free_port()), *args, env=env)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_reranker_runs_on_mlx_and_forcing_onnx_on_it_is_refused(tmp_path: Path) -> None:
    """Rerank mode stays on MLX: ``MLX_STACK_ENGINE=onnx`` for a whole stack leaves it be,
    ``--engine onnx`` on the rerank tier itself is a mistake."""
    folder = build_tiny_reranker(tmp_path / "reranker")
    result = run_cli("--model-path", str(folder), "--served-name", "x", "--port",
                     str(free_port()), "--engine", "onnx")  # fmt: skip
    assert result.returncode == 2 and "a reranker runs on MLX only" in result.stderr
    env = cache_env(tmp_path / "cache", MLX_STACK_ENGINE="onnx")
    with running_server(tmp_path / "rerank.log", model=folder, name="r", env=env) as server:
        chosen = card(server)
        with server.client() as http:
            answer = http.post("/v1/rerank", json={"model": "r", "query": "q",
                                                   "documents": ["a", "b"]})  # fmt: skip
    assert answer.status_code == 200 and chosen["engine"] == "mlx"
