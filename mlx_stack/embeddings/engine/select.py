"""Load the encoder with the engine chosen for this model on this machine.

On a CPU, for a model both engines can run, the first start loads both, times each on the
model's real shapes (one short query, and a batch of the server's typical size), keeps the
winner (``choice.decide``), drops the other and caches the result, so later starts load one
engine only. The measurement is bounded: three rounds, each engine in turn, of six short
passes and one batch (~1 s for MiniLM on 2 cores when quiet, within the ~3 s budget), or one
slow round when an engine is clearly faster (:data:`SLOW_ROUND_MS`), as ONNX is for the 0.6B
decoder.
"""

from __future__ import annotations

import gc
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..cpu import blas
from ..model.settings import ModelSettings
from .choice import (
    ChoiceCache,
    Engine,
    EngineChoice,
    EngineMode,
    Machine,
    Timing,
    choice_key,
    decide,
    plan,
)

log = logging.getLogger("mlx_stack.embeddings")

ROUNDS = 3
"""The engines are timed in turn, round after round, so a busy moment hits both alike."""
SHORT_RUNS = 5
BATCH_RUNS = 1
BATCH_SHAPE = (8, 32)
"""A batch of 8 texts of 32 tokens: what the batcher gathers under light load. Bigger batches
made the first start's timing too long on a busy 2-core machine (16 x 32: 7 s at load 3)."""
MEASURE_TEXT = "how do I reset my password"
SLOW_PASS_MS = 2000.0
"""A warm-up pass of one short query slower than this is not timed further: that pass is the
short timing, and the batch is estimated as :data:`BATCH_SHAPE`'s rows times it, not run.
MLX's CPU kernels for quantised products took ~5 s a short query for EmbeddingGemma-300M
4-bit and over 10 s for Qwen3-Embedding-0.6B 4-bit (2-core AMD EPYC): a full round would
keep the first start busy for minutes. The estimate is low for such a kernel (a batch of
8 x 32 tokens costs more than 8 short passes), so it favours the slow engine, if anything."""
CLEAR_MARGIN = 3.0
SLOW_ROUND_MS = 5000.0
"""A round that costs over :data:`SLOW_ROUND_MS` (from its own timings) and in which one
engine is :data:`CLEAR_MARGIN` times faster on the short query and also faster on the batch
(medians so far) ends the measurement: a round of Qwen3-Embedding-0.6B costs ~13 s on 2 cores
(measured: ONNX 154 ms short / 3.3 s batch, MLX 611 ms / 4.9 s; three rounds were 40 s). Cheap
rounds (MiniLM's ~0.5 s) always run three, so one busy moment cannot decide."""


