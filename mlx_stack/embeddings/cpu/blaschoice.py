"""Choosing MLX's BLAS by measurement: the shapes, the rule, the cache key and the cache.

Which BLAS is faster depends on the CPU and the model: on an AMD EPYC (AVX2) OpenBLAS 0.3.15
beat MKL on a MiniLM short query (7.1 ms against 10.6 ms) while MKL won 256-row products; on an
Intel Xeon with AVX-512 MKL was ~35% faster. So each candidate library's ``cblas_sgemm`` is
timed on the model's own products (``blasmeasure.py``) and the result kept per (CPU model and
flags, core count, each library's path/size/mtime, the shapes, the thread settings). Pure
logic only here: standard library, no MLX, no library loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlx_stack.atomic import write_atomic

ENV_VAR = "MLX_STACK_BLAS"
"""An explicit library path, or ``none`` to keep the reference BLAS."""
BATCH_TOLERANCE = 1.5
"""As for the engine choice: the faster library on short queries is taken unless its batch
products take over this many times the other's."""
SHORT_ROWS = 8
"""A short query: ~8 tokens."""
BATCH_ROWS = 256
"""A batch: ~256 padded rows (fewer for wide models, see :data:`BATCH_FLOPS`)."""
BATCH_FLOPS = 4e9
"""A batch pass is kept under this many flops (~30 ms here) so a 7B chat model's shapes still
time within the start budget; its rows shrink, never below 32."""
MAX_WEIGHT_FLOATS = 1 << 26
"""One product's weight matrix is capped at 256 MB of float32 (its width is cut): the timing
child must not take a large model's memory."""
BUSY = 0.75
"""Load average per core above which a measurement is provisional (see ``BlasChoice.busy``)."""
CACHE_VERSION = 1
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KMP_BLOCKTIME",
              "OPENBLAS_CORETYPE", "MKL_DEBUG_CPU_TYPE", "MKL_ENABLE_INSTRUCTIONS")  # fmt: skip
"""Settings read by the libraries that change their speed: part of the cache key."""

log = logging.getLogger("mlx_stack.embeddings")


@dataclass(frozen=True)
class Shapes:
    """One layer's products as (K, N) weight shapes, and the row counts timed."""

    products: tuple[tuple[int, int], ...]
    short_rows: int = SHORT_ROWS
    batch_rows: int = BATCH_ROWS

    def describe(self) -> str:
        widths = ", ".join(f"{k}x{n}" for k, n in dict.fromkeys(self.products))
        return f"{widths} at {self.short_rows} and {self.batch_rows} rows"

    def as_json(self) -> dict[str, Any]:
        return {"products": [list(p) for p in self.products], "short_rows": self.short_rows,
                "batch_rows": self.batch_rows}  # fmt: skip


class ShapeError(ValueError):
    """config.json does not say the model's widths (the generic order is used instead)."""


