"""Decode a rerank request (Cohere's schema, which LiteLLM, Jina and infinity also speak) and
build its answer; pure functions, like ``protocol.py`` for embeddings.

The request: ``model``, ``query``, ``documents`` (strings, or objects with ``text``),
``top_n``, ``return_documents`` (default false, as Cohere's v2), ``max_tokens_per_doc``, and
the extension ``raw_scores`` (the logit instead of the probability). The answer holds
``results`` sorted by ``relevance_score`` (best first) with each document's ``index``, and
the tokens read in both usage forms clients look for (``meta`` as Cohere, ``usage`` as Jina).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from .apierror import invalid, shown
from .protocol import load_json

MAX_DOCUMENTS = 1000
"""Cohere's recommended maximum per request; more costs seconds on a CPU: split them."""


@dataclass(frozen=True)
class RerankRequest:
    model: str
    query: str
    documents: tuple[str, ...]
    top_n: int | None = None
    return_documents: bool = False
    max_tokens_per_doc: int | None = None
    raw_scores: bool = False


def decode_rerank_request(raw: bytes) -> RerankRequest:
    """JSON bytes -> a validated request (module level: the body decoder may run it in its
    child process)."""
    return parse_rerank_request(load_json(raw))


def parse_rerank_request(body: Any) -> RerankRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a non-empty string", "model")
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise invalid("'query' is required and must be a non-empty string", "query")
    _check_text(query, "query")
    return RerankRequest(
        model=model,
        query=query,
        documents=_documents(body.get("documents")),
        top_n=_positive(body, "top_n"),
        return_documents=_flag(body, "return_documents"),
        max_tokens_per_doc=_positive(body, "max_tokens_per_doc"),
        raw_scores=_flag(body, "raw_scores"),
    )


def _documents(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise invalid("'documents' is required: a non-empty list of strings (or of objects "
                      "with a 'text' string)", "documents")  # fmt: skip
    if len(raw) > MAX_DOCUMENTS:
        raise invalid(f"'documents' has {len(raw)} items > maximum {MAX_DOCUMENTS}; split "
                      "them over several requests", "documents")  # fmt: skip
    texts = []
    for index, item in enumerate(raw):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise invalid(f"'documents[{index}]' must be a string or an object with a 'text' "
                          f"string, got {shown(item)}", "documents")  # fmt: skip
        _check_text(text, f"documents[{index}]")
        texts.append(text)
    return tuple(texts)


def _check_text(text: str, name: str) -> None:
    """JSON can carry unpaired surrogates, which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"'{name}' is not valid Unicode (an unpaired surrogate at position "
                      f"{exc.start}); send UTF-8 text", name.split("[")[0]) from None  # fmt: skip


def _positive(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise invalid(f"'{name}' must be a positive integer, got {shown(value)}", name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false, got {shown(value)}", name)
    return value


def rerank_response(request: RerankRequest, scores: np.ndarray, tokens: int) -> dict[str, Any]:
    """Results best first (ties keep the documents' order), cut to ``top_n``."""
    order = np.argsort(-scores, kind="stable")
    if request.top_n is not None:
        order = order[: request.top_n]
    results = []
    for index in order.tolist():
        result: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
        if request.return_documents:
            result["document"] = {"text": request.documents[index]}
        results.append(result)
    return {
        "id": str(uuid.uuid4()),
        "model": request.model,
        "results": results,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                 "tokens": {"input_tokens": tokens, "output_tokens": 0}},
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }  # fmt: skip
