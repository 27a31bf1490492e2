"""Parse an OpenAI ``/v1/embeddings`` request body and build its response; pure functions.

Validation lives here so that every malformed request becomes an :class:`ApiError` (a 4xx)
before it reaches the model, and the messages state the limit that was broken.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .apierror import invalid

MAX_INPUTS = 2048
"""OpenAI's limit on inputs per request."""

EncodingFormat = Literal["float", "base64"]
InputType = Literal["query", "document"]


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated request: exactly one of ``texts`` / ``token_ids`` is non-empty."""

    model: str
    texts: tuple[str, ...] = ()
    token_ids: tuple[tuple[int, ...], ...] = ()
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None
    input_type: InputType | None = None


def parse_request(body: Any) -> EmbeddingRequest:
    """Validate a decoded JSON body; unknown fields (``user``, provider extras) are ignored."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a non-empty string", "model")
    texts, token_ids = _parse_input(body.get("input"))
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise invalid(
            f"'encoding_format' must be 'float' or 'base64', got {encoding_format!r}",
            "encoding_format",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions <= 0
    ):
        raise invalid(f"'dimensions' must be a positive integer, got {dimensions!r}", "dimensions")
    input_type = body.get("input_type")
    if input_type is not None and input_type not in ("query", "document"):
        raise invalid(
            f"'input_type' must be 'query' or 'document', got {input_type!r}", "input_type"
        )
    return EmbeddingRequest(
        model=model,
        texts=texts,
        token_ids=token_ids,
        encoding_format=encoding_format,
        dimensions=dimensions,
        input_type=input_type,
    )


def _parse_input(raw: Any) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """Accept a string, a list of strings, a token array, or a list of token arrays."""
    if raw is None:
        raise invalid("'input' is required: a string or a list of strings", "input")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise invalid("'input' must be a string, a list of strings or token arrays", "input")
    if not raw:
        raise invalid("'input' must not be an empty list", "input")
    if _is_token_array(raw):
        raw = [raw]
    if len(raw) > MAX_INPUTS:
        raise invalid(f"'input' has {len(raw)} items > maximum {MAX_INPUTS}", "input")
    if all(isinstance(item, str) for item in raw):
        for index, text in enumerate(raw):
            if not text:
                raise invalid(f"'input[{index}]' is an empty string", "input")
            _check_unicode(index, text)
        return tuple(raw), ()
    if all(isinstance(item, list) for item in raw):
        for index, ids in enumerate(raw):
            if not ids:
                raise invalid(f"'input[{index}]' is an empty token array", "input")
            if not _is_token_array(ids):
                raise invalid(f"'input[{index}]' must hold only non-negative integers", "input")
        return (), tuple(tuple(ids) for ids in raw)
    raise invalid(
        "'input' items must all be strings or all be token arrays (lists of integers)", "input"
    )


def _check_unicode(index: int, text: str) -> None:
    """JSON can carry unpaired surrogates (``"\\ud800"``), which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode("ascii")
        raise invalid(
            f"'input[{index}]' is not valid Unicode (unpaired surrogate {bad} at position "
            f"{exc.start}); send UTF-8 text",
            "input",
        ) from None


def _is_token_array(items: list[Any]) -> bool:
    return bool(items) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    )


def encode_vector(vector: np.ndarray, encoding_format: EncodingFormat) -> list[float] | str:
    """OpenAI's wire forms: a JSON list, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector.tolist()


def embeddings_response(
    vectors: np.ndarray, model: str, prompt_tokens: int, encoding_format: EncodingFormat
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