def shapes_from_config(config: Mapping[str, Any]) -> Shapes:
    """A transformer layer's products from a Hugging Face ``config.json``.

    q, k, v, o, up, down; q/k/v widths from the head counts when given (grouped-query
    attention), else hidden x hidden. Handles ``text_config`` nesting and nomic_bert's GPT-2
    names (``n_embd``, ``n_inner``, ``n_head``).
    """
    if "hidden_size" not in config and "n_embd" not in config:
        nested = config.get("text_config")
        if isinstance(nested, Mapping):
            return shapes_from_config(nested)
    hidden = _positive(config, "hidden_size", "n_embd")
    inner = _positive(config, "intermediate_size", "n_inner", default=4 * hidden)
    heads = _positive(config, "num_attention_heads", "n_head", default=0)
    head_dim = _positive(config, "head_dim", default=hidden // heads if heads else 0)
    kv_heads = _positive(config, "num_key_value_heads", default=heads)
    q_width = heads * head_dim or hidden
    kv_width = kv_heads * head_dim or hidden
    products = [(hidden, q_width), (hidden, kv_width), (hidden, kv_width), (q_width, hidden),
                (hidden, inner), (inner, hidden)]  # fmt: skip
    products = [(k, min(n, MAX_WEIGHT_FLOATS // k)) for k, n in products]
    flops_per_row = 2 * sum(k * n for k, n in products)
    batch_rows = max(32, min(BATCH_ROWS, int(BATCH_FLOPS // flops_per_row)))
    return Shapes(tuple(products), SHORT_ROWS, batch_rows)


def shapes_of(folder: Path) -> Shapes:
    """The shapes of the model in ``folder``; :class:`ShapeError` says why not."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ShapeError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, Mapping):
        raise ShapeError(f"{path}: not a JSON object")
    try:
        return shapes_from_config(config)
    except ShapeError as exc:
        raise ShapeError(f"{path}: {exc}") from None


def _positive(config: Mapping[str, Any], *names: str, default: int | None = None) -> int:
    for name in names:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ShapeError(f"{name}={value!r} is not a positive integer")
        return value
    if default is None:
        raise ShapeError(f"no {' or '.join(names)}")
    return default


@dataclass(frozen=True)
class Candidate:
    """A library file, identified as the cache sees it: a new build means a new measurement."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str) -> Candidate | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(path, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class LibTiming:
    """One library's median milliseconds for a layer's products at the short and batch rows."""

    name: str
    short_ms: float
    batch_ms: float


@dataclass(frozen=True)
class BlasChoice:
    """The library chosen (``path`` ``None``: none), why, and the measurements behind it."""

    path: str | None
    name: str
    reason: str
    measured: Mapping[str, LibTiming] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    cached: bool = False
    key: str | None = None
    shapes: str = ""
    busy: float | None = None
    """The 1-minute load average per core when measured: above :data:`BUSY` the figures are
    provisional (a busy moment can flip a close call) and a quieter start measures again."""

    def card(self) -> dict[str, Any]:
        """What ``/v1/models`` shows under ``blas_choice`` (keys like ``engine_choice``)."""
        measured = {path: {"name": t.name, "short_ms": t.short_ms, "batch_ms": t.batch_ms}
                    for path, t in self.measured.items()}  # fmt: skip
        return {
            "library": self.name,
            "path": self.path,
            "reason": self.reason,
            "measured_ms": measured,
            "skipped": dict(self.skipped),
            "shapes": self.shapes,
            "from_cache": self.cached,
            "key": self.key,
            "load_per_core": self.busy,
        }


def decide(measured: Mapping[str, LibTiming], shapes: Shapes,
           tolerance: float = BATCH_TOLERANCE) -> BlasChoice:  # fmt: skip
    """The fastest library on the short rows, unless its batch rows take > ``tolerance`` x the
    best batch. ``measured`` is keyed by path."""
    if not measured:
        raise ValueError("nothing measured")
    by_short = sorted(measured, key=lambda path: measured[path].short_ms)
    best_batch = min(t.batch_ms for t in measured.values())
    chosen = next(p for p in by_short if measured[p].batch_ms <= tolerance * best_batch)
    timing = measured[chosen]
    others = [measured[p] for p in by_short if p != chosen]
    if chosen == by_short[0]:
        versus = " vs ".join(f"{t.name} {t.short_ms:.2f} ms" for t in others)
        reason = (f"measured {timing.short_ms:.2f} ms{' vs ' + versus if versus else ''} "
                  f"on this model's {shapes.short_rows}-row products")  # fmt: skip
    else:
        first = measured[by_short[0]]
        reason = (f"{first.name} was faster on this model's {shapes.short_rows}-row products "
                  f"({first.short_ms:.2f} vs {timing.short_ms:.2f} ms) but took "
                  f"{first.batch_ms:.1f} ms against {timing.batch_ms:.1f} ms on "
                  f"{shapes.batch_rows}-row ones (over {tolerance:g}x)")  # fmt: skip
    return BlasChoice(chosen, timing.name, reason, dict(measured), shapes=shapes.describe())


@dataclass(frozen=True)
class Host:
    """What a measurement depends on besides the libraries and the shapes."""

    cpu: str
    flags: tuple[str, ...]
    cores: int
    threads: Mapping[str, str] = field(default_factory=dict)
    load: float = 0.0
    """The 1-minute load average per core now; not part of the cache key."""

    @classmethod
    def here(cls, env: Mapping[str, str]) -> Host:
        from ..engine.choice import Machine

        machine = Machine.from_host({})
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0] / cores
        except OSError:
            load = 0.0
        return cls(machine.cpu, machine.flags, cores,
                   {name: env[name] for name in THREAD_ENV if name in env}, load)  # fmt: skip

    def describe(self) -> str:
        return f"{self.cpu} ({'/'.join(self.flags) or 'no vector flags read'}), {self.cores} cores"


def choice_key(host: Host, candidates: Sequence[Candidate], shapes: Shapes) -> str:
    """One key per (CPU model, flags, cores, thread settings, libraries, shapes)."""
    text = json.dumps({"v": CACHE_VERSION, "cpu": host.cpu, "flags": list(host.flags),
                       "cores": host.cores, "threads": dict(host.threads),
                       "libraries": [[c.path, c.size, c.mtime_ns] for c in candidates],
                       "shapes": shapes.as_json()}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class BlasCache:
    """Measured choices as JSON files in a private folder; ``None`` folder: no cache."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def read(self, key: str) -> BlasChoice | None:
        """The stored choice, or ``None`` if absent or unreadable (then it is measured anew)."""
        if self.folder is None:
            return None
        path = self.folder / f"{key}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            measured = {str(p): LibTiming(str(t["name"]), float(t["short_ms"]),
                                          float(t["batch_ms"]))
                        for p, t in data["measured_ms"].items()}  # fmt: skip
            chosen = str(data["path"])
            if chosen not in measured:
                raise ValueError(f"the chosen {chosen} was not measured")
            busy = data.get("load_per_core")
            return BlasChoice(chosen, str(data["library"]), str(data["reason"]), measured,
                              {str(p): str(r) for p, r in data.get("skipped", {}).items()},
                              cached=True, key=key, shapes=str(data.get("shapes", "")),
                              busy=None if busy is None else float(busy))  # fmt: skip
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError,
                AttributeError) as exc:  # fmt: skip
            log.warning("ignoring the BLAS choice cached in %s (%s): measuring again", path, exc)
            return None

    def write(self, choice: BlasChoice, host: Host) -> None:
        """Store atomically; a failure costs only a measurement at the next start."""
        if self.folder is None or choice.key is None:
            return
        data = {**choice.card(), "cpu": host.describe()}
        try:
            write_atomic(self.folder / f"{choice.key}.json", json.dumps(data, indent=1) + "\n")
        except OSError as exc:
            log.warning("cannot cache the BLAS choice in %s: %s", self.folder, exc)

    def entries(self) -> list[dict[str, Any]]:
        """Every stored choice (for ``mlx-stack doctor``), newest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime,
                           reverse=True):  # fmt: skip
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if isinstance(data, dict):
                found.append(data)
        return found


@dataclass
class Measurement:
    """Medians per library path, and why the others were skipped (``blasmeasure.measure``)."""

    timings: dict[str, LibTiming] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    rounds: int = 0


Timer = Callable[[list[str], Shapes], Measurement]


def remeasure(cached: BlasChoice, host: Host) -> bool:
    """A choice measured on a busy machine is measured again at the first quiet start: on 2
    cores under load a library's timings swung 2-4x and one such start picked MKL (7.49 vs
    10.92 ms) where quiet runs pick OpenBLAS (2.55 vs 3.06 ms), and kept it."""
    return cached.busy is not None and cached.busy > BUSY and host.load <= BUSY


def choose_library(model: Path | None, explicit: str, found: Sequence[Candidate], host: Host,
                   cache: BlasCache, timer: Timer) -> BlasChoice:  # fmt: skip
    """The rules in order: ``MLX_STACK_BLAS``, none or one found, no readable shapes (the
    generic order: ``found``'s), the cache, a measurement (``timer``; then cached)."""
    if explicit:
        return BlasChoice(explicit, explicit, f"{ENV_VAR} set")
    paths = [c.path for c in found]
    generic = BlasChoice(paths[0] if paths else None, label(paths[0]) if paths else "none",
                         "generic order")  # fmt: skip
    if len(found) <= 1:
        return replace(generic, reason="only one found" if found else "none found")
    if model is None:
        return replace(generic, reason="generic order (no model folder to measure on)")
    try:
        shapes = shapes_of(Path(model))
    except ShapeError as exc:
        return replace(generic, reason=f"generic order ({exc})")
    key = choice_key(host, found, shapes)
    cached = cache.read(key)
    if cached is not None and cached.path in paths and not remeasure(cached, host):
        return cached
    if cached is not None and cached.busy is not None:
        log.info("BLAS: measuring again: the cached choice was measured at load %.2f per core, "
                 "now %.2f", cached.busy, host.load)  # fmt: skip
    result = timer(paths, shapes)
    if not result.timings:
        why = "; ".join(f"{label(p)}: {r}" for p, r in result.skipped.items())
        return replace(generic, reason=f"generic order (no library could be timed: {why})",
                       skipped=dict(result.skipped))  # fmt: skip
    choice = replace(decide(result.timings, shapes), skipped=dict(result.skipped), key=key,
                     busy=round(host.load, 2))  # fmt: skip
    log.info("BLAS: %s for %s (%s; %d rounds in %.1f s on %s)", choice.name, model,
             choice.reason, result.rounds, result.seconds, host.describe())  # fmt: skip
    cache.write(choice, host)
    return choice


def label(path: str) -> str:
    """A library's family from its file name (before it is loaded and asked its version)."""
    name = Path(path).name
    return "MKL" if "mkl" in name else "OpenBLAS" if "openblas" in name else name
