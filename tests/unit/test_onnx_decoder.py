"""The decoder graph builder (qwen3, gemma3_text) against plain numpy, in process.

Tiny random checkpoints (hub names) go through ``onnxdecoder.build_from`` and an ONNX Runtime
session; the hidden states of the real tokens of a right-padded batch must equal a numpy
transcription of the models (RMSNorm, per-head q/k norms, rotate-half RoPE, grouped-query
attention, causal for qwen3, bidirectional with sliding windows for EmbeddingGemma, SwiGLU and
GELU-tanh MLPs). Configs the builder does not handle are refused with the setting named.
Served parity against sentence-transformers and the MLX engine is in the e2e tier.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxrun
import pytest
from onnxrun import run, session

from mlx_stack.embeddings.engine.onnxdecoder import (
    DecoderShape,
    OnnxUnsupported,
    build,
    build_from,
    read_dense,
)

VOCAB = 40
QWEN3: dict[str, Any] = {
    "model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "hidden_act": "silu", "rope_scaling": None,
    "attention_bias": False, "use_sliding_window": False, "vocab_size": VOCAB,
}  # fmt: skip
GEMMA: dict[str, Any] = {
    "model_type": "gemma3_text", "hidden_size": 32, "num_hidden_layers": 3,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "intermediate_size": 48, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 16, "sliding_window": 4,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    "use_bidirectional_attention": True, "hidden_activation": "gelu_pytorch_tanh",
    "vocab_size": VOCAB,
}  # fmt: skip


def checkpoint(config: dict[str, Any], seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    hd, heads, kv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    gemma = config["model_type"] == "gemma3_text"

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return (rng.standard_normal(size) * 0.1 + (0.0 if gemma else 1.0)).astype(np.float32)

    w = {"embed_tokens.weight": rng.standard_normal((VOCAB, hidden)).astype(np.float32),
         "norm.weight": norm(hidden)}  # fmt: skip
    norms = ["input_layernorm", "post_attention_layernorm"]
    if gemma:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}"
        w |= {f"{p}.self_attn.q_proj.weight": r(heads * hd, hidden),
              f"{p}.self_attn.k_proj.weight": r(kv * hd, hidden),
              f"{p}.self_attn.v_proj.weight": r(kv * hd, hidden),
              f"{p}.self_attn.o_proj.weight": r(hidden, heads * hd),
              f"{p}.self_attn.q_norm.weight": norm(hd), f"{p}.self_attn.k_norm.weight": norm(hd),
              f"{p}.mlp.gate_proj.weight": r(inner, hidden),
              f"{p}.mlp.up_proj.weight": r(inner, hidden),
              f"{p}.mlp.down_proj.weight": r(hidden, inner)}  # fmt: skip
        w |= {f"{p}.{n}.weight": norm(hidden) for n in norms}
    return w


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE over ``[batch, heads, tokens, head_dim]``, positions from 0."""
    half = x.shape[-1] // 2
    angles = np.arange(x.shape[2])[:, None] * theta ** -(np.arange(0, 2 * half, 2) / (2 * half))
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference(config: dict[str, Any], w: dict[str, np.ndarray], ids: np.ndarray,
              mask: np.ndarray) -> np.ndarray:  # fmt: skip
    """Both decoders in float64 numpy, read from transformers' and MLX's model files."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    gemma = config["model_type"] == "gemma3_text"
    eps, hd = config["rms_norm_eps"], config["head_dim"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    batch, length = ids.shape

    def nw(key: str) -> np.ndarray:
        return 1.0 + w[key] if gemma else w[key]

    x = w["embed_tokens.weight"][ids] * (math.sqrt(config["hidden_size"]) if gemma else 1.0)
    i_pos, j_pos = np.arange(length)[:, None], np.arange(length)[None, :]
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}"
        sliding = gemma and config["layer_types"][i] == "sliding_attention"
        theta = config["rope_local_base_freq"] if sliding else config["rope_theta"]
        h = rms(x, nw(f"{p}.input_layernorm.weight"), eps)

        def heads_of(name: str, n: int, h: np.ndarray = h, p: str = p) -> np.ndarray:
            out = (h @ w[f"{p}.self_attn.{name}_proj.weight"].T).reshape(batch, length, n, hd)
            return out.transpose(0, 2, 1, 3)

        q = rope(rms(heads_of("q", heads), nw(f"{p}.self_attn.q_norm.weight"), eps), theta)
        k = rope(rms(heads_of("k", kv), nw(f"{p}.self_attn.k_norm.weight"), eps), theta)
        v = heads_of("v", kv)
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        if gemma:
            visible = mask[:, None, None, :].astype(bool) & np.ones((length, length), bool)
            if sliding:
                visible = visible & (np.abs(i_pos - j_pos) <= config["sliding_window"] // 2)
            scale = config["query_pre_attn_scalar"] ** -0.5
        else:
            visible = np.broadcast_to(j_pos <= i_pos, (batch, 1, length, length))
            scale = hd**-0.5
        scores = np.where(visible, q @ k.transpose(0, 1, 3, 2) * scale, -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, heads * hd)
        out = out @ w[f"{p}.self_attn.o_proj.weight"].T
        if gemma:
            x = x + rms(out, nw(f"{p}.post_attention_layernorm.weight"), eps)
            h = rms(x, nw(f"{p}.pre_feedforward_layernorm.weight"), eps)
        else:
            x = x + out
            h = rms(x, nw(f"{p}.post_attention_layernorm.weight"), eps)
        gate, up = h @ w[f"{p}.mlp.gate_proj.weight"].T, h @ w[f"{p}.mlp.up_proj.weight"].T
        if gemma:
            act = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
        else:
            act = gate / (1 + np.exp(-gate))
        out = (act * up) @ w[f"{p}.mlp.down_proj.weight"].T
        if gemma:
            out = rms(out, nw(f"{p}.post_feedforward_layernorm.weight"), eps)
        x = x + out
    return rms(x, nw("norm.weight"), eps)


def right_padded(seed: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return onnxrun.right_padded(seed, lengths, VOCAB)


@pytest.mark.parametrize("config", [QWEN3, GEMMA], ids=["qwen3", "gemma3_text"])
def test_hidden_states_match_numpy_on_a_padded_batch(config: dict[str, Any]) -> None:
    pytest.importorskip("onnxruntime")
    weights = checkpoint(config)
    expected_w = {k: v.copy() for k, v in weights.items()}
    sess = session(build_from(DecoderShape.from_config(config), weights))
    ids, mask = right_padded(3, [11, 4, 1])  # longer than gemma's window: the window matters
    served = run(sess, ids, mask)
    for row, n in enumerate(mask.sum(1)):
        alone = reference(config, expected_w, ids[row : row + 1, :n], mask[row : row + 1, :n])
        np.testing.assert_allclose(served[row, :n], alone[0], atol=2e-4, rtol=1e-3)
    # the window really cuts: a global-only reading of the same text differs
    if config is GEMMA:
        wide = {**config, "layer_types": ["full_attention"] * 3}
        other = reference(wide, expected_w, ids[:1], mask[:1])
        assert float(np.abs(other[0] - served[0]).max()) > 1e-2


def test_qwen3_is_causal_and_gemma_is_not() -> None:
    """Appending a token changes no earlier qwen3 state but every gemma one (bidirectional)."""
    pytest.importorskip("onnxruntime")
    for config, changes in ((QWEN3, False), (GEMMA, True)):
        sess = session(build_from(DecoderShape.from_config(config), checkpoint(config)))
        ids, mask = right_padded(5, [6])
        longer = np.concatenate([ids, [[7]]], axis=1)
        before = run(sess, ids, mask)[0]
        after = run(sess, longer, np.ones_like(longer))[0, :6]
        assert (float(np.abs(after - before).max()) > 1e-3) is changes, config["model_type"]


def test_layer_types_come_from_the_pattern_when_absent() -> None:
    config = {k: v for k, v in GEMMA.items() if k != "layer_types"}
    shape = DecoderShape.from_config({**config, "num_hidden_layers": 6, "sliding_window_pattern": 3,
                                      "sliding_window": 512})  # fmt: skip
    assert shape.windows == (256, 256, None, 256, 256, None)
    assert shape.thetas == (10000.0, 10000.0, 1000000.0) * 2
    assert shape.scale == pytest.approx(16**-0.5)
    qwen = DecoderShape.from_config({k: v for k, v in QWEN3.items() if k != "head_dim"})
    assert qwen.head_dim == 8 and qwen.windows == (None, None)


@pytest.mark.parametrize(
    ("base", "change", "message"),
    [
        (QWEN3, {"quantization": {"bits": 4, "group_size": 32, "mode": "mxfp4"}}, "mode 'mxfp4'"),
        (QWEN3, {"quantization": {"bits": 7, "group_size": 64}}, "quantization.bits: 7"),
        (QWEN3, {"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_scaling"),
        (QWEN3, {"attention_bias": True}, "attention_bias"),
        (QWEN3, {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        (QWEN3, {"use_sliding_window": True}, "use_sliding_window"),
        (QWEN3, {"num_key_value_heads": 3}, "not a multiple of 3 key/value heads"),
        (QWEN3, {"hidden_size": "32"}, "hidden_size: '32' is not a positive integer"),
        (QWEN3, {"head_dim": 7}, "head_dim 7 is odd"),
        (GEMMA, {"use_bidirectional_attention": False}, "a causal Gemma 3"),
        (GEMMA, {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
        (GEMMA, {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        (GEMMA, {"layer_types": ["sliding_attention"]}, "layer_types"),
        (GEMMA, {"layer_types": ["chunked_attention"] * 3}, "layer_types"),
        (GEMMA, {"model_type": "llama"}, "model_type 'llama'"),
    ],
)  # fmt: skip
def test_unsupported_configs_are_refused_with_the_reason(
    base: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    with pytest.raises(OnnxUnsupported) as caught:
        DecoderShape.from_config({**base, **change})
    assert message in str(caught.value)


def test_a_missing_or_misshapen_array_is_named() -> None:
    shape = DecoderShape.from_config(QWEN3)
    weights = checkpoint(QWEN3)
    del weights["layers.1.mlp.up_proj.weight"]
    with pytest.raises(OnnxUnsupported, match=r"no array 'layers\.1\.mlp\.up_proj\.weight'"):
        build_from(shape, weights)
    weights = checkpoint(QWEN3)
    weights["layers.0.self_attn.k_proj.weight"] = weights["layers.0.self_attn.q_proj.weight"]
    with pytest.raises(OnnxUnsupported, match=r"layers.0.self_attn: q/k/v projections"):
        build_from(shape, weights)


def test_build_writes_the_graph_and_its_weights_privately(tmp_path: Path) -> None:
    """From a hub-style folder (``model.`` prefixes, bfloat16 arrays, an unused ``lm_head``)
    to ``<name>.onnx`` + ``<name>.onnx.data``, which serve what the in-memory graph does."""
    import json

    import ml_dtypes
    from safetensors.numpy import save_file

    ort = pytest.importorskip("onnxruntime")
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in checkpoint(QWEN3).items()}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3))
    save_file({f"model.{k}": v for k, v in weights.items()} | {"lm_head.weight": weights[
        "embed_tokens.weight"]}, str(folder / "model.safetensors"))  # fmt: skip
    path = tmp_path / "cache" / "x-d1.onnx"
    build(folder, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x-d1.onnx", "x-d1.onnx.data"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in path.parent.iterdir())
    assert path.stat().st_size < 20_000 < (path.parent / "x-d1.onnx.data").stat().st_size
    as_float = {k: v.astype(np.float32) for k, v in weights.items()}
    inline = session(build_from(DecoderShape.from_config(QWEN3), as_float))
    ids, mask = right_padded(1, [5, 3])
    from_file = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(run(from_file, ids, mask), run(inline, ids, mask))
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(OnnxUnsupported, match="cannot read"):
        build(folder, tmp_path / "other" / "y.onnx")
    assert list((tmp_path / "other").iterdir()) == []  # no partial files left


def test_dense_layers_are_read_in_modules_order(tmp_path: Path) -> None:
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal(s).astype(np.float32) for s in ((8, 4), (4, 8)))
    modules = [
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 2, "path": "1_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    for name, weight in (("2_Dense", first), ("1_Dense", second)):
        (tmp_path / name).mkdir()
        save_file({"linear.weight": weight}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(
            json.dumps({"activation_function": "torch.nn.modules.linear.Identity"})
        )
    layers = read_dense(tmp_path)
    assert [w.shape for w, _ in layers] == [(4, 8), (8, 4)]
    np.testing.assert_array_equal(layers[0][0], first.T)
    assert all(b is None for _, b in layers)
    (tmp_path / "1_Dense" / "config.json").write_text(
        json.dumps({"activation_function": "torch.nn.modules.activation.Tanh"})
    )
    with pytest.raises(OnnxUnsupported, match="Dense activation"):
        read_dense(tmp_path)
    assert read_dense(tmp_path / "2_Dense") == []  # no modules.json: no Dense layers
