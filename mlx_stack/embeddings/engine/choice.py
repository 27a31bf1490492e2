"""Choosing the encoder's engine: the rules, as pure functions, and the cache of measurements.

MLX is the engine on Apple Silicon (Metal) and wherever ONNX Runtime cannot run the model. On
a CPU, MLX's small matrix products cost more than ONNX Runtime's (measured on an AMD EPYC with
AVX2: a short MiniLM query 7-10 ms against ~3-4 ms), but which wins depends on the CPU, its
BLAS and the library versions, so on first start both are timed on the model's own shapes and
the result is kept per (model content, CPU model and flags, library versions). Later starts
read it back. ``--engine`` / ``MLX_STACK_ENGINE`` force one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlx_stack.atomic import write_atomic

Engine = Literal["mlx", "onnx"]
EngineMode = Literal["auto", "mlx", "onnx"]
ENGINES: tuple[Engine, ...] = ("mlx", "onnx")
ENGINE_MODES: tuple[EngineMode, ...] = ("auto", "mlx", "onnx")
ENGINE_ENV = "MLX_STACK_ENGINE"
"""``auto`` (default), ``mlx`` or ``onnx``: what ``--engine`` says, for a whole stack."""

BATCH_TOLERANCE = 1.5
"""The faster engine on a short query is taken unless its batch takes over this many times the
other's: the latency target comes first, but not at any throughput cost."""

CACHE_VERSION = 1
LOCK_WAIT_S = 180.0
"""How long a replica waits for another measuring the same key (both engines' loads and
timing: seconds for MiniLM, about a minute for a 0.6B model on 2 cores) before measuring too."""
LOCK_POLL_S = 0.05
_FLAGS_THAT_MATTER = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                      "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "neon", "asimd",
                      "sve")  # fmt: skip

log = logging.getLogger("mlx_stack.embeddings")


class EngineError(ValueError):
    """A forced engine cannot serve this model (the message says why and what to do)."""


@dataclass(frozen=True)
class Timing:
    """Median milliseconds of one forward pass: a short query, and a batch."""

    short_ms: float
    batch_ms: float


@dataclass(frozen=True)
class Machine:
    """What a measurement depends on besides the model."""

    cpu: str
    flags: tuple[str, ...]
    metal: bool
    versions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_host(cls, versions: Mapping[str, str]) -> Machine:
        cpu, flags = _cpu_model_and_flags()
        metal = sys.platform == "darwin" and platform.machine() == "arm64"
        return cls(cpu, flags, metal, dict(versions))

    def describe(self) -> str:
        flags = "/".join(self.flags) or "no vector flags read"
        return f"{self.cpu} ({flags})"


@dataclass(frozen=True)
class EngineChoice:
    """The engine serving the model, why, and the measurements behind it (if any)."""

    engine: Engine
    reason: str
    measured: Mapping[str, Timing] = field(default_factory=dict)
    cached: bool = False
    key: str | None = None

    def card(self) -> dict[str, Any]:
        """What ``/v1/models`` shows under ``engine_choice``."""
        return {
            "engine": self.engine,
            "reason": self.reason,
            "measured_ms": {name: asdict(t) for name, t in self.measured.items()},
            "from_cache": self.cached,
            "key": self.key,
        }


def plan(mode: EngineMode, machine: Machine, onnx_problem: str | None) -> EngineChoice | None:
    """The engine when no measurement is needed, else ``None`` (measure, or read the cache).

    ``onnx_problem`` is why the ONNX engine cannot serve this model, or ``None`` if it can.
    Raises :class:`EngineError` when ``onnx`` is forced but cannot serve it.
    """
    if mode == "onnx" and onnx_problem is not None:
        raise EngineError(f"--engine onnx: the ONNX engine cannot serve this model: "
                          f"{onnx_problem}; use --engine mlx or auto")  # fmt: skip
    if mode == "mlx":
        return EngineChoice("mlx", "forced (--engine mlx or MLX_STACK_ENGINE=mlx)")
    if mode == "onnx":
        return EngineChoice("onnx", "forced (--engine onnx or MLX_STACK_ENGINE=onnx)")
    if machine.metal:
        return EngineChoice("mlx", "Apple Silicon: MLX runs on the GPU (Metal)")
    if onnx_problem is not None:
        return EngineChoice("mlx", f"the ONNX engine cannot serve this model: {onnx_problem}")
    return None


