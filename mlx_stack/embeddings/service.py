"""The one owner of the server's runtime state: the model, its status and its worker thread.

All MLX work (loading, warm-up, every forward pass) runs on a single worker thread, so the
event loop stays free to answer ``/health`` and to refuse requests while a batch computes.
Back-pressure is an error (429), not an unbounded queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Protocol

from .apierror import ApiError, ErrorKind
from .model import EmbeddingModel, Embeddings
from .settings import ModelSettings

log = logging.getLogger("mlx_stack.embeddings")

MAX_PENDING = 64
"""Requests admitted (running or waiting for the worker) before new ones get 429."""


class Status(Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class Embedder(Protocol):
    """What the service needs of a model; :class:`EmbeddingModel` in production."""

    load_seconds: float
    fast_gelu_layers: int

    @property
    def vocab_size(self) -> int: ...

    def embed(self, texts: list[str], dimensions: int | None = None) -> Embeddings: ...

    def embed_token_ids(
        self, inputs: list[list[int]], dimensions: int | None = None
    ) -> Embeddings: ...


Loader = Callable[[ModelSettings], Embedder]


def default_loader(fast_gelu: bool = True) -> Loader:
    return lambda settings: EmbeddingModel.load(settings, fast_gelu=fast_gelu)


class EmbeddingService:
    """Loads the model in the background, then runs embedding jobs one at a time."""

    def __init__(
        self,
        settings: ModelSettings,
        loader: Loader,
        on_load_failure: Callable[[BaseException], None] | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self._on_load_failure = on_load_failure
        self._max_pending = max_pending
        self._pending = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-embed")
        self._model: Embedder | None = None
        self.status = Status.LOADING
        self.failure: str | None = None

    def start_loading(self) -> None:
        """Queue the load on the worker thread and return at once."""
        self._worker.submit(self._load)

    def _load(self) -> None:
        try:
            model = self._loader(self.settings)
        except BaseException as exc:  # a crash in loading must surface, not hang at 503
            self.failure = f"{type(exc).__name__}: {exc}"
            self.status = Status.FAILED
            log.error("loading %s failed: %s", self.settings.path, self.failure)
            if self._on_load_failure is not None:
                self._on_load_failure(exc)
            return
        self._model = model
        self.status = Status.READY
        log.info(
            "model ready in %.1f s (one warm-up pass done%s)",
            model.load_seconds,
            f"; {model.fast_gelu_layers} GELU layers fused" if model.fast_gelu_layers else "",
        )

    @property
    def vocab_size(self) -> int:
        return self._require_model().vocab_size

    async def embed_texts(self, texts: list[str], dimensions: int | None) -> Embeddings:
        model = self._require_model()
        return await self._run(lambda: model.embed(texts, dimensions))

    async def embed_token_ids(self, ids: list[list[int]], dimensions: int | None) -> Embeddings:
        model = self._require_model()
        return await self._run(lambda: model.embed_token_ids(ids, dimensions))

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _require_model(self) -> Embedder:
        if self._model is None:
            if self.status is Status.FAILED:
                raise ApiError(ErrorKind.LOADING, f"the model failed to load: {self.failure}")
            raise ApiError(
                ErrorKind.LOADING, "the model is still loading; retry shortly", code="loading"
            )
        return self._model

    async def _run(self, job: Callable[[], Embeddings]) -> Embeddings:
        if self._pending >= self._max_pending:
            raise ApiError(
                ErrorKind.OVERLOADED,
                f"{self._pending} requests already queued (maximum {self._max_pending}); "
                "retry later or send larger batches",
                code="overloaded",
            )
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, job)
        except Exception as exc:  # a model failure fails this request, not the server
            log.exception("embedding failed")
            raise ApiError(
                ErrorKind.INTERNAL, f"embedding failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._pending -= 1
