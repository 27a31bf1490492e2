"""The timing child: one BLAS library's ``cblas_sgemm`` on a model's products, round by round.

``python -m mlx_stack.embeddings.cpu.blastime LIBRARY``: each candidate library runs in its own
process (two BLAS libraries in one process would clash over their symbols), loaded exactly as
the server loads it (``blas._try_load``: the same OPENBLAS_CORETYPE and KMP_BLOCKTIME, the
inherited thread settings). The parent (``blasmeasure.py``) sends the shapes as one JSON line,
reads ``{"name": ...}`` once the library is loaded and warm, then sends ``round`` lines and
reads one ``{"short_ms", "batch_ms"}`` line per round, so it can interleave the libraries.
Products are ``C = A @ B.T`` in row-major order, as an MLX ``Linear`` layer calls them.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from collections.abc import Callable

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
SHORT_REPEATS = 10
"""Passes per round at the short rows (each ~1-2 ms on MiniLM); one at the batch rows."""


def main(argv: list[str]) -> int:
    from .blas import _try_load

    if len(argv) != 1:
        print(json.dumps({"error": "usage: blastime LIBRARY"}), flush=True)
        return 2
    shapes = json.loads(sys.stdin.readline())
    info = _try_load(argv[0])
    if info is None:
        print(json.dumps({"error": "does not load, or has no cblas_sgemm"}), flush=True)
        return 1
    lib = ctypes.CDLL(argv[0])
    products = [(int(k), int(n)) for k, n in shapes["products"]]
    short_rows, batch_rows = int(shapes["short_rows"]), int(shapes["batch_rows"])
    short = _pass(lib, products, short_rows, batch_rows)
    batch = _pass(lib, products, batch_rows, batch_rows)
    short(), batch()  # warm: thread pools started, kernels paged in
    print(json.dumps({"name": info.name}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        print(json.dumps({"short_ms": _time(short, SHORT_REPEATS), "batch_ms": _time(batch, 1)}),
              flush=True)  # fmt: skip
    return 0


def _pass(lib: ctypes.CDLL, products: list[tuple[int, int]], rows: int,
          max_rows: int) -> Callable[[], None]:  # fmt: skip
    """One layer's products at ``rows`` rows; the buffers are shared (their values do not
    matter to the time)."""
    sgemm = lib.cblas_sgemm
    sgemm.restype = None
    c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    sgemm.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, ptr, c_int, ptr, c_int,
                      c_float, ptr, c_int]  # fmt: skip
    buffers = _buffers(products, max_rows)

    def run() -> None:
        a, b, c = buffers
        for k, n in products:
            sgemm(ROW_MAJOR, NO_TRANS, TRANS, rows, n, k, 1.0, a, k, b, k, 0.0, c, n)

    return run


_Buffers = tuple["ctypes.Array[ctypes.c_float]", ...]
_shared: _Buffers | None = None


def _buffers(products: list[tuple[int, int]], rows: int) -> _Buffers:
    global _shared
    if _shared is None:
        widest = max(max(k, n) for k, n in products)
        weights = max(k * n for k, n in products)
        _shared = ((ctypes.c_float * (rows * widest))(), (ctypes.c_float * weights)(),
                   (ctypes.c_float * (rows * widest))())  # fmt: skip
    return _shared


def _time(run: Callable[[], None], repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return round((time.perf_counter() - started) * 1000 / repeats, 4)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
