"""The one owner of the server's runtime state: the model, its status, the batcher, the metrics.

MLX work (loading, warm-up, every forward pass) runs on a single worker thread; tokenising runs
on a second small pool, except on the idle fast path (:func:`goes_alone`: a short request on an
idle server is tokenised and computed in one hop to the worker). The event loop only routes, so
it stays free to answer ``/health`` and to refuse requests while passes compute. Back-pressure
is an error (429), not an unbounded queue. The status changes in one place, on the event loop:
``LOADING -> READY`` once the model has loaded *and* run a real forward pass, ``LOADING ->
FAILED`` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np

from mlx_stack.config.modelfolder import Fingerprint, fingerprint

from ..api.apierror import ApiError, ErrorKind, invalid
from ..api.metrics import ServerMetrics
from ..engine.choice import EngineChoice, EngineMode
from ..model.encoder import Embeddings, finish
from ..model.settings import ModelSettings
from ..model.tokenizer import Encoded
from .batcher import DEFAULT_COST, Batcher, BatchPolicy, CostModel, PassReport

log = logging.getLogger("mlx_stack.embeddings")

MAX_CONCURRENT = 64
"""Requests admitted (tokenising, queued or computing) before new ones get 429."""


@dataclass(frozen=True)
class ServiceOptions:
    """Serving choices that do not depend on the model folder."""

    batch: BatchPolicy = field(default_factory=BatchPolicy)
    max_concurrent: int = MAX_CONCURRENT
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrent <= 0:
            raise ValueError(f"max_concurrent must be positive, got {self.max_concurrent}")


class Status(Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class Tokenizer(Protocol):
    def encode(self, texts: Sequence[str]) -> list[Encoded]: ...

    def truncate_ids(self, ids: np.ndarray) -> Encoded: ...


class Embedder(Protocol):
    """What the service needs of a model; :class:`TextEncoder` in production."""

    load_seconds: float
    fast_kernels: tuple[str, ...]

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def vocab_size(self) -> int: ...

    def forward(self, sequences: Sequence[Sequence[int]]) -> np.ndarray: ...


Loader = Callable[[ModelSettings, Fingerprint], Embedder]
"""Loads the folder; the fingerprint (already computed) keys the engine's caches."""


def default_loader(fast_kernels: bool = True, engine: EngineMode = "auto") -> Loader:
    def load(settings: ModelSettings, identity: Fingerprint) -> Embedder:
        if settings.task == "rerank" and settings.scorer == "yes_no":
            from ..model.yesno import YesNoReranker

            return YesNoReranker.load(settings)
        if settings.task == "rerank":
            from ..model.crossencoder import CrossEncoder

            return CrossEncoder.load(settings, fast_kernels=fast_kernels)
        from ..engine.select import load_encoder

        return load_encoder(settings, identity.content_sha256, engine, fast_kernels)  # type: ignore[no-any-return]

    return load


def goes_alone(idle: bool, sizes: Iterable[int], policy: BatchPolicy) -> bool:
    """Whether a request takes the idle fast path (one hop: tokenise and compute on the worker).

    Only when the batcher is idle (a request now would wait for no one) and the request is
    short: its ``sizes`` (characters of each text, or tokens of each id array) add up to at most
    ``max_batch_tokens``, about a pass whatever the tokenizer. Longer requests keep the
    tokeniser pool, whose work overlaps with other requests' passes.
    """
    if not idle:
        return False
    total = 0
    for size in sizes:
        total += size
        if total > policy.max_batch_tokens:
            return False
    return True


@dataclass(frozen=True)
class Scores:
    """One relevance logit per document, in document order, with what ``usage`` needs."""

    logits: np.ndarray  # float32 [n]
    token_counts: list[int]
    truncated: list[bool]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


