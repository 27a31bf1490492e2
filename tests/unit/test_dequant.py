"""The dequantiser against MLX's own ``mx.quantize``/``mx.dequantize``, and what it refuses.

MLX runs in process here (its CPU backend; nothing needs Metal). The folder-level check
(``LazyWeights`` expanding a checkpoint that MLX wrote, with a per-layer override and a
quantised embedding table) reads real safetensors files written by ``mx.save_safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlx_stack.embeddings.engine.dequant import (
    BITS,
    Quantisation,
    QuantisationUnsupported,
    Scheme,
    dequantize,
)
from mlx_stack.embeddings.engine.onnxgraph import LazyWeights, OnnxUnsupported

mx = pytest.importorskip("mlx.core")


def _mlx(shape: tuple[int, ...], bits: int, group: int, seed: int, dtype: Any = None) -> tuple:
    mx.random.seed(seed)
    w = mx.random.normal(shape)
    if dtype is not None:
        w = w.astype(dtype)
    packed, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    expected = mx.dequantize(packed, scales, biases, group_size=group, bits=bits)
    return packed, scales, biases, np.array(expected.astype(mx.float32))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", BITS)
def test_matches_mx_dequantize(bits: int, group: int) -> None:
    packed, scales, biases, expected = _mlx((24, 384), bits, group, seed=bits * group)
    got = dequantize(np.array(packed), np.array(scales), np.array(biases), Scheme(bits, group))
    assert got.dtype == np.float32 and got.shape == (24, 384)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got[0, :group])) <= 2**bits  # really the quantised values


def test_half_precision_scales_and_many_rows() -> None:
    """float16 scales (mlx-community's fp16 conversions), more rows than one chunk: the same
    values as MLX computes from those scales in float32; MLX in float16 rounds each result."""
    packed, scales, biases, in_half = _mlx((5000, 64), 4, 64, seed=1, dtype=mx.float16)
    got = dequantize(np.array(packed), np.array(scales), np.array(biases), Scheme(4, 64))
    wide = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                         group_size=64, bits=4)  # fmt: skip
    np.testing.assert_allclose(got, np.array(wide), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, in_half, rtol=0, atol=4e-3)


def test_three_dimensional_weights_keep_their_leading_axes() -> None:
    packed, scales, biases, expected = _mlx((2, 8, 128), 8, 64, seed=3)
    got = dequantize(np.array(packed), np.array(scales), np.array(biases), Scheme(8, 64))
    np.testing.assert_array_equal(got, expected)


def test_shapes_that_do_not_fit_the_scheme_are_named() -> None:
    packed, scales, biases, _ = _mlx((8, 128), 4, 64, seed=2)
    with pytest.raises(QuantisationUnsupported, match=r"layer.weight: packed \[8, 16\].*8 bits"):
        dequantize(np.array(packed), np.array(scales), np.array(biases), Scheme(8, 64),
                   "layer.weight")  # fmt: skip
    with pytest.raises(QuantisationUnsupported, match="not uint32"):
        dequantize(np.array(packed).astype(np.int64), np.array(scales), np.array(biases),
                   Scheme(4, 64))  # fmt: skip


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"bits": 4, "group_size": 32, "mode": "mxfp4"}, "quantization.mode 'mxfp4'"),
        ({"bits": 7, "group_size": 64}, "quantization.bits: 7"),
        ({"bits": 4}, "quantization.group_size: None is not a positive integer"),
        ({"bits": "4", "group_size": 64}, "quantization.bits: '4'"),
        ({"bits": 4, "group_size": 64, "lm_head": 3}, "quantization['lm_head']: 3"),
        ({"bits": 4, "group_size": 64, "x": {"bits": 1}}, "quantization['x'].bits: 1"),
        ({"bits": 4, "group_size": 64, "x": {"bits": 4, "mode": "nvfp4"}}, "'x'].mode 'nvfp4'"),
        ("4bit", "quantization: '4bit' is not an object"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(quantization: Any, message: str) -> None:
    with pytest.raises(QuantisationUnsupported) as caught:
        Quantisation.from_config({"quantization": quantization})
    assert message in str(caught.value)


def test_per_layer_overrides() -> None:
    q = Quantisation.from_config({"quantization": {
        "bits": 4, "group_size": 64, "model.layers.0.mlp.down_proj": {"bits": 8},
        "model.embed_tokens": False, "model.norm": True}})  # fmt: skip
    assert q is not None and q.default == Scheme(4, 64)
    assert q.scheme("model.layers.0.mlp.down_proj") == Scheme(8, 64)
    assert q.scheme("model.layers.1.mlp.down_proj") == Scheme(4, 64)
    assert q.overrides["model.embed_tokens"] is None
    assert Quantisation.from_config({}) is None


def _folder(tmp_path: Path, quantization: dict[str, Any]) -> dict[str, np.ndarray]:
    """A checkpoint as MLX writes one: a quantised table, one 8-bit override, a float norm."""
    table = _mlx((50, 64), 4, 32, seed=5)
    down = _mlx((16, 128), 8, 64, seed=6)
    arrays = {"model.embed_tokens.weight": table[0], "model.embed_tokens.scales": table[1],
              "model.embed_tokens.biases": table[2], "model.layers.0.mlp.down_proj.weight": down[0],
              "model.layers.0.mlp.down_proj.scales": down[1],
              "model.layers.0.mlp.down_proj.biases": down[2],
              "model.norm.weight": mx.ones((64,))}  # fmt: skip
    mx.save_safetensors(str(tmp_path / "model.safetensors"), arrays, metadata={"format": "mlx"})
    config = {"model_type": "qwen3", "quantization": quantization}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return {"embed_tokens.weight": table[3], "layers.0.mlp.down_proj.weight": down[3],
            "norm.weight": np.ones(64, np.float32)}  # fmt: skip


def test_lazy_weights_expand_a_folder_mlx_wrote(tmp_path: Path) -> None:
    down = {"bits": 8, "group_size": 64}
    expected = _folder(tmp_path, {"bits": 4, "group_size": 32,
                                  "model.layers.0.mlp.down_proj": down})  # fmt: skip
    weights = LazyWeights(tmp_path)
    assert sorted(weights) == sorted(expected)  # no scales/biases keys left over
    for key, value in expected.items():
        np.testing.assert_array_equal(weights.pop(key), value)
    assert len(weights) == 0


def test_a_wrong_override_is_an_onnx_refusal_naming_the_layer(tmp_path: Path) -> None:
    _folder(tmp_path, {"bits": 4, "group_size": 32})  # the 8-bit layer read as 4-bit
    weights = LazyWeights(tmp_path)
    with pytest.raises(OnnxUnsupported, match=r"model\.layers\.0\.mlp\.down_proj\.weight: packed"):
        weights["layers.0.mlp.down_proj.weight"]
