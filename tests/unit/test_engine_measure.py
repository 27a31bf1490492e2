"""``select.measure`` on a fake engine and a fake clock: a hopelessly slow pass is not
repeated (MLX's quantised CPU kernels: seconds a query), a normal one gets the full round."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from mlx_stack.embeddings.engine import select
from mlx_stack.embeddings.engine.choice import Timing


@dataclass
class _Encoded:
    ids: list[int]


@dataclass
class FakeEngine:
    """Each pass costs ``per_token_ms`` per token on a clock the test owns."""

    per_token_ms: float
    now: float = 0.0
    passes: list[tuple[int, int]] = field(default_factory=list)
    max_length: int = 512

    def encode(self, texts: Sequence[str]) -> list[_Encoded]:
        return [_Encoded([1, 2, 3, 4, 5, 6, 7, 8]) for _ in texts]

    def forward(self, sequences: Sequence[Sequence[int]]) -> None:
        self.passes.append((len(sequences), len(sequences[0])))
        self.now += self.per_token_ms * sum(len(s) for s in sequences) / 1000

    def clock(self) -> float:
        return self.now


def _measure(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> Timing:
    monkeypatch.setattr(select.time, "perf_counter", engine.clock)
    tokenizer: Any = engine
    return select.measure(engine.forward, tokenizer)


def test_a_normal_engine_gets_the_full_round(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine(per_token_ms=1.0)  # 8 ms a short query
    timing = _measure(engine, monkeypatch)
    assert timing == Timing(8.0, 256.0)
    assert engine.passes == [(1, 8)] * (1 + select.SHORT_RUNS) + [(8, 32)] * select.BATCH_RUNS


def test_a_hopeless_pass_is_not_repeated_and_the_batch_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FakeEngine(per_token_ms=600.0)  # 4.8 s a short query, as MLX's 4-bit kernels
    timing = _measure(engine, monkeypatch)
    assert engine.passes == [(1, 8)]
    assert timing == Timing(4800.0, 4800.0 * select.BATCH_SHAPE[0])
