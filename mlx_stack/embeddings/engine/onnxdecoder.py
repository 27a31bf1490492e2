"""Build a decoder-family embedder (Qwen3-Embedding, EmbeddingGemma) as an ONNX graph.

Same approach as ``onnxgraph.py`` (weights read with ``safetensors``, nodes written with the
onnx helpers, no torch), with the operators ONNX Runtime 1.32's CPU provider runs for these
models, checked by running them: opset 23 ``Attention`` (grouped-query heads natively, a causal
flag or an additive mask), ``RotaryEmbedding`` and ``RMSNormalization``, and ORT's
``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm in one node, which also returns
the sum for the next residual) and ``FastGelu`` (the tanh GELU).

Each step mirrors the MLX models the other engine runs (mlx-embeddings' ``qwen3``, mlx-lm's
``gemma3_text`` as ``model/network.py`` drives it), so both engines give the same vectors:

- qwen3: pre-norm layers, q/k RMSNorm per head, rotate-half RoPE, causal attention, SwiGLU.
  Right padding (``pad_batch``) needs no padding mask: a causal token never sees the padding
  after it, and last-token pooling reads each row's last real token.
- gemma3_text as EmbeddingGemma: embeddings times sqrt(hidden), RMSNorm by ``1 + weight``,
  norms before and after attention and MLP, GELU-tanh gated MLP, the scale
  ``query_pre_attn_scalar ** -0.5``, bidirectional attention over real tokens, sliding layers
  (``layer_types``, else every ``sliding_window_pattern``-th layer global) seeing tokens at most
  ``sliding_window // 2`` away with their own rotary base. Masked scores get float32's lowest
  finite value, not -inf, so a padding row with no visible key stays finite.

Weights float32/float16/bfloat16 or MLX-quantised (expanded to float32 as each is read,
``dequant.py``), computed in float32. The graph takes right-padded
``input_ids`` and ``attention_mask`` (int32 ``[batch, tokens]``) and returns
``last_hidden_state``; pooling and sentence-transformers' Dense layers (``read_dense``) are
applied after it by ``onnxencoder.py``. A 0.6B model is over protobuf's 2 GB limit in float32,
so the graph is written with its weights in an external data file (``build``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .onnxgraph import (
    MS_DOMAIN,
    Graph,
    LazyWeights,
    OnnxUnsupported,
    quantisation,
    register_bfloat16,
)

OPSET = 23
SUPPORTED = ("qwen3", "gemma3_text")
GRAPH_VERSION = 1
"""Bumped when this module builds a different graph: older cached files are not reused."""
_IDENTITY = "torch.nn.modules.linear.Identity"


@dataclass(frozen=True)
class DecoderShape:
    """What the graph needs from config.json; per-layer tuples have one entry per layer."""

    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float
    thetas: tuple[float, ...]
    windows: tuple[int | None, ...]
    """Per layer: ``None`` for a global layer, else the farthest visible token distance."""

    @property
    def gemma(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def layers(self) -> int:
        return len(self.thetas)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DecoderShape:
        """Raises :class:`OnnxUnsupported` naming the setting this builder does not handle."""
        model_type = str(config.get("model_type", "")).replace("-", "_")
        if model_type not in SUPPORTED:
            raise OnnxUnsupported(f"model_type {model_type!r} (not a decoder this builds)")
        quantisation(config)
        for key in ("rope_scaling", "attention_bias", "attn_logit_softcapping"):
            if config.get(key):
                raise OnnxUnsupported(f"{key} {config[key]!r} (the ONNX graph has none)")
        hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
        layers = _int(config, "num_hidden_layers")
        if model_type == "qwen3":
            return cls._qwen3(config, hidden, heads, layers)
        return cls._gemma(config, hidden, heads, layers)

    @classmethod
    def _qwen3(cls, config: dict[str, Any], hidden: int, heads: int, layers: int) -> DecoderShape:
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise OnnxUnsupported(f"hidden_act {act!r} (qwen3 uses 'silu')")
        if config.get("use_sliding_window"):
            raise OnnxUnsupported("use_sliding_window true (a causal sliding window)")
        if hidden % heads and not config.get("head_dim"):
            raise OnnxUnsupported(f"hidden_size {hidden} not divisible by {heads} heads")
        head_dim = _int(config, "head_dim", hidden // heads)
        kv = _int(config, "num_key_value_heads", heads)
        theta = float(config.get("rope_theta", 1000000.0))
        return cls._checked("qwen3", hidden, heads, kv, head_dim, _int(config, "intermediate_size"),
                            float(config.get("rms_norm_eps", 1e-6)), head_dim**-0.5,
                            (theta,) * layers, (None,) * layers)  # fmt: skip

    @classmethod
    def _gemma(cls, config: dict[str, Any], hidden: int, heads: int, layers: int) -> DecoderShape:
        act = config.get("hidden_activation", config.get("hidden_act", "gelu_pytorch_tanh"))
        if act != "gelu_pytorch_tanh":
            raise OnnxUnsupported(f"hidden_activation {act!r} (gemma3_text uses "
                                  "'gelu_pytorch_tanh')")  # fmt: skip
        if config.get("use_bidirectional_attention") is not True:
            raise OnnxUnsupported("use_bidirectional_attention is not true (a causal Gemma 3, "
                                  "not EmbeddingGemma)")  # fmt: skip
        types = config.get("layer_types")
        if types is None:
            pattern = _int(config, "sliding_window_pattern", 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(layers)]  # fmt: skip
        if (not isinstance(types, list) or len(types) != layers
                or set(types) - {"full_attention", "sliding_attention"}):  # fmt: skip
            raise OnnxUnsupported(f"layer_types {types!r} (one of full_attention or "
                                  f"sliding_attention per layer, {layers} layers)")  # fmt: skip
        half = _int(config, "sliding_window", 512) // 2
        local = float(config.get("rope_local_base_freq", 10000.0))
        glob = float(config.get("rope_theta", 1000000.0))
        sliding = [t == "sliding_attention" for t in types]
        return cls._checked(
            "gemma3_text", hidden, heads, _int(config, "num_key_value_heads", 1),
            _int(config, "head_dim", 256), _int(config, "intermediate_size"),
            float(config.get("rms_norm_eps", 1e-6)),
            float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
            tuple(local if s else glob for s in sliding),
            tuple(half if s else None for s in sliding),
        )  # fmt: skip

    @classmethod
    def _checked(cls, *fields: Any) -> DecoderShape:
        shape = cls(*fields)
        if shape.heads % shape.kv_heads:
            raise OnnxUnsupported(f"{shape.heads} attention heads not a multiple of "
                                  f"{shape.kv_heads} key/value heads")  # fmt: skip
        if shape.head_dim % 2:
            raise OnnxUnsupported(f"head_dim {shape.head_dim} is odd (rotary needs pairs)")
        return shape


def _int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None and default is not None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OnnxUnsupported(f"config.json {key}: {value!r} is not a positive integer")
    return value


def read_config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise OnnxUnsupported(f"{folder}/config.json is not an object")
    return config


def build(folder: Path, path: Path) -> None:
    """Write the graph for ``folder`` to ``path``, its weights beside it (``<name>.data``);
    raises :class:`OnnxUnsupported`.

    Arrays are read one at a time (``LazyWeights``) and written to the weights file as they
    come (``_ExternalGraph``), so the build holds about one array, not the model twice over.
    Both files are written in a private scratch folder and renamed into place, the weights
    first, so a present ``path`` is always a complete graph.
    """
    from mlx_stack.private import make_dirs

    shape = DecoderShape.from_config(read_config(folder))
    make_dirs(path.parent)
    scratch = path.parent / f".{path.name}.{os.getpid()}.partial"
    make_dirs(scratch)
    location = f"{path.name}.data"
    try:
        with (scratch / location).open("wb") as data:
            model = build_from(shape, LazyWeights(folder), _ExternalGraph(data, location))
        (scratch / path.name).write_bytes(model.SerializeToString())
        for name in (location, path.name):
            os.chmod(scratch / name, 0o600)
            os.replace(scratch / name, path.parent / name)
    finally:
        for leftover in scratch.glob("*"):
            leftover.unlink()
        scratch.rmdir()


class _ExternalGraph(Graph):
    """A graph whose initialisers over 1 KB go straight to an open weights file (4 KB
    aligned, so ONNX Runtime can map them) as external data, not into the protobuf."""

    def __init__(self, data: BinaryIO, location: str) -> None:
        super().__init__({})
        self._data = data
        self._location = location

    def tensor(self, name: str, array: np.ndarray) -> Any:
        from onnx import TensorProto, helper

        if array.nbytes < 1024:
            return super().tensor(name, array)
        offset = self._data.tell()
        if offset % 4096:
            self._data.write(bytes(4096 - offset % 4096))
            offset = self._data.tell()
        self._data.write(memoryview(array).cast("B"))
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=array.shape, data_location=TensorProto.EXTERNAL)  # fmt: skip
        for key, value in (("location", self._location), ("offset", str(offset)),
                           ("length", str(array.nbytes))):  # fmt: skip
            tensor.external_data.add(key=key, value=value)
        return tensor


def read_dense(folder: Path) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """sentence-transformers' Dense modules after pooling (``modules.json`` order), as float32
    ``(weight transposed, bias)``; only the identity activation EmbeddingGemma uses.

    An MLX conversion (mlx-community's embeddinggemma 4/8-bit) keeps the n-th Dense layer as
    ``dense.<n>`` in the main checkpoint, quantised, and its Dense folders hold no weights:
    then they are read (and expanded) from there."""
    from safetensors import safe_open

    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return []
    register_bfloat16()
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    layers = []
    for module in modules if isinstance(modules, list) else []:
        if not isinstance(module, dict) or not str(module.get("type", "")).endswith(".Dense"):
            continue
        where = folder / str(module.get("path", ""))
        config = json.loads((where / "config.json").read_text(encoding="utf-8"))
        if config.get("activation_function", _IDENTITY) != _IDENTITY:
            raise OnnxUnsupported(f"{where}: Dense activation {config['activation_function']!r}")
        if not (where / "model.safetensors").is_file():
            layers.append(_dense_in_checkpoint(folder, where, len(layers)))
            continue
        with safe_open(str(where / "model.safetensors"), framework="np") as handle:
            names = set(handle.keys())
            if "linear.weight" not in names:
                raise OnnxUnsupported(f"{where}/model.safetensors has no linear.weight")
            weight = np.ascontiguousarray(handle.get_tensor("linear.weight").T, np.float32)
            bias = (np.asarray(handle.get_tensor("linear.bias"), np.float32)
                    if "linear.bias" in names else None)  # fmt: skip
        layers.append((weight, bias))
    return layers


def _dense_in_checkpoint(folder: Path, where: Path,
                         index: int) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """The ``index``-th Dense layer from the main checkpoint's ``dense.<index>`` arrays."""
    if not (folder / "config.json").is_file() or not any(folder.glob("model*.safetensors")):
        raise OnnxUnsupported(f"{where}: no model.safetensors (a .bin Dense layer)")
    weights = LazyWeights(folder)
    if f"dense.{index}.weight" not in weights:
        raise OnnxUnsupported(f"{where}: no model.safetensors, and no dense.{index}.weight in "
                              f"{folder}'s checkpoint")  # fmt: skip
    weight = np.ascontiguousarray(weights[f"dense.{index}.weight"].T, np.float32)
    bias = weights.get(f"dense.{index}.bias")
    return weight, None if bias is None else np.asarray(bias, np.float32)


def build_from(shape: DecoderShape, w: MutableMapping[str, np.ndarray],
               graph: Graph | None = None) -> Any:  # fmt: skip
    """The ``onnx.ModelProto`` for ``shape`` with weights ``w`` (keys without ``model.``),
    initialisers inside unless ``graph`` puts them elsewhere."""

    graph = graph if graph is not None else Graph({})
    graph.use(w)
    table = graph.take("embed_tokens.weight")
    if shape.gemma:  # scaled in float32 once here, as MLX scales each gathered row; in place
        scale = np.float32(math.sqrt(shape.hidden))  # (EmbeddingGemma's table is 805 MB)
        table = np.multiply(table, scale, out=table) if table.flags.writeable else table * scale
    graph.init("embed_tokens", table)
    del table
    graph.node("Gather", ["embed_tokens", "input_ids"], ["embedded"], axis=0)
    _positions(graph, shape)
    if shape.gemma:
        _masks(graph, shape)
    x = "embedded"
    normed = _rms_norm(graph, shape, x, "layers.0.input_layernorm.weight")
    for i in range(shape.layers):
        p = f"layers.{i}"
        attended = _attention(graph, shape, i, normed)
        if shape.gemma:
            attended = _rms_norm(graph, shape, attended, f"{p}.post_attention_layernorm.weight")
            before_mlp = f"{p}.pre_feedforward_layernorm.weight"
        else:
            before_mlp = f"{p}.post_attention_layernorm.weight"
        normed, x = _skip_rms_norm(graph, shape, attended, x, before_mlp, f"{p}.mid")
        mixed = _mlp(graph, shape, p, normed)
        if shape.gemma:
            mixed = _rms_norm(graph, shape, mixed, f"{p}.post_feedforward_layernorm.weight")
        after = f"layers.{i + 1}.input_layernorm.weight" if i + 1 < shape.layers else "norm.weight"
        normed, x = _skip_rms_norm(graph, shape, mixed, x, after, f"{p}.out")
    return graph.model(normed, shape.hidden, f"mlx-stack {shape.model_type} embedder",
                       OPSET, ir_version=10)


def _positions(graph: Graph, shape: DecoderShape) -> None:
    """``position_ids`` ``[batch, tokens]`` and per rotary base ``cos_<b>``/``sin_<b>``
    ``[tokens, head_dim / 2]``, computed in the graph for the batch's length."""

    graph.positions()
    half = np.arange(0, shape.head_dim, 2, dtype=np.float64) / shape.head_dim
    for b, theta in enumerate(sorted(set(shape.thetas))):
        inv = (theta**-half).astype(np.float32)[None, :]
        graph.node("Mul", ["pos_col", graph.init(f"inv_freq_{b}", inv)], [f"angles_{b}"])
        graph.node("Cos", [f"angles_{b}"], [f"cos_{b}"])
        graph.node("Sin", [f"angles_{b}"], [f"sin_{b}"])


def _rope_tables(shape: DecoderShape, layer: int) -> tuple[str, str]:
    b = sorted(set(shape.thetas)).index(shape.thetas[layer])
    return f"cos_{b}", f"sin_{b}"


def _masks(graph: Graph, shape: DecoderShape) -> None:
    """Additive float masks: ``mask_full`` ``[batch, 1, tokens, tokens]`` hides padding keys;
    ``mask_window_<n>`` ``[batch, 1, tokens, tokens]`` also hides keys more than n away."""
    graph.key_padding_mask()
    windows = sorted({w for w in shape.windows if w is not None})
    if not windows:
        return
    graph.node("Unsqueeze", ["pos", "ax1"], ["pos_q"])
    graph.node("Unsqueeze", ["pos", "ax0"], ["pos_k"])
    graph.node("Sub", ["pos_q", "pos_k"], ["pos_delta"])
    graph.node("Abs", ["pos_delta"], ["pos_distance"])
    for window in windows:
        near = graph.const(f"window_{window}", np.array(window, np.int64))
        graph.node("LessOrEqual", ["pos_distance", near], [f"near_{window}"])
        graph.node("And", ["keys4", f"near_{window}"], [f"visible_{window}"])
        graph.node("Where", [f"visible_{window}", "f_zero", "f_lowest"], [f"mask_window_{window}"])


def _norm_weight(graph: Graph, shape: DecoderShape, key: str, scale: float = 1.0) -> str:
    """Gemma's RMSNorm multiplies by ``1 + weight`` (added in float32, as MLX does)."""
    weight = graph.take(key)
    if shape.gemma:
        weight = np.float32(1.0) + weight
    if scale != 1.0:
        weight = weight * np.float32(scale)
    return graph.init(key, weight)


def _rms_norm(graph: Graph, shape: DecoderShape, x: str, key: str) -> str:
    out = f"{key}.out"
    graph.node("RMSNormalization", [x, _norm_weight(graph, shape, key)], [out], axis=-1,
               epsilon=shape.eps)  # fmt: skip
    return out


def _skip_rms_norm(graph: Graph, shape: DecoderShape, x: str, skip: str, key: str,
                   name: str) -> tuple[str, str]:  # fmt: skip
    """RMSNorm(x + skip) and x + skip (the next residual), in one ORT node."""
    graph.node("SkipSimplifiedLayerNormalization", [x, skip, _norm_weight(graph, shape, key)],
               [f"{name}.normed", "", "", f"{name}.sum"], domain=MS_DOMAIN,
               epsilon=shape.eps)  # fmt: skip
    return f"{name}.normed", f"{name}.sum"


def _attention(graph: Graph, shape: DecoderShape, layer: int, x: str) -> str:
    """One projection for q, k and v; per-head norm and rotary on q and k; opset 23
    ``Attention`` (grouped-query heads without copying k/v); the output projection."""
    p = f"layers.{layer}.self_attn"
    weights = [graph.take(f"{p}.{n}_proj.weight") for n in ("q", "k", "v")]
    sizes = [int(w.shape[0]) for w in weights]
    expected = [shape.heads * shape.head_dim] + [shape.kv_heads * shape.head_dim] * 2
    if sizes != expected:
        raise OnnxUnsupported(f"{p}: q/k/v projections of {sizes} rows, config says {expected}")
    graph.init(f"{p}.qkv_wT", np.concatenate(weights, axis=0).T)
    del weights
    graph.node("MatMul", [x, f"{p}.qkv_wT"], [f"{p}.qkv"])
    graph.node("Split", [f"{p}.qkv", graph.const("qkv_sizes", np.array(sizes, np.int64))],
               [f"{p}.q", f"{p}.k", f"{p}.v"], axis=-1)  # fmt: skip
    cos, sin = _rope_tables(shape, layer)
    rotated = []
    for part, heads in (("q", shape.heads), ("k", shape.kv_heads)):
        split = graph.const(f"heads_{heads}", np.array([0, 0, heads, shape.head_dim], np.int64))
        merge = graph.const(f"merge_{heads}", np.array([0, 0, heads * shape.head_dim], np.int64))
        graph.node("Reshape", [f"{p}.{part}", split], [f"{p}.{part}.heads"])
        normed = _rms_norm(graph, shape, f"{p}.{part}.heads", f"{p}.{part}_norm.weight")
        graph.node("Reshape", [normed, merge], [f"{p}.{part}.flat"])
        graph.node("RotaryEmbedding", [f"{p}.{part}.flat", cos, sin, "position_ids"],
                   [f"{p}.{part}.rot"], num_heads=heads)  # fmt: skip
        rotated.append(f"{p}.{part}.rot")
    window = shape.windows[layer]
    inputs = [*rotated, f"{p}.v"]
    if shape.gemma:
        inputs.append("mask_full" if window is None else f"mask_window_{window}")
    graph.node("Attention", inputs, [f"{p}.context"], q_num_heads=shape.heads,
               kv_num_heads=shape.kv_heads, scale=shape.scale,
               is_causal=0 if shape.gemma else 1)  # fmt: skip
    graph.node("MatMul", [f"{p}.context", graph.transposed(f"{p}.o_proj.weight")], [f"{p}.out"])
    return f"{p}.out"


def _mlp(graph: Graph, shape: DecoderShape, p: str, x: str) -> str:
    """down(act(gate(x)) * up(x)), gate and up as one product: SiLU (qwen3), GELU-tanh (gemma)."""
    m = f"{p}.mlp"
    gate, up = graph.take(f"{m}.gate_proj.weight"), graph.take(f"{m}.up_proj.weight")
    graph.init(f"{m}.gate_up_wT", np.concatenate([gate, up], axis=0).T)
    del gate, up
    graph.node("MatMul", [x, f"{m}.gate_up_wT"], [f"{m}.gate_up"])
    graph.node("Split", [f"{m}.gate_up"], [f"{m}.gate", f"{m}.up"], axis=-1, num_outputs=2)
    if shape.gemma:
        graph.node("FastGelu", [f"{m}.gate"], [f"{m}.act"], domain=MS_DOMAIN)
    else:
        graph.node("Sigmoid", [f"{m}.gate"], [f"{m}.sig"])
        graph.node("Mul", [f"{m}.gate", f"{m}.sig"], [f"{m}.act"])
    graph.node("Mul", [f"{m}.act", f"{m}.up"], [f"{m}.gated"])
    graph.node("MatMul", [f"{m}.gated", graph.transposed(f"{m}.down_proj.weight")], [f"{m}.out"])
    return f"{m}.out"