class EmbeddingService:
    """Loads the model in the background, then serves embedding requests through the batcher."""

    def __init__(
        self,
        settings: ModelSettings,
        loader: Loader,
        options: ServiceOptions | None = None,
        on_load_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.options = options or ServiceOptions()
        self._loader = loader
        self._on_load_failure = on_load_failure
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-embed")
        self._tokenizers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._model: Embedder | None = None
        self._batcher: Batcher | None = None
        self._in_flight = 0
        self.status = Status.LOADING
        self.failure: str | None = None
        self.fingerprint: Fingerprint | None = None
        self.metrics = ServerMetrics(
            queue_depth=lambda: self._batcher.queued_texts if self._batcher else 0,
            in_flight=lambda: self._in_flight,
        )

    # --- lifecycle -------------------------------------------------------------------------

    def start_loading(self) -> None:
        """Queue the load on the worker thread and return at once (call on the event loop)."""
        loop = asyncio.get_running_loop()
        self._worker.submit(self._load, loop)

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            identity = fingerprint(self.settings.path)
            model = self._loader(self.settings, identity)
        except BaseException as exc:  # a crash in loading must surface, not hang at 503
            loop.call_soon_threadsafe(self._failed, exc)
            return
        loop.call_soon_threadsafe(self._ready, model, identity)

    def _ready(self, model: Embedder, identity: Fingerprint) -> None:
        self._model = model
        self.fingerprint = identity
        cost = cost_model(model)
        self._batcher = Batcher(model.forward, self._worker, self.options.batch, self._on_pass,
                                cost)  # fmt: skip
        log.info("batching: a pass costs %.0f tokens' worth by itself (%s)", cost.pass_tokens,
                 cost.source)  # fmt: skip
        self._batcher.start()
        self.status = Status.READY
        kernels = f"; fast kernels: {', '.join(model.fast_kernels)}" if model.fast_kernels else ""
        choice = getattr(model, "engine_choice", None)
        engine = f"; engine {choice.engine}: {choice.reason}" if choice is not None else ""
        log.info(
            "model ready in %.1f s (one warm-up pass done%s%s); content sha256 %s",
            model.load_seconds,
            kernels,
            engine,
            identity.content_sha256[:16],
        )

    def _failed(self, exc: BaseException) -> None:
        self.failure = f"{type(exc).__name__}: {exc}"
        self.status = Status.FAILED
        log.error("loading %s failed: %s", self.settings.path, self.failure)
        if self._on_load_failure is not None:
            self._on_load_failure(exc)

    async def shutdown(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._tokenizers.shutdown(wait=False, cancel_futures=True)

    # --- requests --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._require_model().vocab_size

    @property
    def engine_choice(self) -> EngineChoice | None:
        """Which engine serves the model and why (``None`` while loading; rerankers: MLX)."""
        return getattr(self._model, "engine_choice", None)

    async def embed_texts(self, texts: Sequence[str], dimensions: int | None) -> Embeddings:
        """Embed for a request already :meth:`admitted`."""
        model = self._require_model()
        batcher = self._require_batcher()
        if goes_alone(batcher.idle, map(len, texts), self.options.batch):
            texts = list(texts)
            return await self._embed_alone(batcher, lambda: model.tokenizer.encode(texts),
                                           dimensions)  # fmt: skip
        with batcher.incoming():
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(
                self._tokenizers, model.tokenizer.encode, list(texts)
            )
        return await self._embed(batcher, encoded, dimensions)

    async def embed_token_ids(
        self, inputs: Sequence[np.ndarray], dimensions: int | None
    ) -> Embeddings:
        """Embed token-id arrays for a request already :meth:`admitted`."""
        model = self._require_model()
        batcher = self._require_batcher()
        limit = model.vocab_size
        for index, ids in enumerate(inputs):
            highest = int(np.max(ids))
            if highest >= limit:
                raise invalid(
                    f"'input[{index}]' has token id {highest}, outside this model's vocabulary "
                    f"(ids 0..{limit - 1})",
                    "input",
                )
        encoded = [model.tokenizer.truncate_ids(ids) for ids in inputs]
        if goes_alone(batcher.idle, (len(e.ids) for e in encoded), self.options.batch):
            return await self._embed_alone(batcher, lambda: encoded, dimensions)
        return await self._embed(batcher, encoded, dimensions)

    async def _embed_alone(
        self, batcher: Batcher, encode: Callable[[], list[Encoded]], dimensions: int | None
    ) -> Embeddings:
        """The idle fast path: tokenise, compute and finish in one hop to the worker thread."""

        def work() -> tuple[list[Encoded], np.ndarray, list[PassReport]]:
            encoded = encode()
            if not self.options.truncate:
                _refuse_long_inputs(encoded, self.settings.max_seq_len)
            pooled, reports = batcher.compute([e.ids for e in encoded])
            return encoded, finish(pooled, dimensions, self.settings.normalize), reports

        try:
            encoded, vectors, reports = await batcher.run_alone(work)
        except ApiError:
            raise
        except Exception as exc:  # a model failure fails this request, not the server
            log.exception("embedding failed")
            raise ApiError(
                ErrorKind.INTERNAL, f"embedding failed: {type(exc).__name__}: {exc}"
            ) from exc
        for report in reports:
            self._on_pass(report)
        return self._result(encoded, vectors)

    async def _embed(
        self, batcher: Batcher, encoded: list[Encoded], dimensions: int | None
    ) -> Embeddings:
        if not self.options.truncate:
            _refuse_long_inputs(encoded, self.settings.max_seq_len)
        try:
            pooled = await batcher.submit([e.ids for e in encoded])
        except Exception as exc:  # a model failure fails this request, not the server
            log.exception("embedding failed")
            raise ApiError(
                ErrorKind.INTERNAL, f"embedding failed: {type(exc).__name__}: {exc}"
            ) from exc
        return self._result(encoded, finish(pooled, dimensions, self.settings.normalize))

    def _result(self, encoded: list[Encoded], vectors: np.ndarray) -> Embeddings:
        result = Embeddings(
            vectors=vectors,
            token_counts=[len(e.ids) for e in encoded],
            truncated=[e.truncated for e in encoded],
        )
        self.metrics.texts.inc(len(encoded))
        self.metrics.tokens.inc(result.total_tokens)
        self.metrics.truncated.inc(sum(result.truncated))
        return result

    async def rerank(
        self, query: str, documents: Sequence[str], max_document_tokens: int | None
    ) -> Scores:
        """Score (query, document) pairs for a request already :meth:`admitted`; the pairs of
        concurrent requests share passes as texts do."""
        model = self._require_model()
        batcher = self._require_batcher()
        encode_pairs = getattr(model.tokenizer, "encode_pairs", None)
        if encode_pairs is None:
            raise ApiError(ErrorKind.NOT_FOUND, "this server serves embeddings, not a "
                           "reranker: POST /v1/embeddings", code="wrong_task")  # fmt: skip
        with batcher.incoming():
            loop = asyncio.get_running_loop()
            pairs = await loop.run_in_executor(
                self._tokenizers, encode_pairs, query, list(documents), max_document_tokens
            )
        if not self.options.truncate:
            _refuse_long_pairs(pairs, self.settings.max_seq_len)
        try:
            logits = await batcher.submit(pairs)
        except Exception as exc:  # a model failure fails this request, not the server
            log.exception("reranking failed")
            raise ApiError(
                ErrorKind.INTERNAL, f"reranking failed: {type(exc).__name__}: {exc}"
            ) from exc
        result = Scores(np.asarray(logits, dtype=np.float32).reshape(-1),
                        [len(p) for p in pairs], [p.truncated for p in pairs])  # fmt: skip
        self.metrics.texts.inc(len(pairs))
        self.metrics.tokens.inc(result.total_tokens)
        self.metrics.truncated.inc(sum(result.truncated))
        return result

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of ``max_concurrent`` places for a whole request, from before its body is
        read to its answer: a full server refuses (429) without reading 16 MiB first."""
        self._require_model()
        limit = self.options.max_concurrent
        if self._in_flight >= limit:
            raise ApiError(
                ErrorKind.OVERLOADED,
                f"{self._in_flight} requests already in progress (maximum {limit}, "
                "--max-concurrent); retry shortly or send more texts per request",
                code="overloaded",
            )
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    def _on_pass(self, report: PassReport) -> None:
        self.metrics.batch_rows.observe(report.rows)
        self.metrics.batch_tokens.observe(report.padded_tokens)
        self.metrics.pass_seconds.observe(report.seconds)

    def _require_model(self) -> Embedder:
        if self._model is None:
            if self.status is Status.FAILED:
                raise ApiError(ErrorKind.LOADING, f"the model failed to load: {self.failure}")
            raise ApiError(
                ErrorKind.LOADING, "the model is still loading; retry shortly", code="loading"
            )
        return self._model

    def _require_batcher(self) -> Batcher:
        assert self._batcher is not None  # set together with the model
        return self._batcher


def _refuse_long_inputs(encoded: Sequence[Encoded], limit: int) -> None:
    for index, item in enumerate(encoded):
        if item.truncated:
            raise invalid(
                f"'input[{index}]' has {item.full_length} tokens, more than this model's maximum "
                f"of {limit}; shorten it, or start the server without --no-truncate to have it "
                "cut to the maximum",
                "input",
            )


def _refuse_long_pairs(pairs: Sequence[Any], limit: int) -> None:
    for index, pair in enumerate(pairs):
        if pair.truncated:
            raise invalid(
                f"the query with 'documents[{index}]' has {pair.full_length} tokens, more than "
                f"this model's maximum of {limit}; shorten them, or start the server without "
                "--no-truncate to have the document cut",
                "documents",
            )


def cost_model(model: object) -> CostModel:
    """The batcher's costs for the engine serving ``model``, from the engine choice's own
    measurement of it when there is one (first start, or the cache), else the defaults."""
    choice = getattr(model, "engine_choice", None)
    timing = choice.measured.get(choice.engine) if choice is not None else None
    tokenizer = getattr(model, "tokenizer", None)
    if timing is None or tokenizer is None:
        return DEFAULT_COST
    from ..engine.select import BATCH_SHAPE, MEASURE_TEXT

    short = len(tokenizer.encode([MEASURE_TEXT])[0].ids)
    rows, length = BATCH_SHAPE
    length = min(length, getattr(tokenizer, "max_length", length))
    return CostModel.from_timing(timing.short_ms, short, timing.batch_ms, (rows, length))