def decide(measured: Mapping[str, Timing], tolerance: float = BATCH_TOLERANCE) -> EngineChoice:
    """The fastest engine on a short query, unless it loses badly on a batch."""
    if not measured:
        raise ValueError("nothing measured")
    by_short = sorted(measured, key=lambda name: measured[name].short_ms)
    best_batch = min(t.batch_ms for t in measured.values())
    for name in by_short:
        timing = measured[name]
        if timing.batch_ms <= tolerance * best_batch:
            others = ", ".join(f"{other} {measured[other].short_ms:.1f} ms"
                               for other in by_short if other != name)  # fmt: skip
            reason = (f"measured fastest on a short query ({timing.short_ms:.1f} ms"
                      f"{'; ' + others if others else ''})")  # fmt: skip
            if name != by_short[0]:
                first = by_short[0]
                reason = (f"{first} was faster on a short query but its batch took "
                          f"{measured[first].batch_ms:.0f} ms against {timing.batch_ms:.0f} ms "
                          f"(over {tolerance:g}x)")  # fmt: skip
            return EngineChoice(_engine(name), reason, dict(measured))
    raise AssertionError("the best batch always passes")  # pragma: no cover


def choice_key(content_sha256: str, machine: Machine) -> str:
    """One key per (model content, CPU, flags, library versions)."""
    text = json.dumps({"v": CACHE_VERSION, "model": content_sha256, "cpu": machine.cpu,
                       "flags": list(machine.flags), "versions": dict(machine.versions)},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ChoiceCache:
    """Measured choices as JSON files in a private folder; ``None`` folder: no cache.

    Replicas of one model start together: without care each would time both engines (each
    slowed by the others) and the last to finish would overwrite the rest. So a miss is
    claimed: :meth:`read` takes an exclusive ``flock`` on ``<key>.lock`` next to the entry,
    waiting up to ``wait_s`` for a replica that holds it, and reads again; it returns ``None``
    (measure) with the lock still held, which :meth:`write` or :meth:`release` (or the
    process's exit) gives up. A waiter past ``wait_s`` measures by itself, as before.
    """

    def __init__(self, folder: Path | None, wait_s: float = LOCK_WAIT_S) -> None:
        self.folder = folder
        self.wait_s = wait_s
        self._held: dict[str, int] = {}

    def read(self, key: str) -> EngineChoice | None:
        """The stored choice, or ``None`` if absent or unreadable: then this caller measures,
        holding the key's lock until :meth:`write` or :meth:`release`."""
        found = self._read(key)
        if found is not None or self.folder is None:
            return found
        lock = _claim(self.folder / f"{key}.lock", self.wait_s)
        found = self._read(key)  # measured by another replica while this one waited
        if found is not None or lock is None:
            if lock is not None:
                os.close(lock)
            return found
        self._held[key] = lock
        return None

    def release(self, key: str) -> None:
        """Give up the claim on ``key`` (nothing to store): a waiting replica measures."""
        lock = self._held.pop(key, None)
        if lock is not None:
            os.close(lock)  # closing the descriptor drops its flock

    def _read(self, key: str) -> EngineChoice | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            measured = {str(n): Timing(float(t["short_ms"]), float(t["batch_ms"]))
                        for n, t in data["measured"].items()}  # fmt: skip
            return EngineChoice(_engine(data["engine"]), str(data["reason"]), measured,
                                cached=True, key=key)  # fmt: skip
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring the engine choice cached in %s (%s): measuring again", path, exc)
            return None

    def write(self, choice: EngineChoice, machine: Machine, model: str = "") -> None:
        """Store atomically; a failure costs only a measurement at the next start."""
        if self.folder is None or choice.key is None:
            return
        data = {**choice.card(), "cpu": machine.describe(), "versions": dict(machine.versions),
                "content_sha256": model}  # fmt: skip
        data["measured"] = data.pop("measured_ms")
        try:
            write_atomic(self.folder / f"{choice.key}.json", json.dumps(data, indent=1) + "\n")
        except OSError as exc:
            log.warning("cannot cache the engine choice in %s: %s", self.folder, exc)
        finally:
            self.release(choice.key)

    def entries(self) -> list[dict[str, Any]]:
        """Every stored choice (for ``mlx-stack doctor``), newest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        files = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        found = []
        for path in files:
            try:
                found.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return found


def _claim(path: Path, wait_s: float) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``path``, or ``None`` after
    ``wait_s`` (or if the lock file cannot be made: then no one waits for this one)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.warning("cannot lock %s (%s): measuring without waiting for other replicas", path, exc)
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return descriptor
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(descriptor)
                log.warning("another replica has been measuring the engines for over %.0f s "
                            "(%s): measuring here too", wait_s, path)  # fmt: skip
                return None
            time.sleep(LOCK_POLL_S)
        except OSError as exc:
            os.close(descriptor)
            log.warning("cannot lock %s (%s): measuring without waiting", path, exc)
            return None


def summary(mode: EngineMode, machine: Machine, onnxruntime: str,
            entries: list[dict[str, Any]]) -> tuple[bool, str, str]:  # fmt: skip
    """For ``mlx-stack doctor``: (all well, what the embeddings server will run, a fix)."""
    if machine.metal and mode != "onnx":
        return True, "MLX (Apple Silicon: Metal)", ""
    if mode != "auto":
        return True, f"{mode}, forced by {ENGINE_ENV}", ""
    if onnxruntime == "absent":
        return (False, "MLX only: onnxruntime is not installed, so no ONNX Runtime engine to "
                "measure against (on this CPU it answered a short query ~3x faster)",
                "pip install onnxruntime onnx")  # fmt: skip
    if not entries:
        return True, ("auto: both engines are timed at the first start of each bert/xlm_roberta "
                      "model and the winner cached; nothing measured yet"), ""  # fmt: skip
    last = entries[0]
    times = ", ".join(f"{name} {t.get('short_ms', 0):.1f} ms"
                      for name, t in last.get("measured", {}).items())  # fmt: skip
    model = str(last.get("content_sha256", ""))[:12] or "?"
    return True, (f"auto: last measured {last.get('engine')} for model {model} on "
                  f"{last.get('cpu', '?')} (short query: {times}); "
                  f"{len(entries)} measurement(s) cached"), ""  # fmt: skip


def mode_from(value: str | None, env: Mapping[str, str] | None = None) -> EngineMode:
    """``--engine`` if given, else ``MLX_STACK_ENGINE``, else ``auto``; bad values raise."""
    env = os.environ if env is None else env
    raw = value if value is not None else env.get(ENGINE_ENV, "auto")
    text = raw.strip().lower() or "auto"
    if text not in ENGINE_MODES:
        source = "--engine" if value is not None else ENGINE_ENV
        raise EngineError(f"{source}={raw!r}: use one of {', '.join(ENGINE_MODES)}")
    return text  # type: ignore[return-value]


def _engine(name: str) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}")
    return name  # type: ignore[return-value]


def _cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                name, _, value = line.partition(":")
                if name.strip() == "model name" and value.strip():
                    model = value.strip()
                elif name.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, tuple(f for f in _FLAGS_THAT_MATTER if f in flags)
