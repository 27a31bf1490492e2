"""Decode an OpenAI ``/v1/embeddings`` request body and build its response; pure functions.

Validation lives here so that every malformed request becomes an :class:`ApiError` (a 4xx)
before it reaches the model, and the messages state the limit that was broken. Token ids
become numpy arrays here: :func:`decode_request` may run in another process (``body.py``), and
an array crosses back in milliseconds where millions of Python ints take half a second.
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .apierror import invalid, shown
from .quantize import EMBEDDING_TYPES, EmbeddingType

MAX_INPUTS = 2048
"""OpenAI's limit on inputs per request."""
MAX_TOKEN_ID = 2**31 - 1
"""Token ids are held as int32; no vocabulary comes near (each model's is checked later)."""

EncodingFormat = Literal["float", "base64"]
InputType = Literal["query", "document"]


@dataclass(frozen=True, eq=False)
class EmbeddingRequest:
    """A validated request: exactly one of ``texts`` / ``token_ids`` is non-empty."""

    model: str
    texts: tuple[str, ...] = ()
    token_ids: tuple[np.ndarray, ...] = ()
    """One int32 array per input."""
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None
    input_type: InputType | None = None
    embedding_type: EmbeddingType = "float"
    """Extension: quantised vectors (``quantize.py``)."""


def decode_request(raw: bytes) -> EmbeddingRequest:
    """JSON bytes -> a validated request; every way the bytes can be wrong is a 400."""
    return parse_request(load_json(raw))


def load_json(raw: bytes) -> Any:
    """JSON bytes -> a value; empty, undecodable, too-deep or huge-integer bodies are 400s
    that say which (the proxy uses it too, for every body it checks)."""
    if not raw:
        raise invalid("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise invalid(
            f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
            "send JSON encoded as UTF-8"
        ) from None
    except ValueError:  # the only other one: an integer literal past Python's digit limit
        raise invalid(
            f"the request body holds an integer of more than {_max_digits()} digits; "
            "no field takes such a number"
        ) from None
    except RecursionError:
        raise invalid("the request body is nested too deeply to be an API request") from None
    return body


def _max_digits() -> int:
    return int(getattr(sys, "get_int_max_str_digits", lambda: 4300)())


def parse_request(body: Any) -> EmbeddingRequest:
    """Validate a decoded JSON body; unknown fields (``user``, provider extras) are ignored."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a non-empty string", "model")
    texts, token_ids = _parse_input(body.get("input"))
    encoding_format = body.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    if encoding_format not in ("float", "base64"):
        raise invalid(
            f"'encoding_format' must be 'float' or 'base64', got {shown(encoding_format)}",
            "encoding_format",
        )
    raw_dimensions = body.get("dimensions")
    dimensions = _integer(raw_dimensions)
    if raw_dimensions is not None and (dimensions is None or dimensions <= 0):
        raise invalid(
            f"'dimensions' must be a positive integer, got {shown(raw_dimensions)}", "dimensions"
        )
    input_type = body.get("input_type")
    if input_type is not None and input_type not in ("query", "document"):
        raise invalid(
            f"'input_type' must be 'query' or 'document', got {shown(input_type)}", "input_type"
        )
    embedding_type = body.get("embedding_type")
    if embedding_type is None:
        embedding_type = "float"
    if embedding_type not in EMBEDDING_TYPES:
        raise invalid(
            f"'embedding_type' must be one of {', '.join(EMBEDDING_TYPES)}, got "
            f"{shown(embedding_type)}",
            "embedding_type",
        )
    return EmbeddingRequest(
        embedding_type=embedding_type,
        model=model,
        texts=texts,
        token_ids=token_ids,
        encoding_format=encoding_format,
        dimensions=dimensions,
        input_type=input_type,
    )


def _parse_input(raw: Any) -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    """Accept a string, a list of strings, a token array, or a list of token arrays."""
    if raw is None:
        raise invalid("'input' is required: a string or a list of strings", "input")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise invalid("'input' must be a string, a list of strings or token arrays", "input")
    if not raw:
        raise invalid("'input' must not be an empty list", "input")
    if all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in raw):
        return (), (_token_array(raw, "input"),)  # one token array
    if len(raw) > MAX_INPUTS:
        raise invalid(f"'input' has {len(raw)} items > maximum {MAX_INPUTS}", "input")
    if all(isinstance(item, str) for item in raw):
        for index, text in enumerate(raw):
            if not text:
                raise invalid(f"'input[{index}]' is an empty string", "input")
            _check_unicode(index, text)
        return tuple(raw), ()
    if all(isinstance(item, list) for item in raw):
        arrays = []
        for index, ids in enumerate(raw):
            if not ids:
                raise invalid(f"'input[{index}]' is an empty token array", "input")
            arrays.append(_token_array(ids, f"input[{index}]"))
        return (), tuple(arrays)
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


def _token_array(items: list[Any], name: str) -> np.ndarray:
    """Token ids as int32 (the common all-``int`` case in a few C-speed passes)."""
    ids: list[Any] = items
    if not all(type(i) is int for i in items):
        ids = [_integer(i) for i in items]
    if None in ids or min(ids) < 0 or max(ids) > MAX_TOKEN_ID:
        raise invalid(
            f"'{name}' must hold only token ids: integers from 0 to {MAX_TOKEN_ID}", "input"
        )
    return np.array(ids, dtype=np.int32)


def _integer(value: Any) -> int | None:
    """JSON has one number type: ``12.0`` is the integer 12 (as JSON Schema says); ``true`` is
    not a number. ``None`` for anything that is not an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def encode_vector(vector: np.ndarray, encoding_format: EncodingFormat) -> list[float] | str:
    """OpenAI's wire forms: a JSON list, or base64 of little-endian float32 bytes (quantised
    values too: integers in JSON, their float32 values in base64)."""
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
