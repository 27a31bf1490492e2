"""Benchmark the rerank tier against sentence-transformers' CrossEncoder on the same models.

    python bench/rerank.py                      # print the report
    python bench/rerank.py --rounds 5

No reranker weights reach this machine, so each model is built with random weights and its
real configuration (ms-marco-MiniLM-L-6-v2: BERT, 384 wide, 6 layers; bge-reranker-base:
XLM-RoBERTa, 768 wide, 12 layers; the MiniLM tokenizer for both): the compute is the real
models', the scores are not. Two workloads, one query with 100 passages of 20-120 words:

- **one request**: the time to rank 100 passages (p50 over rounds);
- **concurrent**: 4 clients each sending such requests for a fixed time: passages per second.

mlx-stack's rerank server runs as a real process and is called over HTTP (its own cost of
HTTP and JSON included); CrossEncoder runs in this process (torch on the CPU; ONNX Runtime
when ``optimum`` and ``onnxruntime`` are installed), called from 4 threads for the concurrent
workload. Rounds interleave the engines, the report gives medians, and names the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests" / "support"))
sys.path.insert(0, str(REPO))

from mlx_stack.ports import free_port  # noqa: E402

MODELS = {
    "ms-marco-MiniLM-L-6-v2 size": ("bert", {"width": 384, "layers": 6, "heads": 12,
                                             "inner": 1536}),
    "bge-reranker-base size": ("xlm_roberta", {"width": 768, "layers": 12, "heads": 12,
                                               "inner": 3072}),
}  # fmt: skip
QUERY = "how do I reduce the latency of an api endpoint"
PASSAGES = 100
CLIENTS = 4
CONCURRENT_SECONDS = 15.0

Ranker = Callable[[list[str]], None]


def passages(count: int = PASSAGES, seed: int = 11) -> list[str]:
    sys.path.insert(0, str(BENCH))
    import corpus

    words = " ".join(corpus.build(400, seed=seed)).split()
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        start = rng.randrange(len(words) - 130)
        out.append(" ".join(words[start : start + rng.randint(20, 120)]))
    return out


def cpu() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = re.search(r"Model name:\s*(.+)", text)
    flags = re.search(r"Flags:\s*(.+)", text)
    vector = sorted({f for f in (flags[1].split() if flags else ()) if f.startswith("avx")})
    return f"{name[1].strip() if name else platform.machine()} ({', '.join(vector) or 'no AVX'})"


def start_server(folder: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_stack.embeddings", "--model-path", str(folder),
         "--served-name", "bench-rerank", "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the rerank server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the rerank server did not become ready")


def http_ranker(url: str) -> Ranker:
    local = threading.local()  # one connection per client thread, kept alive

    def rank(docs: list[str]) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=300)
        answer = client.post(url + "/v1/rerank", json={"model": "bench-rerank",
                                                       "query": QUERY, "documents": docs})
        answer.raise_for_status()

    return rank


def cross_encoder_ranker(folder: Path, backend: str) -> Ranker:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(folder), device="cpu", backend=backend, max_length=512)
    lock = threading.Lock()  # one model instance: torch uses every core for each call

    def rank(docs: list[str]) -> None:
        with lock:
            model.predict([(QUERY, d) for d in docs], batch_size=32)

    return rank


def one_request(rank: Ranker, docs: list[str]) -> float:
    started = time.perf_counter()
    rank(docs)
    return time.perf_counter() - started


def concurrent(rank: Ranker, docs: list[str], seconds: float = CONCURRENT_SECONDS) -> float:
    """Passages per second ranked by CLIENTS threads sending requests back to back."""
    done = [0] * CLIENTS
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        while time.monotonic() < stop:
            rank(docs)
            done[i] += len(docs)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from tinyrerank import build_tiny_reranker

    docs = passages()
    print(f"CPU: {cpu()}; load average before: {os.getloadavg()[0]:.2f}; one query x "
          f"{PASSAGES} passages of 20-120 words; {CLIENTS} concurrent clients\n")
    print("| model (random weights) | engine | 100 passages, p50 | concurrent, passages/s |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for title, (architecture, sizes) in MODELS.items():
            folder = build_tiny_reranker(Path(tmp) / architecture, architecture, **sizes)
            server, url = start_server(folder, Path(tmp) / f"{architecture}.log")
            try:
                engines: dict[str, Ranker] = {"mlx-stack (HTTP)": http_ranker(url),
                                              "CrossEncoder torch": cross_encoder_ranker(
                                                  folder, "torch")}  # fmt: skip
                try:
                    engines["CrossEncoder ONNX Runtime"] = cross_encoder_ranker(folder, "onnx")
                except Exception as exc:  # optimum/onnxruntime missing: say so
                    print(f"<!-- ONNX Runtime peer unavailable: {type(exc).__name__} -->")
                for rank in engines.values():
                    rank(docs[:4])  # warm up
                times: dict[str, list[float]] = {name: [] for name in engines}
                for _ in range(args.rounds):
                    for name, rank in engines.items():
                        times[name].append(one_request(rank, docs))
                for name, rank in engines.items():
                    rate = concurrent(rank, docs)
                    p50 = statistics.median(times[name]) * 1000
                    print(f"| {title} | {name} | {p50:.0f} ms | {rate:.0f} |")
            finally:
                server.terminate()
                server.wait(30)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
