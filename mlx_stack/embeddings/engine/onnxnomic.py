"""Build NomicBERT (``nomic_bert``, nomic-embed-text v1/v1.5) as an ONNX graph.

Same approach as ``onnxgraph.py`` (weights read with ``safetensors``, nodes written with the
onnx helpers, no torch). Each step mirrors ``model/nomic_bert.py``, the MLX model the other
engine runs, so both give the same vectors: word embeddings plus token type 0, LayerNorm,
then post-norm layers of a fused ``Wqkv`` projection, rotary positions on q and k (opset 23
``RotaryEmbedding``: rotate-half or interleaved, a fraction of each head), bidirectional
attention over the real tokens, ``out_proj``, add & LayerNorm (ORT's
``SkipLayerNormalization``), a SwiGLU/GeGLU (``fc11`` up, ``fc12`` gated) or plain GELU
(``fc1``) feed-forward, ``fc2``, add & LayerNorm. Biases follow ``qkv_proj_bias`` /
``mlp_fc1_bias`` / ``mlp_fc2_bias``. nomic's dynamic NTK scaling (``rotary_scaling_factor``)
is computed in the graph from the batch's length, as the MLX model does per batch.

The attention itself is ``com.microsoft.MultiHeadAttention`` (``mha``, the default) or the
standard opset 23 ``Attention`` (``opset23``), after rotary: ORT's fused ``Attention`` takes
the input before the projection, where rotary cannot go. ``bench/onnx_nomic.py`` measured
which is faster (the module's ``ATTENTION`` note).

The graph takes right-padded ``input_ids`` and ``attention_mask`` (int32 ``[batch, tokens]``)
and returns ``last_hidden_state``; pooling is applied after it by ``onnxencoder.py``.
nomic-embed-text-v1.5 is 0.55 GB in float32: its initialisers fit inside one protobuf.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .onnxgraph import MS_DOMAIN, Graph, LazyWeights, OnnxUnsupported

OPSET = 23
SUPPORTED = ("nomic_bert",)
GRAPH_VERSION = 1
"""Bumped when this module builds a different graph: older cached files are not reused."""
ATTENTION = "mha"
"""``mha`` (``com.microsoft.MultiHeadAttention``) or ``opset23`` (``Attention``). Measured at
nomic-embed-text-v1.5's size (AMD EPYC, 2 cores, AVX2, load ~3): 114 vs 118 ms for 8 tokens,
2.41 vs 2.82 s for 8 x 32 tokens: ``mha``."""
_GATED = {"swiglu": "silu", "geglu": "gelu"}
_PLAIN = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")
"""nomic's code applies the exact GELU for every ``gelu*`` name (as ``model/nomic_bert.py``)."""


