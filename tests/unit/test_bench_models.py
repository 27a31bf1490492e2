"""The per-model benchmark's own logic: budgets, the ONNX peer's heads, writing the report."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import budgeted
import models
import ort_server
import run


@contextmanager
def one_at_a_time_server(seconds_per_request: float) -> Iterator[run.Server]:
    """A real HTTP server on a free port that answers one request at a time, slowly (as the
    torch peer does with a big model)."""
    worker = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            with worker:
                time.sleep(seconds_per_request)
            body = json.dumps({"data": []}).encode()
            try:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client cut this one off at its budget's end

        def log_message(self, *_: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield run.Server("fake", [], httpd.server_address[1], {}, Path("unused.log"))
    finally:
        httpd.shutdown()
        httpd.server_close()


def workload(count: int, clients: int = 1, rate: float | None = None) -> run.Workload:
    return run.Workload("w", clients, tuple(f"text {i}" for i in range(count)), count, 0, "",
                        rate=rate)  # fmt: skip


def test_a_fast_server_answers_everything_in_budget() -> None:
    with one_at_a_time_server(0.005) as server:
        outcome = budgeted.drive(server, workload(10), budget_s=5)
    assert (outcome.answered, outcome.planned, outcome.abandoned) == (10, 10, False)
    assert outcome.verdict() == "" and math.isfinite(outcome.percentile_ms(0.99))


def test_a_saturated_closed_loop_stops_at_its_budget_and_says_so() -> None:
    with one_at_a_time_server(0.3) as server:
        started = time.monotonic()
        outcome = budgeted.drive(server, workload(20, clients=2), budget_s=1.0)
        took = time.monotonic() - started
    assert took < 2.0  # not 20 x 0.3 s
    assert 2 <= outcome.answered <= 4 and outcome.planned == 20 and outcome.abandoned
    assert outcome.verdict().startswith(f"saturated: {outcome.answered} of 20 answered in 1 s")
    assert math.isinf(outcome.percentile_ms(0.5))  # most were never answered


def test_a_saturated_open_loop_counts_the_unanswered_as_slowest() -> None:
    with one_at_a_time_server(0.2) as server:
        outcome = budgeted.drive(server, workload(20, clients=8, rate=20.0), budget_s=2.0)
    assert outcome.saturated and outcome.planned == 20 and outcome.answered < 20
    assert outcome.percentile_ms(0.0) > 0 and math.isinf(outcome.percentile_ms(0.99))


def test_percentiles_are_over_every_planned_request() -> None:
    outcome = budgeted.Outcome(planned=20, answered=19, latencies_s=tuple(0.01 * (i + 1)
                               for i in range(19)), texts=19, wall_s=1.0, budget_s=1.0,
                               abandoned=True)  # fmt: skip
    assert outcome.percentile_ms(0.5) == pytest.approx(110.0)
    assert outcome.percentile_ms(0.9) == pytest.approx(190.0)
    assert math.isinf(outcome.percentile_ms(0.95))  # the 20th never came
    assert budgeted.fmt_ms(outcome.percentile_ms(0.95), 1.0) == "> 1 s"


def write_head(folder: Path, pooling: str, dense: list[np.ndarray] | None = None) -> None:
    from safetensors.numpy import save_file

    modules = [{"type": "sentence_transformers.models.Transformer", "path": ""},
               {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({pooling: True}))
    for n, weight in enumerate(dense or [], start=2):
        path = folder / f"{n}_Dense"
        path.mkdir()
        save_file({"linear.weight": weight}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(
            {"bias": False, "activation_function": "torch.nn.modules.linear.Identity"}))
        modules.append({"type": "sentence_transformers.models.Dense", "path": path.name})
    modules.append({"type": "sentence_transformers.models.Normalize", "path": "3_Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))


HIDDEN = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) + 1
MASK = np.array([[1, 1, 1], [1, 1, 0]])  # the second row padded on the right


@pytest.mark.parametrize(("pooling", "expected"), [
    ("pooling_mode_cls_token", [HIDDEN[0, 0], HIDDEN[1, 0]]),
    ("pooling_mode_lasttoken", [HIDDEN[0, 2], HIDDEN[1, 1]]),
    ("pooling_mode_mean_tokens", [HIDDEN[0].mean(0), HIDDEN[1, :2].mean(0)]),
])  # fmt: skip
def test_the_onnx_peer_pools_as_the_folder_says(tmp_path: Path, pooling: str,
                                                expected: list[np.ndarray]) -> None:
    write_head(tmp_path, pooling)
    got = ort_server.Head.read(tmp_path).apply(HIDDEN, MASK)
    want = np.stack(expected)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_onnx_peer_applies_the_dense_layers_then_l2(tmp_path: Path) -> None:
    up = np.array([[1, 0], [0, 2], [1, 1]], dtype=np.float32)  # 2 -> 3
    down = np.array([[1, 0, 0], [0, 0, 3]], dtype=np.float32)  # 3 -> 2
    write_head(tmp_path, "pooling_mode_cls_token", [up, down])
    got = ort_server.Head.read(tmp_path).apply(HIDDEN, MASK)
    want = HIDDEN[:, 0] @ up.T @ down.T
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True),
                               rtol=1e-6)  # fmt: skip


def test_a_pooling_the_peer_cannot_do_is_refused(tmp_path: Path) -> None:
    write_head(tmp_path, "pooling_mode_weightedmean_tokens")
    with pytest.raises(SystemExit, match="not supported by this peer"):
        ort_server.Head.read(tmp_path)


def test_a_run_goes_first_in_the_section_and_the_earlier_ones_stay() -> None:
    doc = "# B\n\n## Real-size models (x)\n\nOld run text.\n\n| old |\n\n## Rerank\n\nr\n"
    once = models.write_into(doc, "### Run of A\n\n| a |\n")
    assert once.index("### Run of A") < once.index("### An earlier run") < once.index("Old run")
    assert once.index("| old |") < once.index("## Rerank") and once.endswith("r\n")
    twice = models.write_into(once, "### Run of B\n\n| b |\n")
    assert twice.index("### Run of B") < twice.index("### Run of A") < twice.index("| old |")
    assert twice.count("### An earlier run") == 1
    assert models.write_into("", "### Run of C\n").startswith("## Real-size models")


def test_only_names_known_models_and_the_8bit_ones_are_opt_in() -> None:
    class Args:
        only: list[str] | None = None
        also_8bit = False

    names = [m.name for m in models.selected(Args())]
    assert "Qwen3-Embedding-0.6B-4bit" in names and not any("8bit" in n for n in names)
    assert "nomic-embed-text-v1.5" in names
    Args.also_8bit = True
    assert any("8bit" in m.name for m in models.selected(Args()))
    Args.only = ["Qwen3-Embedding-0.6B-8bit"]
    assert [m.name for m in models.selected(Args())] == ["Qwen3-Embedding-0.6B-8bit"]
    Args.only = ["no-such-model"]
    with pytest.raises(SystemExit, match="unknown"):
        models.selected(Args())
