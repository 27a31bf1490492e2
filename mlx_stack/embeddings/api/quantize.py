"""Quantised embeddings for a fast first pass: int8, uint8, binary and ubinary vectors.

Cohere's ``embedding_types`` names (and sentence-transformers' ``quantize_embeddings``
precisions), asked for with the request field ``embedding_type``:

- ``binary`` / ``ubinary``: one bit per dimension, set where the value is positive, packed
  eight to a number, most significant bit first (``numpy.packbits``): ``ceil(d / 8)`` values,
  as int8 (-128..127) or uint8 (0..255). Compared by Hamming distance.
- ``int8`` / ``uint8``: each value of the unit vector scaled by a fixed calibration and
  rounded: ``int8 = clip(round(v / B * 127), -128, 127)``, ``uint8 = clip(round((v / B + 1)
  * 127.5), 0, 255)``, with ``B = min(1, 8 / sqrt(d))``. A unit vector's values are about
  ``1 / sqrt(d)`` in size and rarely beyond 8 times that, so ``B`` keeps the int8 grid fine
  where the values are and clips almost none. The calibration depends only on ``d``: the
  same text gives the same integers on every server and version, so stored vectors stay
  comparable (a calibration fitted on data would change with the data).

The values are sent as JSON integers, or, with ``encoding_format: base64``, as little-endian
float32 like any OpenAI vector (OpenAI's base64 *is* float32): every OpenAI client then
decodes the right values and length, where packed bytes would be misread as floats.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]
EMBEDDING_TYPES: tuple[EmbeddingType, ...] = ("float", "int8", "uint8", "binary", "ubinary")
SCALED: frozenset[str] = frozenset({"int8", "uint8"})
"""Types defined on unit vectors (the fixed calibration assumes them)."""


def int8_bound(dimension: int) -> float:
    """``B``: the magnitude mapped to the int8 grid's end (see the module docstring)."""
    return min(1.0, 8.0 / math.sqrt(max(dimension, 1)))


def quantize(vectors: np.ndarray, kind: EmbeddingType) -> np.ndarray:
    """``[n, d]`` float32 -> the values of ``kind`` (float32 for ``float``, else int16 holding
    the integers, ready for JSON or float32 base64)."""
    if kind == "float":
        return vectors
    if kind in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=1)
        return (packed.view(np.int8) if kind == "binary" else packed).astype(np.int16)
    scaled = vectors / int8_bound(vectors.shape[1])
    if kind == "int8":
        return np.clip(np.rint(scaled * 127.0), -128, 127).astype(np.int16)
    return np.clip(np.rint((scaled + 1.0) * 127.5), 0, 255).astype(np.int16)


def dequantize(values: np.ndarray, kind: EmbeddingType) -> np.ndarray:
    """Approximate float vectors back from int8/uint8 (for rescoring; bits have no inverse)."""
    if kind not in SCALED:
        raise ValueError(f"{kind} vectors have no float inverse")
    bound = int8_bound(values.shape[1])
    if kind == "int8":
        return values.astype(np.float32) / 127.0 * bound
    return (values.astype(np.float32) / 127.5 - 1.0) * bound
