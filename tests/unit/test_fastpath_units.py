"""The idle fast path of the embeddings server, in process on fakes: which requests skip the
queue (:func:`goes_alone`), that they take one hop to the worker, that requests arriving
meanwhile still share a pass, and that every guard and error of the queued path holds on it.
No model runs: the embedder is a fake that records which thread did what.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from embedserver import minilm_path

from mlx_stack.embeddings.api.apierror import ApiError, ErrorKind
from mlx_stack.embeddings.model.settings import resolve
from mlx_stack.embeddings.model.tokenizer import Encoded
from mlx_stack.embeddings.serving.batcher import Batcher, BatchPolicy, CostModel
from mlx_stack.embeddings.serving.service import (
    EmbeddingService,
    ServiceOptions,
    Status,
    goes_alone,
)

# --- the decision ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("idle", "sizes", "budget", "expected"),
    [
        (True, [12], 2048, True),  # a short query on an idle server
        (False, [12], 2048, False),  # anything queued, computing or tokenising: join the queue
        (True, [1000, 1048], 2048, True),  # exactly the budget
        (True, [1000, 1049], 2048, False),  # one over
        (True, [5000], 2048, False),  # one long text
        (True, [1] * 3000, 2048, False),  # many tiny texts add up
        (True, [], 2048, True),
    ],
)
def test_goes_alone_table(idle: bool, sizes: list[int], budget: int, expected: bool) -> None:
    assert goes_alone(idle, sizes, BatchPolicy(max_batch_tokens=budget)) is expected


def test_goes_alone_stops_counting_past_the_budget() -> None:
    seen: list[int] = []

    def sizes():  # type: ignore[no-untyped-def]
        for size in (2000, 100, 7, 7, 7):
            seen.append(size)
            yield size

    assert not goes_alone(True, sizes(), BatchPolicy(max_batch_tokens=2048))
    assert seen == [2000, 100]  # a 2048-text request is not walked to the end


# --- the batcher's side ----------------------------------------------------------------------


class SlowForward:
    """[length, first id] per row; records each pass and the thread it ran on."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.passes: list[list[list[int]]] = []
        self.threads: list[str] = []

    def __call__(self, sequences: list[list[int]]) -> np.ndarray:
        self.passes.append([list(s) for s in sequences])
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return np.array([[len(s), s[0]] for s in sequences], dtype=np.float32)


def test_idle_means_nothing_queued_computing_or_on_its_way() -> None:
    forward = SlowForward(delay=0.2)

    async def body(batcher: Batcher) -> list[bool]:
        states = [batcher.idle]
        with batcher.incoming():
            states.append(batcher.idle)  # tokenising: it may want company
        alone = asyncio.create_task(batcher.run_alone(lambda: batcher.compute([[1, 2]])))
        await asyncio.sleep(0.05)
        states.append(batcher.idle)  # a lone pass is computing
        await alone
        states.append(batcher.idle)
        queued = asyncio.create_task(batcher.submit([[3, 4]]))
        await asyncio.sleep(0.05)
        states.append(batcher.idle)  # a queued pass is computing
        await queued
        states.append(batcher.idle)
        return states

    assert run_batcher(forward, BatchPolicy(), body) == [True, False, False, True, False, True]


def test_requests_arriving_during_a_lone_pass_wait_for_it_then_share_one_pass() -> None:
    forward = SlowForward(delay=0.2)

    async def body(batcher: Batcher) -> tuple[np.ndarray, list[np.ndarray]]:
        alone = asyncio.create_task(batcher.run_alone(lambda: batcher.compute([[1, 1]])))
        await asyncio.sleep(0.05)  # the lone pass is running
        rest = []
        for n in range(5):  # one by one: a loop that did not wait would start a pass at once
            rest.append(asyncio.create_task(batcher.submit([[2] * (n + 2)])))
            await asyncio.sleep(0.01)
        (vectors, reports), *others = await asyncio.gather(alone, *rest)
        assert [r.rows for r in reports] == [1]
        return vectors, others

    alone, others = run_batcher(forward, BatchPolicy(), body)
    assert alone.tolist() == [[2, 1]]
    assert [o.tolist() for o in others] == [[[n + 2, 2]] for n in range(5)]
    assert [len(p) for p in forward.passes] == [1, 5]  # never overlapping, then batched


def test_compute_plans_passes_and_keeps_input_order() -> None:
    forward = SlowForward()

    async def body(batcher: Batcher):  # type: ignore[no-untyped-def]
        return await batcher.run_alone(
            lambda: batcher.compute([[1] * 9, [2] * 3, [3] * 300, [4] * 3])
        )

    vectors, reports = run_batcher(forward, BatchPolicy(), body)
    assert vectors.tolist() == [[9, 1], [3, 2], [300, 3], [3, 4]]
    assert sorted(r.rows for r in reports) == [1, 3]  # the long one alone, as in a wave
    assert sum(r.tokens for r in reports) == 315
    assert forward.threads == ["worker_0"] * 2


def test_compute_plans_with_the_batchers_cost_model() -> None:
    lengths = [[1] * 3, [2] * 3, [3] * 100]

    def passes(cost: CostModel) -> list[int]:
        forward = SlowForward()

        async def body(batcher: Batcher):  # type: ignore[no-untyped-def]
            return await batcher.run_alone(lambda: batcher.compute(lengths))

        async def main():  # type: ignore[no-untyped-def]
            with ThreadPoolExecutor(max_workers=1) as worker:
                return await body(Batcher(forward, worker, BatchPolicy(), cost=cost))

        asyncio.run(main())
        return sorted(len(p) for p in forward.passes)

    assert passes(CostModel()) == [1, 2]  # padding 3-token texts to 100 costs more than a pass
    assert passes(CostModel(pass_tokens=1e6)) == [3]  # a pass dearer than any padding


