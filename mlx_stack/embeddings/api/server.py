"""The Starlette app: OpenAI's ``/v1/embeddings`` and ``/v1/models``, ``/health``, ``/metrics``,
and ``/openapi.json``, which describes them.

Handlers only translate: JSON in -> :mod:`protocol` -> :class:`EmbeddingService` -> JSON out.
Every failure is an :class:`ApiError`, turned into a response by one exception handler, so a
bad request gets a 4xx in OpenAI's error shape and never takes the process down. Before any
route, :mod:`access` checks ``Host`` and ``Origin``; below the app, :mod:`connection` bounds
how long a client may take to send.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..cpu.blas import BlasInfo
from ..model.crossencoder import relevance
from ..serving.service import EmbeddingService, Status
from .access import AccessGuard, AccessPolicy
from .apierror import ApiError, ErrorKind, invalid, shown
from .body import MAX_BODY_BYTES, BodyDecoder, read_body
from .connection import BODY_TIMEOUT
from .openapi import RERANK_PATHS, ModelLimits, openapi_document
from .protocol import (
    EmbeddingRequest,
    EncodingFormat,
    embeddings_response,
)
from .quantize import SCALED, quantize
from .rerank import decode_rerank_request, rerank_response

EMBEDDINGS_PATHS = ("/v1/embeddings", "/embeddings")
INLINE_RENDER_FLOATS = 4096
"""Responses up to this many floats are serialised on the event loop, larger ones off it."""

TRUNCATED_HEADER = "x-mlx-stack-truncated-inputs"
"""How many inputs were cut to the model's maximum length (absent when none were)."""

LOADING_REASON = "the model is loading (weights, then one warm-up forward pass)"

_HTTP_KINDS = {404: ErrorKind.NOT_FOUND, 405: ErrorKind.METHOD_NOT_ALLOWED}


@dataclass(frozen=True)
class ServedModel:
    """How the model is named to clients, and what ``/v1/models`` reports about it."""

    name: str
    aliases: tuple[str, ...]
    blas: BlasInfo
    created: int

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class HttpOptions:
    """What the HTTP face accepts: from where, how much, how slowly."""

    access: AccessPolicy = field(default_factory=AccessPolicy)
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout: float = BODY_TIMEOUT


