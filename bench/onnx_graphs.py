"""In-process timing of ONNX graphs for one model: which graph and session options to ship.

Times, on the same shapes and in turn: the server's graph (``engine/onnxgraph.py``, with
ONNX Runtime's fused ``com.microsoft.Attention``), the same graph with attention in plain ONNX
ops, and (with ``--exported FILE``, e.g. ``bench/.onnx-model/model.onnx`` that ``run.py``
exports with torch for its peer) the torch-exported graph; each with ONNX Runtime's idle
threads spinning and not. Also the MLX engine on the same shapes. Medians in ms.

    python bench/onnx_graphs.py [--model-path DIR] [--exported FILE] [--rounds 3]

Run it on a quiet machine (``uptime``): with other work running, spinning threads and the
numbers both suffer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from mlx_stack.embeddings.cpu import blas  # noqa: E402

blas.preload()  # before MLX, as the server does

SHAPES = ((1, 7), (1, 16), (16, 32), (32, 64))
RUNS = {1: 40, 16: 8, 32: 3}


def session(model: bytes | str, spin: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def median_ms(run: Callable[[], Any], runs: int) -> float:
    run()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path)
    parser.add_argument("--exported", type=Path, help="a torch-exported model.onnx of the model")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from run import minilm_folder

    from mlx_stack.embeddings.engine import onnxgraph
    from mlx_stack.embeddings.model.settings import resolve

    folder = args.model_path or minilm_folder()
    candidates: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {}
    for attention in ("fused", "standard"):
        graph = onnxgraph.build(folder, attention)
        for spin in (False, True):
            s = session(graph, spin)
            candidates[f"ours {attention}, spin {'on' if spin else 'off'}"] = (
                lambda ids, mask, s=s: s.run(None, {"input_ids": ids, "attention_mask": mask}))
    if args.exported is not None:
        for spin in (False, True):
            s = session(str(args.exported), spin)
            candidates[f"torch-exported, spin {'on' if spin else 'off'}"] = (
                lambda ids, mask, s=s: s.run(None, {
                    "input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                    "token_type_ids": np.zeros(ids.shape, np.int64)}))  # fmt: skip
    from mlx_stack.embeddings.model.encoder import TextEncoder

    encoder = TextEncoder.load(resolve(folder))
    candidates["mlx engine"] = lambda ids, mask: encoder.forward([list(r) for r in ids])
    results: dict[tuple[str, tuple[int, int]], list[float]] = {}
    for _ in range(args.rounds):
        for shape in SHAPES:
            ids = np.full(shape, 2000, np.int32)
            ids[:, 0], ids[:, -1] = 101, 102
            mask = np.ones(shape, np.int32)
            for name, run in candidates.items():
                once = lambda run=run, i=ids, m=mask: run(i, m)  # noqa: E731
                results.setdefault((name, shape), []).append(median_ms(once, RUNS[shape[0]]))
    print(f"load average {os.getloadavg()[0]:.2f}; medians over {args.rounds} rounds, ms")
    print("| graph | " + " | ".join(f"{r}x{t}" for r, t in SHAPES) + " |")
    print("|---|" + "---:|" * len(SHAPES))
    for name in candidates:
        cells = " | ".join(f"{statistics.median(results[(name, s)]):.2f}" for s in SHAPES)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