def versions() -> dict[str, str]:
    """Library versions a measurement depends on (and the BLAS MLX got)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"blas": blas.preload().name}
    for package in ("mlx", "onnxruntime", "mlx-stack"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def load_encoder(settings: ModelSettings, content_sha256: str, mode: EngineMode,
                 fast_kernels: bool = True) -> Any:  # fmt: skip
    """The loaded encoder (``engine_choice`` set on it) for ``settings``."""
    from ..cpu.kernels import private_cache_dir
    from .onnxencoder import onnx_problem

    machine = Machine.from_host(versions())
    return choose_and_load(
        mode, machine, onnx_problem(settings), content_sha256,
        ChoiceCache(private_cache_dir("engine")[0]),
        lambda engine: _load(engine, settings, content_sha256, fast_kernels),
        lambda encoder: measure(encoder.forward, encoder.tokenizer),
    )  # fmt: skip


def choose_and_load(mode: EngineMode, machine: Machine, onnx_problem: str | None,
                    content_sha256: str, cache: ChoiceCache, load: Callable[[Engine], Any],
                    timing: Callable[[Any], Timing]) -> Any:  # fmt: skip
    """The rules in order: forced/Metal/unsupported (no measurement), the cache, a measurement.

    ``load`` loads one engine's encoder; ``timing`` measures a loaded one. On a measurement
    both are loaded, the loser is dropped and the choice is cached. Under ``auto``, an ONNX
    engine that fails to load (a checkpoint the builder cannot read, an ONNX Runtime error)
    leaves the model on MLX, saying why; a forced one fails the load.
    """
    fixed = plan(mode, machine, onnx_problem)
    if fixed is not None:
        encoder = load(fixed.engine)
        encoder.engine_choice = fixed
        return encoder
    key = choice_key(content_sha256, machine)
    cached = cache.read(key)
    if cached is not None:
        encoder = _load_or_mlx(load, cached.engine)
        encoder.engine_choice = encoder.engine_choice or cached
        return encoder
    started = time.monotonic()
    encoders = {"mlx": load("mlx")}
    onnx = _load_or_mlx(load, "onnx", mlx=encoders["mlx"])
    if onnx is encoders["mlx"]:
        cache.release(key)  # nothing measured: a waiting replica goes on
        return onnx
    encoders["onnx"] = onnx
    timed = time.monotonic()
    rounds: dict[str, list[Timing]] = {engine: [] for engine in encoders}
    for _ in range(ROUNDS):
        for engine, encoder in encoders.items():
            rounds[engine].append(timing(encoder))
        if settled(medians(rounds), {engine: times[-1] for engine, times in rounds.items()}):
            break
    measured = medians(rounds)
    decided = decide(measured)
    choice = EngineChoice(decided.engine, decided.reason, decided.measured, key=key)
    log.info("engine: %s (%s; both loaded in %.1f s, timed in %.1f s on %s)",
             choice.engine, choice.reason, timed - started, time.monotonic() - timed,
             machine.describe())  # fmt: skip
    cache.write(choice, machine, content_sha256)
    chosen = encoders.pop(choice.engine)
    encoders.clear()
    _release_memory()
    chosen.engine_choice = choice
    chosen.load_seconds = time.monotonic() - started  # both loads and the measurement
    return chosen


def medians(rounds: dict[str, list[Timing]]) -> dict[str, Timing]:
    return {engine: Timing(round(statistics.median(t.short_ms for t in times), 3),
                           round(statistics.median(t.batch_ms for t in times), 3))
            for engine, times in rounds.items()}  # fmt: skip


def settled(measured: dict[str, Timing], last_round: dict[str, Timing]) -> bool:
    """A slow round, and one engine :data:`CLEAR_MARGIN` times faster than every other on the
    short query and faster on the batch (``decide`` tolerates a batch up to 1.5x slower)."""
    cost = sum(t.short_ms * (SHORT_RUNS + 1) + t.batch_ms * BATCH_RUNS
               for t in last_round.values())  # fmt: skip
    if cost < SLOW_ROUND_MS:
        return False
    for name, timing in measured.items():
        others = [t for other, t in measured.items() if other != name]
        if others and all(timing.short_ms * CLEAR_MARGIN <= t.short_ms
                          and timing.batch_ms <= t.batch_ms
                          for t in others):  # fmt: skip
            return True
    return False


def _release_memory() -> None:
    """Free the losing engine's arrays, and MLX's cache of freed buffers with them."""
    gc.collect()
    core = sys.modules.get("mlx.core")
    clear = getattr(core, "clear_cache", None)
    if clear is not None:
        clear()


def _load_or_mlx(load: Callable[[Engine], Any], engine: Engine, mlx: Any = None) -> Any:
    """``engine``'s encoder; if ONNX fails to load, the MLX one with the reason as its choice
    (``engine_choice`` stays ``None`` on success, for the caller to set)."""
    try:
        encoder = load(engine)
    except Exception as exc:
        if engine != "onnx":
            raise
        log.warning("the ONNX engine failed to load (%s: %s): serving with MLX",
                    type(exc).__name__, exc)  # fmt: skip
        encoder = mlx if mlx is not None else load("mlx")
        encoder.engine_choice = EngineChoice(
            "mlx", f"the ONNX engine failed to load: {type(exc).__name__}: {exc}")
        return encoder
    encoder.engine_choice = None
    return encoder


def measure(forward: Callable[[Sequence[Sequence[int]]], Any], tokenizer: Any) -> Timing:
    """One round: median ms of short queries (after a warm pass), then one batch."""
    short = tokenizer.encode([MEASURE_TEXT])[0].ids
    rows, length = BATCH_SHAPE
    length = min(length, getattr(tokenizer, "max_length", length))
    filler = (short * length)[:length]
    batch = [filler] * rows
    warm = _median_ms(forward, [short], 1)
    if warm > SLOW_PASS_MS:
        log.info("engine measurement: one short query took %.0f ms; the batch is estimated "
                 "as %d x that, not run", warm, rows)  # fmt: skip
        return Timing(warm, round(warm * rows, 3))
    return Timing(_median_ms(forward, [short], SHORT_RUNS), _median_ms(forward, batch, BATCH_RUNS))


def _median_ms(forward: Callable[[Sequence[Sequence[int]]], Any],
               sequences: Sequence[Sequence[int]], runs: int) -> float:  # fmt: skip
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        forward(sequences)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def _load(engine: str, settings: ModelSettings, content_sha256: str, fast_kernels: bool) -> Any:
    if engine == "onnx":
        from ..cpu.kernels import private_cache_dir
        from .onnxencoder import OnnxEncoder

        return OnnxEncoder.load(settings, content_sha256, private_cache_dir("onnx")[0])
    from ..model.encoder import TextEncoder

    return TextEncoder.load(settings, fast_kernels=fast_kernels)