@dataclass(frozen=True)
class NomicShape:
    """What the graph needs from nomic's config.json (its own GPT-2 style key names)."""

    hidden: int
    heads: int
    layers: int
    inner: int
    eps: float
    activation: str
    rotary_dim: int
    base: float
    interleaved: bool
    scaling: float | None
    trained: int
    qkv_bias: bool
    fc1_bias: bool
    fc2_bias: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NomicShape:
        """Raises :class:`OnnxUnsupported` naming the setting this builder does not handle."""
        model_type = str(config.get("model_type", "")).replace("-", "_")
        if model_type not in SUPPORTED:
            raise OnnxUnsupported(f"model_type {model_type!r} (not nomic_bert)")
        if isinstance(config.get("quantization"), dict):
            raise OnnxUnsupported("an MLX-quantised folder")
        for flag, why in (("prenorm", "only post-norm"), ("causal", "not an embedding model"),
                          ("use_rms_norm", "LayerNorm only")):  # fmt: skip
            if config.get(flag):
                raise OnnxUnsupported(f"{flag} true ({why})")
        activation = str(config.get("activation_function", "swiglu"))
        if activation not in _GATED and activation not in _PLAIN:
            raise OnnxUnsupported(f"activation_function {activation!r}")
        hidden, heads = _int(config, "n_embd"), _int(config, "n_head")
        if hidden % heads:
            raise OnnxUnsupported(f"n_embd {hidden} not divisible by {heads} heads")
        fraction = float(config.get("rotary_emb_fraction") or 0.0)
        rotary_dim = int(hidden // heads * fraction)
        if rotary_dim <= 0 or rotary_dim % 2:
            raise OnnxUnsupported(f"rotary_emb_fraction {fraction} ({rotary_dim} rotary dims "
                                  "per head: rotary needs a positive even number)")  # fmt: skip
        inner = config.get("n_inner")
        if activation in _GATED:  # nomic rounds the gated width up to a multiple of 256
            inner = -(-(inner or int(8 * hidden / 3)) // 256) * 256
        else:
            inner = inner or 4 * hidden
        scaling = config.get("rotary_scaling_factor")
        number = isinstance(scaling, int | float) and not isinstance(scaling, bool)
        if scaling is not None and (not number or scaling <= 0):
            raise OnnxUnsupported(f"rotary_scaling_factor {scaling!r} (a positive number)")
        if scaling is not None and rotary_dim <= 2:
            raise OnnxUnsupported(f"rotary_scaling_factor with {rotary_dim} rotary dimensions")
        return cls(
            hidden, heads, _int(config, "n_layer"), int(inner),
            float(config.get("layer_norm_epsilon", 1e-12)), activation, rotary_dim,
            float(config.get("rotary_emb_base", 10_000.0)),
            bool(config.get("rotary_emb_interleaved", False)),
            float(scaling) if scaling is not None else None,
            _int(config, "max_trained_positions", 2048),
            bool(config.get("qkv_proj_bias", True)), bool(config.get("mlp_fc1_bias", True)),
            bool(config.get("mlp_fc2_bias", True)),
        )  # fmt: skip


def _int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OnnxUnsupported(f"config.json {key}: {value!r} is not a positive integer")
    return value


def build(folder: Path, attention: str = ATTENTION) -> bytes:
    """The serialised ONNX model for ``folder``; raises :class:`OnnxUnsupported`."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise OnnxUnsupported(f"{folder}/config.json is not an object")
    model = build_from(NomicShape.from_config(config), LazyWeights(folder), attention)
    return bytes(model.SerializeToString())


def build_from(shape: NomicShape, w: MutableMapping[str, np.ndarray],
               attention: str = ATTENTION) -> Any:  # fmt: skip
    """The ``onnx.ModelProto`` for ``shape`` with weights ``w`` (keys without ``bert.``)."""

    if attention not in ("mha", "opset23"):
        raise ValueError(f"attention {attention!r}: mha or opset23")
    graph = Graph(w)
    word = graph.weight("embeddings.word_embeddings.weight")
    graph.node("Gather", [word, "input_ids"], ["words"], axis=0)
    x = "words"
    types = w.pop("embeddings.token_type_embeddings.weight", None)
    if types is not None:  # one text: token type 0 everywhere, as the MLX model
        graph.node("Add", ["words", graph.init("token_type_0", types[0])], ["embedded"])
        x = "embedded"
    x = graph.layer_norm(x, "emb_ln", shape.eps)
    _rotary_tables(graph, shape)
    _mask(graph, attention)
    for i in range(shape.layers):
        x = _layer(graph, shape, f"encoder.layers.{i}", x, attention)
    return graph.model(x, shape.hidden, "mlx-stack nomic_bert encoder", OPSET,
                       ir_version=10)


def _rotary_tables(graph: Graph, shape: NomicShape) -> None:
    """``position_ids`` ``[batch, tokens]``, ``cos``/``sin`` ``[tokens, rotary_dim / 2]``.

    Dynamic NTK: past ``trained`` tokens nomic uses the base ``b * g ** (d / (d - 2))`` with
    ``g = factor * tokens / trained - (factor - 1)``, so each frequency ``base ** (-2i / d)``
    is the unscaled one times ``g ** (-2i / (d - 2))``; ``g <= 1`` up to ``trained`` tokens,
    hence ``max(g, 1)`` covers both cases in one expression."""
    from onnx import TensorProto

    d = shape.rotary_dim
    graph.positions()
    steps = np.arange(0, d, 2, dtype=np.float64) / d
    inv = (shape.base**-steps).astype(np.float32)[None, :]
    graph.init("inv_freq", inv)
    frequencies = "inv_freq"
    if shape.scaling is not None:
        factor = shape.scaling
        graph.node("Cast", ["length"], ["length_f"], to=TensorProto.FLOAT)
        graph.node("Mul", ["length_f", graph.const("ntk_slope", np.array(
            factor / shape.trained, np.float32))], ["ntk_grown"])  # fmt: skip
        graph.node("Sub", ["ntk_grown", graph.const("ntk_shift", np.array(factor - 1,
                                                                           np.float32))],
                   ["ntk_g"])  # fmt: skip
        graph.node("Max", ["ntk_g", graph.const("f_one", np.array(1.0, np.float32))],
                   ["ntk_g1"])  # fmt: skip
        powers = (-np.arange(0, d, 2, dtype=np.float64) / (d - 2)).astype(np.float32)[None, :]
        graph.node("Pow", ["ntk_g1", graph.init("ntk_powers", powers)], ["ntk_scale"])
        graph.node("Mul", ["inv_freq", "ntk_scale"], ["inv_freq_scaled"])
        frequencies = "inv_freq_scaled"
    graph.node("Mul", ["pos_col", frequencies], ["angles"])
    graph.node("Cos", ["angles"], ["cos"])
    graph.node("Sin", ["angles"], ["sin"])


def _mask(graph: Graph, attention: str) -> None:
    """``mha``: the int32 key padding mask as given. ``opset23``: an additive float mask
    ``[batch, 1, tokens, tokens]`` (the query axis spelt out, as that operator wants), masked
    keys at float32's lowest finite value so a padding row stays finite."""

    if attention == "mha":
        return
    graph.key_padding_mask()


def _linear(graph: Graph, x: str, key: str, bias: bool, out: str) -> str:
    """``x @ W.T (+ b)``: the bias as its own Add (ORT fuses MatMul+Add into a Gemm-like op)."""
    graph.node("MatMul", [x, graph.transposed(f"{key}.weight")], [out if not bias else f"{out}.mm"])
    if bias:
        graph.node("Add", [f"{out}.mm", graph.weight(f"{key}.bias")], [out])
    return out


def _layer(graph: Graph, shape: NomicShape, p: str, x: str, attention: str) -> str:
    """``norm1(x + attn(x))`` then ``norm2(h + mlp(h))``, each add & norm one ORT node."""
    context = _attention(graph, shape, f"{p}.attn", x, attention)
    attended = _dense_skip_norm(graph, shape, context, x, f"{p}.attn.out_proj", shape.qkv_bias,
                                f"{p}.norm1")  # fmt: skip
    hidden = _feed_forward(graph, shape, f"{p}.mlp", attended)
    return _dense_skip_norm(graph, shape, hidden, attended, f"{p}.mlp.fc2", shape.fc2_bias,
                            f"{p}.norm2")  # fmt: skip


def _dense_skip_norm(graph: Graph, shape: NomicShape, x: str, skip: str, dense: str, bias: bool,
                     norm: str) -> str:  # fmt: skip
    """LayerNorm(x @ W.T (+ b) + skip): the bias goes into the fused norm node."""
    graph.node("MatMul", [x, graph.transposed(f"{dense}.weight")], [f"{dense}.mm"])
    inputs = [f"{dense}.mm", skip, graph.weight(f"{norm}.weight"), graph.weight(f"{norm}.bias")]
    if bias:
        inputs.append(graph.weight(f"{dense}.bias"))
    graph.node("SkipLayerNormalization", inputs, [f"{norm}.out"], domain=MS_DOMAIN,
               epsilon=shape.eps)  # fmt: skip
    return f"{norm}.out"


def _attention(graph: Graph, shape: NomicShape, p: str, x: str, attention: str) -> str:
    """Fused ``Wqkv`` product, split, rotary on q and k, then the chosen attention node."""
    qkv = _linear(graph, x, f"{p}.Wqkv", shape.qkv_bias, f"{p}.qkv")
    graph.node("Split", [qkv], [f"{p}.q", f"{p}.k", f"{p}.v"], axis=-1, num_outputs=3)
    rotary: dict[str, Any] = {"num_heads": shape.heads, "interleaved": int(shape.interleaved)}
    if shape.rotary_dim != shape.head_dim:
        rotary["rotary_embedding_dim"] = shape.rotary_dim
    for part in ("q", "k"):
        graph.node("RotaryEmbedding", [f"{p}.{part}", "cos", "sin", "position_ids"],
                   [f"{p}.{part}.rot"], **rotary)  # fmt: skip
    inputs = [f"{p}.q.rot", f"{p}.k.rot", f"{p}.v"]
    scale = float(shape.head_dim**-0.5)
    if attention == "mha":
        graph.node("MultiHeadAttention", [*inputs, "", "attention_mask"], [f"{p}.context"],
                   domain=MS_DOMAIN, num_heads=shape.heads, scale=scale)  # fmt: skip
    else:
        graph.node("Attention", [*inputs, "mask_full"], [f"{p}.context"],
                   q_num_heads=shape.heads, kv_num_heads=shape.heads, scale=scale)  # fmt: skip
    return f"{p}.context"


def _feed_forward(graph: Graph, shape: NomicShape, p: str, x: str) -> str:
    """Gated: ``fc11(x) * act(fc12(x))`` (both products as one); plain: ``gelu(fc1(x))``."""
    if shape.activation not in _GATED:
        up = _linear(graph, x, f"{p}.fc1", shape.fc1_bias, f"{p}.up")
        graph.node("Gelu", [up], [f"{p}.act"])
        return f"{p}.act"
    up, gate = graph.take(f"{p}.fc11.weight"), graph.take(f"{p}.fc12.weight")
    graph.init(f"{p}.fc1112.wT", np.concatenate([up, gate], axis=0).T)
    del up, gate
    fused = f"{p}.upgate"
    graph.node("MatMul", [x, f"{p}.fc1112.wT"], [fused if not shape.fc1_bias else f"{fused}.mm"])
    if shape.fc1_bias:
        bias = np.concatenate([graph.take(f"{p}.fc11.bias"), graph.take(f"{p}.fc12.bias")])
        graph.node("Add", [f"{fused}.mm", graph.init(f"{p}.fc1112.b", bias)], [fused])
    graph.node("Split", [fused], [f"{p}.up", f"{p}.gate"], axis=-1, num_outputs=2)
    if _GATED[shape.activation] == "silu":
        graph.node("Sigmoid", [f"{p}.gate"], [f"{p}.sig"])
        graph.node("Mul", [f"{p}.gate", f"{p}.sig"], [f"{p}.act"])
    else:
        graph.node("Gelu", [f"{p}.gate"], [f"{p}.act"])
    graph.node("Mul", [f"{p}.up", f"{p}.act"], [f"{p}.gated"])
    return f"{p}.gated"
