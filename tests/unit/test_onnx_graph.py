"""The ONNX graph builder against a plain numpy BERT, in process (no server, no torch).

A tiny random-weight checkpoint (hub names, ``bert.`` prefix and all) goes through
``onnxgraph.build_from``, the ONNX checker and an ONNX Runtime session; the hidden states of
the real tokens must equal a numpy transcription of transformers' BERT (post-norm layers,
exact GELU, additive attention mask), for BERT positions and for XLM-RoBERTa's (offset by
the padding id). Served parity against sentence-transformers is in the e2e tier.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mlx_stack.embeddings.engine.onnxgraph import (
    EncoderShape,
    OnnxUnsupported,
    build_from,
    read_weights,
)

HIDDEN, HEADS, LAYERS, INNER, VOCAB, POSITIONS = 32, 4, 2, 64, 50, 24


def checkpoint(seed: int, offset: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": r(VOCAB, HIDDEN, scale=1.0),
        "embeddings.position_embeddings.weight": r(POSITIONS + offset, HIDDEN, scale=1.0),
        "embeddings.token_type_embeddings.weight": r(2, HIDDEN),
        "embeddings.LayerNorm.weight": 1 + r(HIDDEN, scale=0.1),
        "embeddings.LayerNorm.bias": r(HIDDEN, scale=0.1),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        for name, (rows, cols) in {"attention.self.query": (HIDDEN, HIDDEN),
                                   "attention.self.key": (HIDDEN, HIDDEN),
                                   "attention.self.value": (HIDDEN, HIDDEN),
                                   "attention.output.dense": (HIDDEN, HIDDEN),
                                   "intermediate.dense": (INNER, HIDDEN),
                                   "output.dense": (HIDDEN, INNER)}.items():  # fmt: skip
            w[f"{p}.{name}.weight"] = r(rows, cols, scale=cols**-0.5)
            w[f"{p}.{name}.bias"] = r(rows, scale=0.1)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"{p}.{norm}.weight"] = 1 + r(HIDDEN, scale=0.1)
            w[f"{p}.{norm}.bias"] = r(HIDDEN, scale=0.1)
    return w


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def reference(w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray, offset: int,
              eps: float) -> np.ndarray:  # fmt: skip
    """transformers' BertModel/XLMRobertaModel forward, token types 0, in float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    batch, tokens = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][offset : offset + tokens]
         + w["embeddings.token_type_embeddings.weight"][0])  # fmt: skip
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    head = HIDDEN // HEADS
    bias = (1.0 - mask[:, None, None, :]) * -1e9
    erf = np.vectorize(math.erf)
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"

        def dense(v: np.ndarray, name: str, p: str = p) -> np.ndarray:
            return v @ w[f"{p}.{name}.weight"].T + w[f"{p}.{name}.bias"]

        q, k, v = (dense(x, f"attention.self.{n}").reshape(batch, tokens, HEADS, head)
                   .transpose(0, 2, 1, 3) for n in ("query", "key", "value"))  # fmt: skip
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, HIDDEN)
        x = layer_norm(dense(context, "attention.output.dense") + x,
                       w[f"{p}.attention.output.LayerNorm.weight"],
                       w[f"{p}.attention.output.LayerNorm.bias"], eps)  # fmt: skip
        up = dense(x, "intermediate.dense")
        gelu = up * 0.5 * (1 + erf(up / math.sqrt(2)))
        x = layer_norm(dense(gelu, "output.dense") + x, w[f"{p}.output.LayerNorm.weight"],
                       w[f"{p}.output.LayerNorm.bias"], eps)  # fmt: skip
    return x


@pytest.mark.parametrize("attention", ["fused", "standard"])
@pytest.mark.parametrize(("model_type", "pad"), [("bert", 0), ("xlm-roberta", 1)])
def test_the_graph_computes_bert(attention: str, model_type: str, pad: int,
                                 tmp_path: Path) -> None:  # fmt: skip
    import onnx
    import onnxruntime as ort
    from safetensors.numpy import save_file

    config = {"model_type": model_type, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
              "num_hidden_layers": LAYERS, "layer_norm_eps": 1e-5, "pad_token_id": pad}  # fmt: skip
    shape = EncoderShape.from_config(config)
    weights = checkpoint(7, shape.position_offset)
    prefixed = {f"bert.{k}": v.astype(np.float16) if k.endswith("bias") else v
                for k, v in weights.items()}  # hub names; some arrays in half precision
    save_file(prefixed, str(tmp_path / "model.safetensors"))
    model = build_from(shape, read_weights(tmp_path), attention)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 5, 9, 13, 17, 2], [1, 30, 2, 0, 0, 0], [1, 2, 0, 0, 0, 0]], np.int32)
    mask = (np.arange(6)[None, :] < np.array([[6], [3], [2]])).astype(np.int32)
    (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    weights = {k: v.astype(np.float16).astype(np.float32) if k.endswith("bias") else v
               for k, v in weights.items()}
    expected = reference(weights, ids, mask.astype(np.float64), shape.position_offset, 1e-5)
    real = mask.astype(bool)
    assert hidden.shape == (3, 6, HIDDEN)
    np.testing.assert_allclose(hidden[real], expected[real], atol=2e-4)
    # one text alone gives the same states as inside the padded batch
    (alone,) = session.run(None, {"input_ids": ids[1:2, :3], "attention_mask": mask[1:2, :3]})
    np.testing.assert_allclose(alone[0], hidden[1, :3], atol=1e-5)


def test_a_missing_array_is_named() -> None:
    config = {"model_type": "bert", "hidden_size": HIDDEN, "num_attention_heads": HEADS,
              "num_hidden_layers": 1}  # fmt: skip
    shape = EncoderShape.from_config(config)
    weights = checkpoint(1, 0)
    del weights["encoder.layer.0.output.dense.weight"]
    with pytest.raises(OnnxUnsupported, match=r"no array 'encoder.layer.0.output.dense.weight'"):
        build_from(shape, weights)