def create_app(
    service: EmbeddingService,
    served: ServedModel,
    options: HttpOptions | None = None,
    decoder: BodyDecoder | None = None,
) -> Starlette:
    """Build the app; loading starts when the app starts (uvicorn has the socket by then)."""
    options = options or HttpOptions()
    decoder = decoder or BodyDecoder()

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        service.start_loading()
        yield
        decoder.shutdown()
        await service.shutdown()

    reranker = service.settings.task == "rerank"

    def check_model(model: str) -> None:
        if model not in served.names:
            raise ApiError(
                ErrorKind.MODEL_NOT_FOUND,
                f"model {shown(model)} is not served here; use one of: " + ", ".join(served.names),
                param="model",
                code="model_not_found",
            )

    async def rerank(request: Request) -> Response:
        with service.admitted():
            raw = await read_body(
                request.receive,
                request.headers.get("content-length"),
                options.max_body_bytes,
                options.body_timeout,
            )
            parsed = await decoder.decode(raw, decode_rerank_request)
            check_model(parsed.model)
            result = await service.rerank(parsed.query, parsed.documents,
                                          parsed.max_tokens_per_doc)  # fmt: skip
        scores = result.logits.astype(np.float64) if parsed.raw_scores else relevance(
            result.logits)  # fmt: skip
        body = rerank_response(parsed, scores, result.total_tokens)
        headers: dict[str, str] = {}
        if any(result.truncated):
            headers[TRUNCATED_HEADER] = str(sum(result.truncated))
        return JSONResponse(body, headers=headers)

    async def embeddings(request: Request) -> Response:
        with service.admitted():  # 503 while loading, 429 when full: before reading the body
            raw = await read_body(
                request.receive,
                request.headers.get("content-length"),
                options.max_body_bytes,
                options.body_timeout,
            )
            parsed = await decoder.decode(raw)
            check_model(parsed.model)
            dimensions = _check_dimensions(parsed, service)
            if parsed.embedding_type in SCALED and not service.settings.normalize:
                raise invalid(
                    f"'embedding_type' {parsed.embedding_type} is defined on unit vectors and "
                    "this model's are not normalised; use binary, ubinary or float",
                    "embedding_type",
                )
            if parsed.token_ids:
                result = await service.embed_token_ids(parsed.token_ids, dimensions)
            else:
                result = await service.embed_texts(_with_prefix(parsed, service), dimensions)
        vectors = quantize(result.vectors, parsed.embedding_type)
        render = (vectors, parsed.model, result.total_tokens, parsed.encoding_format)
        if vectors.size <= INLINE_RENDER_FLOATS:
            content = _render(*render)  # ~0.1 ms: cheaper than a thread hop
        else:  # 2048 x 1024 floats take ~1 s to serialise: keep that off the event loop
            content = await asyncio.to_thread(_render, *render)
        headers: dict[str, str] = {}
        if any(result.truncated):
            headers[TRUNCATED_HEADER] = str(sum(result.truncated))
        return Response(content, media_type="application/json", headers=headers)

    def measured(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            return await _measured(handler, request)

        return run

    async def _measured(handler: Handler, request: Request) -> Response:
        started = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status_code
            return response
        except ApiError as exc:
            status = exc.kind.status
            service.metrics.errors.inc(type=exc.kind.label)
            raise
        except Exception:
            service.metrics.errors.inc(type="internal")
            raise
        finally:
            service.metrics.requests.inc(code=str(status))
            service.metrics.latency.observe(time.monotonic() - started)

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(served, service)]})

    async def model(request: Request) -> Response:
        if request.path_params["model_id"] not in served.names:
            raise ApiError(
                ErrorKind.MODEL_NOT_FOUND,
                f"model {shown(request.path_params['model_id'])} is not served here",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(_model_card(served, service))

    async def health(_: Request) -> Response:
        if service.status is Status.READY:
            return JSONResponse({"status": "ok"})
        if service.status is Status.FAILED:
            body = {"status": "failed", "reason": f"the model failed to load: {service.failure}"}
        else:
            body = {"status": "loading", "reason": LOADING_REASON}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    async def metrics(_: Request) -> Response:
        text = service.metrics.render(_model_info(served, service))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(_: Request) -> Response:
        settings = service.settings
        smallest = min(settings.matryoshka_dimensions, default=settings.dimension)
        vocab = service.vocab_size if service.status is Status.READY else None
        limits = ModelLimits((smallest, settings.dimension), vocab)
        return JSONResponse(openapi_document(served.names, options.max_body_bytes, limits,
                                             settings.task))  # fmt: skip

    def refused(reason: str) -> None:
        service.metrics.refused.inc(reason=reason)

    return Starlette(
        routes=[
            *(Route(path, measured(rerank if reranker else embeddings), methods=["POST"])
              for path in (RERANK_PATHS if reranker else EMBEDDINGS_PATHS)),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        middleware=[Middleware(AccessGuard, policy=options.access, on_refusal=refused)],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        lifespan=lifespan,
    )


def _render(
    vectors: np.ndarray, model: str, prompt_tokens: int, encoding_format: EncodingFormat
) -> bytes:
    body = embeddings_response(vectors, model, prompt_tokens, encoding_format)
    return json.dumps(body, separators=(",", ":")).encode()


def _check_dimensions(parsed: EmbeddingRequest, service: EmbeddingService) -> int | None:
    """``None`` for the full size; a smaller size only for a Matryoshka-trained model.

    Any size from the smallest trained one up to the full one is accepted (as OpenAI accepts
    any size): vectors are truncated, then re-normalised.
    """
    settings = service.settings
    full = settings.dimension
    if parsed.dimensions is None or parsed.dimensions == full:
        return None
    if not settings.matryoshka_dimensions:
        raise invalid(
            f"'dimensions' {shown(parsed.dimensions)} is not available: this model has no "
            "Matryoshka "
            f"support, so its vectors are always {full}-dimensional (omit 'dimensions' or send "
            f"{full})",
            "dimensions",
        )
    smallest = min(settings.matryoshka_dimensions)
    if not smallest <= parsed.dimensions <= full:
        trained = ", ".join(map(str, settings.matryoshka_dimensions))
        raise invalid(
            f"'dimensions' {shown(parsed.dimensions)} is out of range for this model: use "
            f"{smallest} to "
            f"{full} (trained sizes: {trained})",
            "dimensions",
        )
    return parsed.dimensions


def _with_prefix(parsed: EmbeddingRequest, service: EmbeddingService) -> list[str]:
    settings = service.settings
    prefix = {"query": settings.query_prefix, "document": settings.document_prefix}.get(
        parsed.input_type or "", ""
    )
    return [prefix + text for text in parsed.texts] if prefix else list(parsed.texts)


def _model_card(served: ServedModel, service: EmbeddingService) -> dict[str, Any]:
    settings = service.settings
    identity = service.fingerprint
    return {
        "id": served.name,
        "object": "model",
        "created": served.created,
        "owned_by": "mlx-stack",
        "aliases": list(served.aliases),
        "ready": service.status is Status.READY,
        "task": settings.task,
        "architecture": settings.architecture.model_type,
        "dimensions": settings.dimension,
        "matryoshka_dimensions": list(settings.matryoshka_dimensions),
        "max_seq_length": settings.max_seq_len,
        "truncation": service.options.truncate,
        "pooling": settings.pooling,
        "normalize": settings.normalize,
        "query_prefix": settings.query_prefix,
        "document_prefix": settings.document_prefix,
        "revision": identity.revision if identity else None,
        "content_sha256": identity.content_sha256 if identity else None,
        "hashed_files": list(identity.files) if identity else [],
        **_engine_fields(served, service),
        "max_batch_tokens": service.options.batch.max_batch_tokens,
        "batch_timeout_ms": service.options.batch.batch_timeout_ms,
        "max_concurrent": service.options.max_concurrent,
    }


def _model_info(served: ServedModel, service: EmbeddingService) -> dict[str, str]:
    identity = service.fingerprint
    return {
        "model": served.name,
        "architecture": service.settings.architecture.model_type,
        "content_sha256": identity.content_sha256 if identity else "",
        "blas": served.blas.name,
        "engine": _engine_fields(served, service)["engine"] or "",
    }


ONNX_BLAS = "ONNX Runtime's own kernels (MLAS)"


def _engine_fields(served: ServedModel, service: EmbeddingService) -> dict[str, Any]:
    """``engine`` (mlx or onnx, ``None`` while loading), the BLAS it uses, and why each was
    chosen."""
    choice = service.engine_choice
    loaded = service.status is Status.READY
    engine = choice.engine if choice is not None else ("mlx" if loaded else None)
    return {
        "engine": engine,
        "blas": ONNX_BLAS if engine == "onnx" else served.blas.describe(),
        "engine_choice": choice.card() if choice is not None else None,
        # kept under ONNX too: the choice still says what MLX (and a measurement) would use
        "blas_choice": served.blas.choice.card() if served.blas.choice is not None else None,
    }


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = _HTTP_KINDS.get(exc.status_code, ErrorKind.INVALID_REQUEST)
    message = f"{request.method} {request.url.path[:200]}: {exc.detail}"
    response = ApiError(kind, message).response()
    response.headers.update(exc.headers or {})  # Allow, on a 405
    return response


async def _unexpected_error(_: Request, exc: Exception) -> Response:
    """Last resort; Starlette re-raises afterwards, so uvicorn logs the traceback."""
    return ApiError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}").response()
