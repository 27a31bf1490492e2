"""The nomic_bert graph builder against plain numpy, in process.

Tiny random checkpoints under nomic's own names go through ``onnxnomic.build_from`` and an ONNX
Runtime session, with each attention form; the hidden states of the real tokens of a
right-padded batch must equal a float64 numpy transcription of ``model/nomic_bert.py`` (fused
Wqkv, rotate-half or interleaved rotary on a fraction of each head, dynamic NTK scaling past the
trained length, post-norm, SwiGLU/GeGLU/GELU, biases per flag). Configs the builder does not
handle are refused with the setting named. Served parity against transformers' NomicBertModel
and the MLX engine is in the e2e tier (``test_embeddings_nomic.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxrun
import pytest
from onnxrun import run, session

from mlx_stack.embeddings.engine import onnxencoder
from mlx_stack.embeddings.engine.onnxnomic import NomicShape, OnnxUnsupported, build, build_from

VOCAB = 40
BASE: dict[str, Any] = {
    "model_type": "nomic_bert", "activation_function": "swiglu", "n_embd": 32, "n_head": 4,
    "n_layer": 2, "n_inner": 256, "vocab_size": VOCAB, "type_vocab_size": 2,
    "layer_norm_epsilon": 1e-12, "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False, "rotary_scaling_factor": None,
    "max_trained_positions": 2048, "qkv_proj_bias": False, "mlp_fc1_bias": False,
    "mlp_fc2_bias": False, "prenorm": False, "causal": False, "use_rms_norm": False,
}  # fmt: skip
VARIANTS: dict[str, dict[str, Any]] = {
    "v1.5": {},
    "biases-interleaved-half": {"qkv_proj_bias": True, "mlp_fc1_bias": True,
                                "mlp_fc2_bias": True, "rotary_emb_interleaved": True,
                                "rotary_emb_fraction": 0.5, "activation_function": "geglu"},
    "plain-gelu": {"activation_function": "gelu", "n_inner": 48},
    "dynamic-ntk": {"rotary_scaling_factor": 2.0, "max_trained_positions": 4},
}  # fmt: skip


def config_of(variant: str) -> dict[str, Any]:
    return {**BASE, **VARIANTS[variant]}


def checkpoint(config: dict[str, Any], seed: int = 7) -> dict[str, np.ndarray]:
    shape = NomicShape.from_config(config)
    rng = np.random.default_rng(seed)
    width, inner = shape.hidden, shape.inner

    def r(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * 1.6 * dims[-1] ** -0.5).astype(np.float32)

    def near(value: float, size: int) -> np.ndarray:
        return (value + rng.standard_normal(size) * 0.1).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": rng.standard_normal((VOCAB, width)).astype(
             np.float32),
         "embeddings.token_type_embeddings.weight": r(2, width),
         "emb_ln.weight": near(1, width), "emb_ln.bias": near(0, width)}  # fmt: skip
    for i in range(shape.layers):
        p = f"encoder.layers.{i}"
        w |= {f"{p}.attn.Wqkv.weight": r(3 * width, width),
              f"{p}.attn.out_proj.weight": r(width, width),
              f"{p}.mlp.fc2.weight": r(width, inner)}  # fmt: skip
        fcs = ["fc11", "fc12"] if shape.activation != "gelu" else ["fc1"]
        w |= {f"{p}.mlp.{fc}.weight": r(inner, width) for fc in fcs}
        if shape.qkv_bias:
            w |= {f"{p}.attn.Wqkv.bias": near(0, 3 * width),
                  f"{p}.attn.out_proj.bias": near(0, width)}  # fmt: skip
        if shape.fc1_bias:
            w |= {f"{p}.mlp.{fc}.bias": near(0, inner) for fc in fcs}
        if shape.fc2_bias:
            w[f"{p}.mlp.fc2.bias"] = near(0, width)
        for norm in ("norm1", "norm2"):
            w |= {f"{p}.{norm}.weight": near(1, width), f"{p}.{norm}.bias": near(0, width)}
    return w


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def rope(x: np.ndarray, dims: int, base: float, interleaved: bool) -> np.ndarray:
    """mx.fast.rope over ``[batch, heads, tokens, head_dim]``: the first ``dims`` rotate."""
    angles = np.arange(x.shape[2])[:, None] * base ** -(np.arange(0, dims, 2) / dims)
    cos, sin = np.cos(angles), np.sin(angles)
    turned, kept = x[..., :dims], x[..., dims:]
    if interleaved:
        x1, x2 = turned[..., 0::2], turned[..., 1::2]
        out = np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(turned.shape)
    else:
        x1, x2 = turned[..., : dims // 2], turned[..., dims // 2 :]
        out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return np.concatenate([out, kept], axis=-1)


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def reference(shape: NomicShape, w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """One unpadded text, float64, as ``model/nomic_bert.py`` computes it."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    length, heads, hd = ids.shape[1], shape.heads, shape.head_dim
    base = shape.base
    if shape.scaling is not None and length > shape.trained:
        grown = shape.scaling * length / shape.trained - (shape.scaling - 1)
        base = base * grown ** (shape.rotary_dim / (shape.rotary_dim - 2))

    def linear(x: np.ndarray, key: str) -> np.ndarray:
        out = x @ w[f"{key}.weight"].T
        return out + w[f"{key}.bias"] if f"{key}.bias" in w else out

    x = w["embeddings.word_embeddings.weight"][ids]
    x = x + w["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, w["emb_ln.weight"], w["emb_ln.bias"], shape.eps)
    for i in range(shape.layers):
        p = f"encoder.layers.{i}"
        qkv = linear(x, f"{p}.attn.Wqkv").reshape(1, length, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        q, k = (rope(t, shape.rotary_dim, base, shape.interleaved) for t in qkv[:2])
        scores = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = (probs @ qkv[2]).transpose(0, 2, 1, 3).reshape(1, length, -1)
        x = layer_norm(x + linear(out, f"{p}.attn.out_proj"), w[f"{p}.norm1.weight"],
                       w[f"{p}.norm1.bias"], shape.eps)  # fmt: skip
        if shape.activation == "gelu":
            hidden = gelu(linear(x, f"{p}.mlp.fc1"))
        else:
            gate = linear(x, f"{p}.mlp.fc12")
            act = gate / (1 + np.exp(-gate)) if shape.activation == "swiglu" else gelu(gate)
            hidden = linear(x, f"{p}.mlp.fc11") * act
        x = layer_norm(x + linear(hidden, f"{p}.mlp.fc2"), w[f"{p}.norm2.weight"],
                       w[f"{p}.norm2.bias"], shape.eps)  # fmt: skip
    return x


def right_padded(seed: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return onnxrun.right_padded(seed, lengths, VOCAB)


@pytest.mark.parametrize("attention", ["mha", "opset23"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hidden_states_match_numpy_on_a_padded_batch(variant: str, attention: str) -> None:
    pytest.importorskip("onnxruntime")
    config = config_of(variant)
    shape = NomicShape.from_config(config)
    weights = checkpoint(config)
    expected_w = {k: v.copy() for k, v in weights.items()}
    sess = session(build_from(shape, weights, attention))
    lengths = [3, 3, 1] if variant == "dynamic-ntk" else [9, 4, 1]  # ntk: all within trained
    ids, mask = right_padded(3, lengths)
    served = run(sess, ids, mask)
    for row, n in enumerate(mask.sum(1)):
        alone = reference(shape, expected_w, ids[row : row + 1, :n])
        np.testing.assert_allclose(served[row, :n], alone[0], atol=2e-4, rtol=1e-3)


def test_dynamic_ntk_rescales_past_the_trained_length() -> None:
    """A 9-token text (trained: 4) matches nomic's grown base, not the plain one."""
    pytest.importorskip("onnxruntime")
    config = config_of("dynamic-ntk")
    shape = NomicShape.from_config(config)
    weights = checkpoint(config)
    expected_w = {k: v.copy() for k, v in weights.items()}
    sess = session(build_from(shape, weights))
    ids, mask = right_padded(4, [9])
    served = run(sess, ids, mask)[0]
    np.testing.assert_allclose(served, reference(shape, expected_w, ids)[0], atol=2e-4, rtol=1e-3)
    plain = reference(NomicShape.from_config({**config, "rotary_scaling_factor": None}),
                      expected_w, ids)  # fmt: skip
    assert float(np.abs(plain[0] - served).max()) > 1e-2


def test_attention_sees_every_real_token_and_no_padding() -> None:
    """Bidirectional: appending a token changes earlier states; padding changes nothing."""
    pytest.importorskip("onnxruntime")
    for attention in ("mha", "opset23"):
        sess = session(build_from(NomicShape.from_config(BASE), checkpoint(BASE), attention))
        ids, mask = right_padded(5, [6])
        before = run(sess, ids, mask)[0]
        longer = np.concatenate([ids, [[7]]], axis=1)
        assert float(np.abs(run(sess, longer, np.ones_like(longer))[0, :6] - before).max()) > 1e-3
        padded = np.concatenate([ids, [[7, 8]]], axis=1)
        pad_mask = np.concatenate([mask, [[0, 0]]], axis=1)
        np.testing.assert_allclose(run(sess, padded, pad_mask)[0, :6], before, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prenorm": True}, "prenorm true"),
        ({"causal": True}, "causal true"),
        ({"use_rms_norm": True}, "use_rms_norm true"),
        ({"activation_function": "relu"}, "activation_function 'relu'"),
        ({"rotary_emb_fraction": 0.0}, "rotary_emb_fraction"),
        ({"rotary_emb_fraction": 0.1}, "rotary_emb_fraction 0.1"),
        ({"n_head": 5}, "not divisible by 5 heads"),
        ({"n_layer": "two"}, "n_layer: 'two'"),
        ({"rotary_scaling_factor": -1}, "rotary_scaling_factor -1"),
        ({"quantization": {"bits": 4, "group_size": 64}}, "MLX-quantised"),
        ({"model_type": "bert"}, "model_type 'bert'"),
    ],
)
def test_unsupported_configs_are_refused_with_the_reason(change: dict[str, Any],
                                                         message: str) -> None:  # fmt: skip
    with pytest.raises(OnnxUnsupported) as caught:
        NomicShape.from_config({**BASE, **change})
    assert message in str(caught.value)


def test_gated_width_is_rounded_as_nomic_rounds_it() -> None:
    assert NomicShape.from_config({**BASE, "n_inner": None}).inner == 256  # 8*32/3=85 -> 256
    assert NomicShape.from_config({**BASE, "n_inner": 300}).inner == 512
    assert NomicShape.from_config({**BASE, "activation_function": "gelu",
                                   "n_inner": None}).inner == 128  # fmt: skip


def test_a_missing_array_is_named() -> None:
    weights = checkpoint(BASE)
    del weights["encoder.layers.1.mlp.fc12.weight"]
    with pytest.raises(OnnxUnsupported, match=r"no array 'encoder\.layers\.1\.mlp\.fc12\.weight'"):
        build_from(NomicShape.from_config(BASE), weights)


def test_build_reads_a_bert_prefixed_folder_and_the_engine_accepts_it(tmp_path: Path) -> None:
    """From disk: ``bert.``-prefixed names (nomic's published checkpoint) load; the engine's
    cheap check says yes to nomic_bert and names the refused setting otherwise."""
    pytest.importorskip("onnxruntime")
    from safetensors.numpy import save_file

    weights = checkpoint(BASE)
    save_file({f"bert.{k}": v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    import onnxruntime as ort

    sess = ort.InferenceSession(build(tmp_path), providers=["CPUExecutionProvider"])
    ids, mask = right_padded(6, [5])
    expected = reference(NomicShape.from_config(BASE), weights, ids)[0]
    np.testing.assert_allclose(run(sess, ids, mask)[0], expected, atol=2e-4, rtol=1e-3)
    assert "nomic_bert" in onnxencoder.SUPPORTED