def test_a_lone_pass_that_fails_leaves_the_batcher_serving() -> None:
    def broken(_: list[list[int]]) -> np.ndarray:
        raise RuntimeError("boom")

    async def body(batcher: Batcher) -> bool:
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.run_alone(lambda: batcher.compute([[1]]))
        return batcher.idle

    assert run_batcher(broken, BatchPolicy(), body) is True


def run_batcher(forward, policy: BatchPolicy, body):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker") as worker:
            batcher = Batcher(forward, worker, policy)
            batcher.start()
            try:
                return await body(batcher)
            finally:
                await batcher.stop()

    return asyncio.run(main())


# --- the service's side ----------------------------------------------------------------------


class FakeTokenizer:
    """One token per character (ids 1..), cut at ``max_length``; records its threads."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.threads: list[str] = []

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        self.threads.append(threading.current_thread().name)
        return [Encoded([ord(c) % 97 + 1 for c in t][: self.max_length], len(t)) for t in texts]

    def truncate_ids(self, ids: np.ndarray) -> Encoded:
        return Encoded([int(i) for i in ids[: self.max_length]], len(ids))


class FakeEmbedder:
    load_seconds = 0.0
    fast_kernels: tuple[str, ...] = ()
    vocab_size = 1000

    def __init__(self, max_length: int, delay: float, dim: int) -> None:
        self.tokenizer = FakeTokenizer(max_length)
        self.delay = delay
        self.dim = dim
        self.fail = False
        self.passes: list[int] = []
        self.threads: list[str] = []

    def forward(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        self.passes.append(len(sequences))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("the model broke")
        return np.array([[len(s)] + [1.0] * (self.dim - 1) for s in sequences], np.float32)


def serve(embedder: FakeEmbedder, body, truncate: bool = True):  # type: ignore[no-untyped-def]
    settings = resolve(minilm_path())

    async def main():  # type: ignore[no-untyped-def]
        service = EmbeddingService(settings, lambda *_: embedder,  # type: ignore[arg-type,return-value]
                                   ServiceOptions(truncate=truncate))  # fmt: skip
        service.start_loading()
        for _ in range(400):
            if service.status is Status.READY:
                break
            await asyncio.sleep(0.01)
        assert service.status is Status.READY, service.failure
        try:
            return await body(service)
        finally:
            await service.shutdown()

    return asyncio.run(main())


def test_a_lone_short_request_takes_one_hop_to_the_worker() -> None:
    embedder = FakeEmbedder(max_length=256, delay=0.0, dim=384)

    async def body(service: EmbeddingService):  # type: ignore[no-untyped-def]
        result = await service.embed_texts(["hello there"], None)
        ids = await service.embed_token_ids([np.array([5, 6, 7], np.int32)], None)
        return result, ids, service.metrics.render({})

    result, ids, metrics = serve(embedder, body)
    assert embedder.tokenizer.threads == [embedder.threads[0]]  # tokenised on the worker
    assert embedder.threads[0].startswith("mlx-embed")
    assert embedder.passes == [1, 1]
    assert result.token_counts == [11] and ids.token_counts == [3]
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0)  # finished: normalised
    assert "mlx_embeddings_batch_size_count 2" in metrics  # both passes are counted


def test_requests_that_find_the_server_busy_are_tokenised_on_the_pool_and_batched() -> None:
    embedder = FakeEmbedder(max_length=256, delay=0.2, dim=8)

    async def body(service: EmbeddingService):  # type: ignore[no-untyped-def]
        first = asyncio.create_task(service.embed_texts(["first"], None))
        await asyncio.sleep(0.05)  # computing on the fast path
        rest = [asyncio.create_task(service.embed_texts([f"query {n}"], None)) for n in range(4)]
        return await asyncio.gather(first, *rest)

    results = serve(embedder, body)
    assert [r.token_counts for r in results] == [[5]] + [[7]] * 4
    assert embedder.passes == [1, 4]
    pool = [name for name in embedder.tokenizer.threads if name.startswith("tokenize")]
    assert len(pool) == 4  # the four that queued


def test_a_long_request_keeps_the_queued_path() -> None:
    embedder = FakeEmbedder(max_length=4096, delay=0.0, dim=8)

    async def body(service: EmbeddingService):  # type: ignore[no-untyped-def]
        return await service.embed_texts(["x" * 3000], None)

    result = serve(embedder, body)
    assert result.token_counts == [3000]
    assert embedder.tokenizer.threads[0].startswith("tokenize")


def test_the_fast_path_keeps_the_length_refusal_and_the_model_failure_answer() -> None:
    embedder = FakeEmbedder(max_length=8, delay=0.0, dim=8)

    async def body(service: EmbeddingService):  # type: ignore[no-untyped-def]
        with pytest.raises(ApiError) as too_long:
            await service.embed_texts(["short", "far too long for it"], None)
        embedder.fail = True
        with pytest.raises(ApiError) as broken:
            await service.embed_texts(["short"], None)
        embedder.fail = False
        after = await service.embed_texts(["short"], None)
        return too_long.value, broken.value, after

    too_long, broken, after = serve(embedder, body, truncate=False)
    assert too_long.kind is ErrorKind.INVALID_REQUEST
    assert "'input[1]' has 19 tokens" in too_long.message
    assert broken.kind is ErrorKind.INTERNAL and "the model broke" in broken.message
    assert after.token_counts == [5]  # the server still serves
    assert embedder.passes == [1, 1]  # the refused request never reached the model
