"""Dynamic batching: texts of concurrent requests share forward passes.

Requests put their tokenised texts in one queue; a single loop on the event loop takes a *wave*
of them (oldest first, a few passes' worth of tokens), sorts the wave by length and
cuts it into passes of alike lengths (:func:`plan_passes`: padding is paid for, and so is each
pass), and runs each pass on the model's worker thread. A pass is one matrix product per layer
for many texts, which on a CPU costs far less than one per text.

Waiting is short and purposeful: when the queue holds less than a full pass, the loop waits (at
most ``batch_timeout_ms``) only while other requests are known to be on their way, i.e. admitted
and still tokenising. A lone request never waits; a full batch never waits.

The idle fast path: when nothing is queued, computing or on its way, a short request skips the
queue and the loop altogether (:meth:`Batcher.run_alone`): it is tokenised and computed in one
hop to the worker thread, which saves the tokeniser pool's hop and the loop's wake-up (small on
an idle machine, ~0.1 ms; more when busy threads wake late). Requests that arrive meanwhile
queue as they would behind a pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

T = TypeVar("T")

MAX_ROWS_PER_PASS = 512
"""Texts per forward pass, whatever the token budget (bounds pooling and padding memory)."""
WAVE_PASSES = 4
"""A wave takes up to this many passes' worth of queued tokens, so lengths sort well."""
PASS_OVERHEAD_TOKENS = 32.0
ROW_OVERHEAD_TOKENS = 2.0
ATTENTION_SPAN = 512.0
"""The cost model of a pass, in tokens' worth of compute (``bench/costmodel.py`` fits it).
On MiniLM, 2 cores, MKL, two fits (median errors 3% and 8%): a pass costs 3.2-4.0 ms
(29-36 tokens) by itself, each row 1.2-2.5 tokens more, and a token's attention work grows
with its length, to as much as its other work at ~512 tokens (the best span of both fits)."""
MAX_PASS_OVERHEAD_TOKENS = 4096.0
"""A derived pass overhead is capped here: beyond it, noise in the measurement, not the model."""
ATTENTION_ROWS = 128
"""Bounds ``rows x longest^2`` to ``max_batch_tokens x 128``: the attention scores' memory."""


@dataclass(frozen=True)
class BatchPolicy:
    """The batching knobs (documented in docs/embeddings-server.md)."""

    max_batch_tokens: int = 2048
    batch_timeout_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be positive, got {self.max_batch_tokens}")
        if self.batch_timeout_ms < 0:
            raise ValueError(f"batch_timeout_ms must be >= 0, got {self.batch_timeout_ms}")


@dataclass(frozen=True)
class CostModel:
    """A pass's cost in tokens' worth of compute: ``pass_tokens`` per pass, ``row_tokens`` per
    row, ``longest x (1 + longest / span)`` per padded token.

    The defaults were fitted on MiniLM with MLX (``bench/costmodel.py``). The pass overhead
    differs most between engines and models (ONNX Runtime's fixed cost per pass is a third of
    MLX's on a CPU; a 0.6B model's is its weights streamed once, hundreds of tokens' worth), so
    the server derives it from the engine choice's own measurement (:meth:`from_timing`), taken
    at first start on this machine with this model; the row cost and span stay as fitted.
    """

    pass_tokens: float = PASS_OVERHEAD_TOKENS
    row_tokens: float = ROW_OVERHEAD_TOKENS
    span: float = ATTENTION_SPAN
    source: str = "fitted on MiniLM with MLX (bench/costmodel.py)"

    def work(self, rows: int, longest: float) -> float:
        """Tokens' worth of work of one pass, without its overhead."""
        return rows * (self.row_tokens + longest * (1.0 + longest / self.span))

    @classmethod
    def from_timing(cls, short_ms: float, short_tokens: int, batch_ms: float,
                    batch_shape: tuple[int, int]) -> CostModel:  # fmt: skip
        """Solve a token's cost and the pass overhead from two passes the engine choice timed:
        one short row (``short_tokens``) and a ``rows x length`` batch. Timings that cannot
        be a pass's cost (the batch no dearer than the short one, non-positive) keep the
        defaults."""
        default = cls()
        rows, length = batch_shape
        extra_work = default.work(rows, length) - default.work(1, short_tokens)
        if not (short_ms > 0 and batch_ms > short_ms and extra_work > 0):
            return default
        per_token_ms = (batch_ms - short_ms) / extra_work
        overhead = short_ms / per_token_ms - default.work(1, short_tokens)
        overhead = min(max(overhead, 0.0), MAX_PASS_OVERHEAD_TOKENS)
        return cls(pass_tokens=round(overhead, 1),
                   source=f"derived from the engine measurement ({short_ms:.1f} ms short, "
                          f"{batch_ms:.0f} ms for {rows}x{length})")  # fmt: skip


