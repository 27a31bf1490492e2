"""Quantised embedding types (mlx_stack/embeddings/api/quantize.py) and their request field."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from mlx_stack.embeddings.api.apierror import ApiError
from mlx_stack.embeddings.api.protocol import embeddings_response, parse_request
from mlx_stack.embeddings.api.quantize import dequantize, int8_bound, quantize


def unit_vectors(n: int, d: int) -> np.ndarray:
    v = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_binary_is_packed_sign_bits_most_significant_first():
    v = np.array([[1, -1, 0.5, -0.1, 0, 2, -3, 0.01, -1]], dtype=np.float32)
    assert quantize(v, "ubinary").tolist() == [[0b10100101, 0]]
    assert quantize(v, "binary").tolist() == [[0b10100101 - 256, 0]]


@pytest.mark.parametrize("d", [64, 384, 1024])
def test_int8_keeps_unit_vectors_close_and_clips_almost_nothing(d):
    v = unit_vectors(200, d)
    for kind, low, high in (("int8", -128, 127), ("uint8", 0, 255)):
        q = quantize(v, kind)
        assert q.min() >= low and q.max() <= high
        clipped = np.mean((q == low) | (q == high))
        assert clipped < 1e-3
        back = dequantize(q, kind)
        cos = np.sum(back * v, axis=1) / np.linalg.norm(back, axis=1)
        assert cos.min() > 0.999
    assert int8_bound(64) == 1.0 and abs(int8_bound(1024) - 0.25) < 1e-12


def test_quantised_values_go_out_as_integers_and_as_float32_base64():
    q = quantize(unit_vectors(2, 16), "int8")
    as_json = embeddings_response(q, "m", 3, "float")["data"][0]["embedding"]
    assert all(type(x) is int for x in as_json)
    raw = embeddings_response(q, "m", 3, "base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(raw), "<f4").tolist() == as_json


def test_the_request_field():
    assert parse_request({"model": "m", "input": "x"}).embedding_type == "float"
    assert parse_request({"model": "m", "input": "x", "embedding_type": "binary"}
                         ).embedding_type == "binary"  # fmt: skip
    with pytest.raises(ApiError) as refused:
        parse_request({"model": "m", "input": "x", "embedding_type": "int4"})
    assert refused.value.param == "embedding_type"
