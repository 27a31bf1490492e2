"""The batcher's cost model: derived from the engine choice's measurement, and what it decides."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from mlx_stack.embeddings.engine.choice import EngineChoice, Timing
from mlx_stack.embeddings.engine.select import BATCH_SHAPE, MEASURE_TEXT
from mlx_stack.embeddings.serving.batcher import (
    DEFAULT_COST,
    MAX_PASS_OVERHEAD_TOKENS,
    Batcher,
    BatchPolicy,
    CostModel,
    plan_passes,
)
from mlx_stack.embeddings.serving.service import cost_model


def timings_of(per_token_ms: float, pass_tokens: float, short_tokens: int = 8,
               shape: tuple[int, int] = (8, 32)) -> tuple[float, float]:  # fmt: skip
    """What an engine with these true costs would measure (short query, batch)."""
    model = CostModel(pass_tokens=pass_tokens)
    return (per_token_ms * (pass_tokens + model.work(1, short_tokens)),
            per_token_ms * (pass_tokens + model.work(*shape)))  # fmt: skip


@pytest.mark.parametrize(("per_token_ms", "pass_tokens"),
                         [(0.05, 80.0), (0.02, 5.0), (4.0, 300.0), (0.1, 0.0)])  # fmt: skip
def test_the_pass_overhead_is_recovered_from_the_two_timings(per_token_ms: float,
                                                             pass_tokens: float) -> None:
    short_ms, batch_ms = timings_of(per_token_ms, pass_tokens)
    derived = CostModel.from_timing(short_ms, 8, batch_ms, (8, 32))
    assert derived.pass_tokens == pytest.approx(pass_tokens, abs=0.1)
    assert (derived.row_tokens, derived.span) == (DEFAULT_COST.row_tokens, DEFAULT_COST.span)
    assert "derived from the engine measurement" in derived.source


@pytest.mark.parametrize(("short_ms", "batch_ms"), [(10.0, 10.0), (10.0, 5.0), (0.0, 5.0),
                                                    (-1.0, 5.0)])  # fmt: skip
def test_timings_that_cannot_be_pass_costs_keep_the_defaults(short_ms: float,
                                                             batch_ms: float) -> None:
    assert CostModel.from_timing(short_ms, 8, batch_ms, (8, 32)) == DEFAULT_COST


def test_the_derived_overhead_is_bounded() -> None:
    # a short pass nearly as dear as the batch: an absurd overhead, capped
    assert CostModel.from_timing(99.9, 8, 100.0, (8, 32)).pass_tokens == MAX_PASS_OVERHEAD_TOKENS
    # a short pass cheaper than its tokens' share of the batch: no negative overhead
    assert CostModel.from_timing(0.001, 8, 100.0, (8, 32)).pass_tokens == 0.0


def test_a_cheap_pass_splits_lengths_the_default_merges() -> None:
    """ONNX Runtime's fixed cost per pass is small: alike-but-unequal lengths get their own
    passes rather than padding, where MLX's model pays the padding to save a pass."""
    lengths = [8] * 4 + [12] * 4
    assert [len(p) for p in plan_passes(lengths, 2048)] == [8]
    cheap = CostModel(pass_tokens=0.0)
    assert sorted(len(p) for p in plan_passes(lengths, 2048, cheap)) == [4, 4]


def test_a_dear_pass_merges_lengths_the_default_splits() -> None:
    """A 0.6B model streams all its weights per pass: padding short texts to the long ones'
    length is cheaper than a second pass."""
    lengths = [8] * 4 + [60] * 4
    assert sorted(len(p) for p in plan_passes(lengths, 2048)) == [4, 4]
    dear = CostModel(pass_tokens=400.0)
    assert [len(p) for p in plan_passes(lengths, 2048, dear)] == [8]


def test_the_budget_still_bounds_a_dear_pass() -> None:
    dear = CostModel(pass_tokens=MAX_PASS_OVERHEAD_TOKENS)
    passes = plan_passes([100] * 50, 2048, dear)
    assert all(100 * len(p) <= 2048 for p in passes) and sum(map(len, passes)) == 50


@dataclass
class Encoded:
    ids: list[int]


@dataclass
class FakeTokenizer:
    max_length: int = 512
    seen: list[list[str]] = field(default_factory=list)

    def encode(self, texts: list[str]) -> list[Encoded]:
        self.seen.append(texts)
        return [Encoded([101, *range(len(t.split())), 102]) for t in texts]


@dataclass
class FakeModel:
    engine_choice: EngineChoice | None
    tokenizer: Any = field(default_factory=FakeTokenizer)


def test_the_server_derives_its_costs_from_the_serving_engines_measurement() -> None:
    short_tokens = len(MEASURE_TEXT.split()) + 2
    onnx_short, onnx_batch = timings_of(0.02, 10.0, short_tokens, BATCH_SHAPE)
    mlx_short, mlx_batch = timings_of(0.05, 90.0, short_tokens, BATCH_SHAPE)
    measured = {"mlx": Timing(mlx_short, mlx_batch), "onnx": Timing(onnx_short, onnx_batch)}
    model = FakeModel(EngineChoice("onnx", "measured fastest", measured))
    assert cost_model(model).pass_tokens == pytest.approx(10.0, abs=0.1)
    assert model.tokenizer.seen == [[MEASURE_TEXT]]
    model = FakeModel(EngineChoice("mlx", "measured fastest", measured, cached=True))
    assert cost_model(model).pass_tokens == pytest.approx(90.0, abs=0.1)


@pytest.mark.parametrize("choice", [None, EngineChoice("mlx", "forced (--engine mlx)")])
def test_nothing_measured_keeps_the_fitted_defaults(choice: EngineChoice | None) -> None:
    assert cost_model(FakeModel(choice)) is DEFAULT_COST


def test_the_batcher_plans_with_its_cost_model() -> None:
    passes: list[int] = []

    def forward(sequences: list[list[int]]) -> np.ndarray:
        passes.append(len(sequences))
        return np.ones((len(sequences), 2), dtype=np.float32)

    async def run(cost: CostModel) -> None:
        with ThreadPoolExecutor(max_workers=1) as worker:
            batcher = Batcher(forward, worker, BatchPolicy(), cost=cost)
            batcher.start()
            try:
                await batcher.submit([[1] * 8] * 4 + [[2] * 60] * 4)
            finally:
                await batcher.stop()

    asyncio.run(run(DEFAULT_COST))
    assert sorted(passes) == [4, 4]
    passes.clear()
    asyncio.run(run(CostModel(pass_tokens=400.0)))
    assert passes == [8]
