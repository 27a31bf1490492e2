"""Prometheus text exposition (format 0.0.4) for ``GET /metrics``, without a client library.

A few counters, gauges and histograms, updated on the event loop thread only (the batcher's
pass reports arrive there too), so no locks. Names are prefixed ``mlx_embeddings_``; the
process's resident memory uses the conventional ``process_resident_memory_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import psutil

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)

Labels = tuple[tuple[str, str], ...]


@dataclass
class Counter:
    name: str
    help: str
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def lines(self) -> Iterable[str]:
        yield from _header(self.name, self.help, "counter")
        for labels, value in sorted(self.values.items()) or [((), 0.0)]:
            yield f"{self.name}{_labels(labels)} {_number(value)}"


@dataclass
class Gauge:
    name: str
    help: str
    read: Callable[[], float]

    def lines(self) -> Iterable[str]:
        yield from _header(self.name, self.help, "gauge")
        yield f"{self.name} {_number(self.read())}"


@dataclass
class Histogram:
    name: str
    help: str
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    observations: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.observations += 1

    def lines(self) -> Iterable[str]:
        yield from _header(self.name, self.help, "histogram")
        for bound, count in zip(self.buckets, self.counts, strict=True):
            yield f'{self.name}_bucket{{le="{_number(bound)}"}} {count}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.observations}'
        yield f"{self.name}_sum {_number(self.total)}"
        yield f"{self.name}_count {self.observations}"


class ServerMetrics:
    """Every metric the server exports; gauges read live values through callables."""

    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        p = "mlx_embeddings_"
        self.requests = Counter(p + "requests_total", "Embedding requests by HTTP status.")
        self.errors = Counter(p + "errors_total", "Failed embedding requests by error type.")
        self.refused = Counter(
            p + "refused_total", "Requests and connections refused before any route, by reason."
        )
        self.texts = Counter(p + "texts_total", "Inputs embedded.")
        self.tokens = Counter(p + "tokens_total", "Tokens embedded (after truncation).")
        self.truncated = Counter(p + "truncated_inputs_total", "Inputs cut to the maximum length.")
        self.latency = Histogram(
            p + "request_duration_seconds", "Embedding request latency.", LATENCY_BUCKETS
        )
        self.batch_rows = Histogram(p + "batch_size", "Texts per forward pass.", BATCH_SIZE_BUCKETS)
        self.batch_tokens = Histogram(
            p + "batch_padded_tokens", "Padded tokens per forward pass.", BATCH_TOKEN_BUCKETS
        )
        self.pass_seconds = Histogram(
            p + "forward_pass_seconds", "Duration of one forward pass.", LATENCY_BUCKETS
        )
        self.gauges = [
            Gauge(p + "queue_depth", "Texts waiting for a forward pass.", queue_depth),
            Gauge(p + "requests_in_flight", "Requests admitted, not yet answered.", in_flight),
            Gauge("process_resident_memory_bytes", "Resident memory of this process.", _rss),
            Gauge(p + "peak_resident_memory_bytes", "Peak resident memory so far.", _peak_rss),
        ]

    def render(self, info: dict[str, str]) -> str:
        metrics = [
            self.requests,
            self.errors,
            self.refused,
            self.texts,
            self.tokens,
            self.truncated,
            self.latency,
            self.batch_rows,
            self.batch_tokens,
            self.pass_seconds,
            *self.gauges,
        ]
        lines = [*_header("mlx_embeddings_model_info", "The model served.", "gauge")]
        lines.append(f"mlx_embeddings_model_info{_labels(tuple(sorted(info.items())))} 1")
        for metric in metrics:
            lines.extend(metric.lines())
        return "\n".join(lines) + "\n"


def _header(name: str, text: str, kind: str) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def _rss() -> float:
    return float(psutil.Process().memory_info().rss)


def _peak_rss() -> float:
    """Linux/macOS high-water mark (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)