DEFAULT_COST = CostModel()


@dataclass(frozen=True)
class PassReport:
    """What one forward pass did, for metrics."""

    rows: int
    tokens: int
    padded_tokens: int
    seconds: float


Forward = Callable[[list[list[int]]], np.ndarray]


def plan_passes(lengths: Sequence[int], max_batch_tokens: int,
                cost: CostModel = DEFAULT_COST) -> list[list[int]]:  # fmt: skip
    """Group indices into forward passes of similar lengths, as cheaply as possible.

    Items are sorted by length and cut into consecutive runs; each run is one pass padded to
    its longest item. The cut points minimise the modelled cost (dynamic programming):
    ``cost.pass_tokens`` per pass, ``cost.row_tokens`` per row, and
    ``rows x longest x (1 + longest / cost.span)`` (padding is paid for, and attention
    grows with length). A pass holds at most
    ``max_batch_tokens`` padded tokens, ``MAX_ROWS_PER_PASS`` rows and
    ``max_batch_tokens x ATTENTION_ROWS`` of ``rows x longest^2`` (the attention scores'
    memory); an item longer than the budget gets a pass of its own.
    """
    count = len(lengths)
    if count == 0:
        return []
    order = sorted(range(count), key=lambda i: lengths[i])
    sorted_lengths = np.array([max(1, lengths[i]) for i in order], dtype=np.float64)
    best = np.zeros(count + 1)
    start_of = np.zeros(count + 1, dtype=np.int64)
    area_budget = max_batch_tokens * ATTENTION_ROWS
    for end in range(1, count + 1):
        longest = sorted_lengths[end - 1]
        rows = min(
            end,
            MAX_ROWS_PER_PASS,
            int(max_batch_tokens // longest),
            int(area_budget // (longest * longest)),
        )
        rows = max(rows, 1)
        starts = np.arange(end - rows, end)
        costs = (
            best[end - rows : end]
            + cost.pass_tokens
            + (end - starts) * (cost.row_tokens + longest * (1.0 + longest / cost.span))
        )
        pick = int(np.argmin(costs))
        best[end] = costs[pick]
        start_of[end] = end - rows + pick
    passes: list[list[int]] = []
    end = count
    while end > 0:
        begin = int(start_of[end])
        passes.append(order[begin:end])
        end = begin
    passes.reverse()
    return passes


@dataclass
class _Job:
    """One request's texts: a result row per text, resolved when all rows are in."""

    future: asyncio.Future[np.ndarray]
    rows: int
    filled: int = 0
    result: np.ndarray | None = None

    def put(self, row: int, vector: np.ndarray) -> None:
        if self.future.done():
            return
        if self.result is None:
            self.result = np.empty((self.rows, vector.shape[0]), dtype=np.float32)
        self.result[row] = vector
        self.filled += 1
        if self.filled == self.rows:
            self.future.set_result(self.result)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass
class _Item:
    ids: list[int]
    job: _Job
    row: int
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Owns the queue and the loop; ``submit`` is the only way in."""

    def __init__(
        self,
        forward: Forward,
        executor: Executor,
        policy: BatchPolicy,
        on_pass: Callable[[PassReport], None] | None = None,
        cost: CostModel = DEFAULT_COST,
    ) -> None:
        self._forward = forward
        self.cost = cost
        self._executor = executor
        self._policy = policy
        self._on_pass = on_pass
        self._queue: deque[_Item] = deque()
        self._queued_tokens = 0
        self._incoming = 0
        self._busy = 0
        """Passes running now: a wave's, or a lone request's (:meth:`run_alone`)."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_texts(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued, computing or on its way: a request arriving now would wait for no
        one, so it may take the fast path (:meth:`run_alone`)."""
        return not self._queue and not self._busy and not self._incoming

    async def run_alone(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the worker thread now, as a pass of its own: the idle fast path
        (tokenise, then :meth:`compute`, in one hop). Call it only when :attr:`idle`; the loop
        starts no pass until it ends, so passes never overlap."""
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            self._busy -= 1
            if self._queue:
                self._wake.set()

    def compute(self, sequences: Sequence[list[int]]) -> tuple[np.ndarray, list[PassReport]]:
        """On the worker thread: one request's vectors ``[len(sequences), dim]`` in input order,
        in the passes :func:`plan_passes` picks, and what each pass did."""
        if not sequences:
            raise ValueError("compute() needs at least one sequence")
        result: np.ndarray | None = None
        reports: list[PassReport] = []
        for rows in plan_passes([len(s) for s in sequences], self._policy.max_batch_tokens,
                                self.cost):
            batch = [sequences[i] for i in rows]
            started = time.monotonic()
            vectors = self._forward(batch)
            reports.append(_report(batch, time.monotonic() - started))
            if result is None:
                result = np.empty((len(sequences), vectors.shape[1]), dtype=np.float32)
            result[rows] = vectors
        assert result is not None
        return result, reports

    def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            self._queue.popleft().job.fail(RuntimeError("the server is shutting down"))

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request as on its way (tokenising) so a forming batch may wait for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wake.set()

    async def submit(self, sequences: Sequence[list[int]]) -> np.ndarray:
        """Pooled, unnormalised vectors ``[len(sequences), dim]`` in input order."""
        if not sequences:
            raise ValueError("submit() needs at least one sequence")
        job = _Job(asyncio.get_running_loop().create_future(), len(sequences))
        for row, ids in enumerate(sequences):
            self._queue.append(_Item(ids, job, row))
            self._queued_tokens += len(ids)
        self._wake.set()
        return await job.future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and not self._busy:  # run_alone() wakes the loop as it ends
                await self._gather()
                wave = self._take_wave()
                if wave:
                    self._busy += 1
                    try:
                        await self._run_wave(wave)
                    finally:
                        self._busy -= 1

    async def _gather(self) -> None:
        """Wait briefly for requests still tokenising, unless a full pass is already queued."""
        deadline = self._queue[0].queued_at + self._policy.batch_timeout_ms / 1000
        while self._incoming and self._queued_tokens < self._policy.max_batch_tokens:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_wave(self) -> list[_Item]:
        """Oldest first, up to ``WAVE_PASSES`` passes' worth of tokens; skips abandoned ones."""
        wave: list[_Item] = []
        tokens = 0
        limit = WAVE_PASSES * self._policy.max_batch_tokens
        while self._queue and (not wave or tokens < limit):
            item = self._queue.popleft()
            self._queued_tokens -= len(item.ids)
            if item.job.future.done():  # cancelled by its client, or failed already
                continue
            wave.append(item)
            tokens += len(item.ids)
        return wave

    async def _run_wave(self, wave: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        for rows in plan_passes([len(item.ids) for item in wave], self._policy.max_batch_tokens,
                                self.cost):
            items = [wave[i] for i in rows if not wave[i].job.future.done()]
            if not items:
                continue
            sequences = [item.ids for item in items]
            started = time.monotonic()
            try:
                vectors = await loop.run_in_executor(self._executor, self._forward, sequences)
            except Exception as exc:  # a failed pass fails its requests, not the loop
                for item in items:
                    item.job.fail(exc)
                continue
            if self._on_pass is not None:
                self._on_pass(_report(sequences, time.monotonic() - started))
            for item, vector in zip(items, vectors, strict=True):
                item.job.put(item.row, vector)


def _report(sequences: Sequence[Sequence[int]], seconds: float) -> PassReport:
    longest = max(len(s) for s in sequences)
    return PassReport(
        rows=len(sequences),
        tokens=sum(len(s) for s in sequences),
        padded_tokens=longest * len(sequences),
        seconds=seconds,
    )
