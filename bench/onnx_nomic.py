"""In-process timing of nomic-embed-text-v1.5 (random weights, its real shape) on both engines.

Times, in turn, round after round (so a busy moment hits all alike): the ONNX graph of
``engine/onnxnomic.py`` with each attention form (``com.microsoft.MultiHeadAttention`` and
opset 23 ``Attention``), in the server's session options, and the MLX engine
(``model/encoder.TextEncoder``, the server's fast CPU kernels). Shapes: one short query of 8
tokens and a batch of 8 texts of 32 tokens (the engine choice's shapes). Medians in ms, with
the CPU, its vector extensions and the load average.

    flock /work/bench.lock python bench/onnx_nomic.py [--model-path DIR] [--rounds 3]

Without ``--model-path`` a nomic-embed-text-v1.5-sized folder is built in a temporary folder
(``tests/support/tinyembed.py``; ~0.55 GB).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH.parent / "tests" / "support"))

from mlx_stack.embeddings.cpu import blas  # noqa: E402

blas.preload()  # before MLX, as the server does

SHAPES = ((1, 8), (8, 32))
RUNS = {1: 10, 8: 3}


def cpu() -> str:
    """The CPU model and the vector extensions that matter for these kernels."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(f for f in wanted if f in flags)}"


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
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nomic-bench-") as scratch:
        folder = args.model_path
        if folder is None:
            import tinyembed

            folder, _ = tinyembed.nomic_bert(Path(scratch), tinyembed.NOMIC_V15)
        return measure(folder, args.rounds)


def measure(folder: Path, rounds: int) -> int:
    from mlx_stack.embeddings.engine import onnxencoder, onnxnomic
    from mlx_stack.embeddings.model.encoder import TextEncoder
    from mlx_stack.embeddings.model.settings import resolve

    candidates: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {}
    loads: dict[str, float] = {}
    for attention in ("mha", "opset23"):
        started = time.monotonic()
        s = onnxencoder._session(onnxnomic.build(folder, attention))
        loads[f"onnx {attention}"] = time.monotonic() - started
        candidates[f"onnx {attention}"] = (
            lambda ids, mask, s=s: s.run(None, {"input_ids": ids, "attention_mask": mask}))
    started = time.monotonic()
    encoder = TextEncoder.load(resolve(folder))
    loads["mlx engine"] = time.monotonic() - started
    candidates["mlx engine"] = lambda ids, mask: encoder.forward([list(r) for r in ids])
    results: dict[tuple[str, tuple[int, int]], list[float]] = {}
    for _ in range(rounds):
        for shape in SHAPES:
            ids = np.full(shape, 2000, np.int32)
            ids[:, 0], ids[:, -1] = 101, 102
            mask = np.ones(shape, np.int32)
            for name, run in candidates.items():
                once = lambda run=run, i=ids, m=mask: run(i, m)  # noqa: E731
                results.setdefault((name, shape), []).append(median_ms(once, RUNS[shape[0]]))
    print(f"{cpu()}; load average {os.getloadavg()[0]:.2f} (after); medians over {rounds} "
          "interleaved rounds, ms")  # fmt: skip
    print("| engine | load s | " + " | ".join(f"{r}x{t}" for r, t in SHAPES) + " |")
    print("|---|---:|" + "---:|" * len(SHAPES))
    for name in candidates:
        cells = " | ".join(f"{statistics.median(results[(name, s)]):.1f}" for s in SHAPES)
        print(f"| {name} | {loads[name]:.1f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
