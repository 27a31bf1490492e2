"""Build a BERT-family encoder as an ONNX graph straight from a folder's safetensors.

No torch and no export step: the weights are read with ``safetensors`` (numpy) and wired into
ONNX Runtime's fused CPU operators (``com.microsoft``: ``Attention``, ``SkipLayerNormalization``,
``BiasGelu``), the same operators its own optimizer turns an exported BERT into. Emitting them
directly means the graph needs no pattern matching to be fast, and nothing depends on how a
given torch version happened to trace the model.

Supported: ``bert`` and ``xlm_roberta`` with absolute positions, exact GELU and weights in
float32, float16, bfloat16 or MLX's affine quantisation (expanded by ``dequant.py`` as each
array is read), computed in float32. Anything else raises
:class:`OnnxUnsupported` with the reason, and the server keeps that model on MLX.

``bench/onnx_graphs.py`` times this graph against a standard-op variant and the torch-exported
one. The graph takes right-padded ``input_ids`` and ``attention_mask`` (int32
``[batch, tokens]``) and returns ``last_hidden_state`` (float32 ``[batch, tokens, hidden]``);
pooling is shared with the MLX engine (``model/pooling.py``). Token types are all 0 for one
text, so that row is
folded into the position table. XLM-RoBERTa numbers positions from ``pad_token_id + 1``; with
right padding every real token's position is its index plus that offset, so the table is
sliced once at build time (padded positions differ from transformers', but they are masked).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dequant import Quantisation, QuantisationUnsupported, dequantize

OPSET = 17
MS_DOMAIN = "com.microsoft"
SUPPORTED = ("bert", "xlm_roberta")
_PREFIXES = ("bert.", "roberta.", "model.")


class OnnxUnsupported(ValueError):
    """This folder cannot be built as an ONNX graph here; the MLX engine serves it."""


@dataclass(frozen=True)
class EncoderShape:
    """What the graph needs from config.json."""

    model_type: str
    hidden: int
    heads: int
    layers: int
    eps: float
    position_offset: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EncoderShape:
        model_type = str(config.get("model_type", "")).replace("-", "_")
        if model_type not in SUPPORTED:
            raise OnnxUnsupported(f"model_type {model_type!r} (the ONNX engine builds "
                                  f"{', '.join(SUPPORTED)})")  # fmt: skip
        quantisation(config)
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise OnnxUnsupported(f"hidden_act {act!r} (only the exact 'gelu')")
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise OnnxUnsupported(f"position_embedding_type {kind!r}")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        if hidden % heads:
            raise OnnxUnsupported(f"hidden_size {hidden} not divisible by {heads} heads")
        offset = int(config.get("pad_token_id", 1)) + 1 if model_type == "xlm_roberta" else 0
        return cls(model_type, hidden, heads, int(config["num_hidden_layers"]),
                   float(config.get("layer_norm_eps", 1e-12)), offset)  # fmt: skip


def quantisation(config: dict[str, Any]) -> Quantisation | None:
    """The folder's MLX quantisation (``None``: float weights); raises :class:`OnnxUnsupported`
    for a scheme ``dequant.py`` cannot expand."""
    try:
        return Quantisation.from_config(config)
    except QuantisationUnsupported as exc:
        raise OnnxUnsupported(str(exc)) from None


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """The encoder's float32 arrays, keys without a ``bert.``/``roberta.`` prefix."""
    lazy = LazyWeights(folder)
    return {key: lazy[key] for key in lazy}


class LazyWeights(MutableMapping[str, np.ndarray]):
    """The checkpoint's float32 arrays (keys as :func:`read_weights`), each read when taken.

    A build that pops every array once then holds about one at a time: Qwen3-Embedding-0.6B
    is 2.4 GB in float32, which :func:`read_weights` would hold whole.

    In an MLX-quantised folder (``quantization`` in config.json) a layer's ``weight`` is
    returned expanded to float32 from its packed ``weight``, ``scales`` and ``biases``
    (``dequant.py``); its ``scales``/``biases`` keys are not listed.
    """

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        register_bfloat16()
        files = sorted(folder.glob("model*.safetensors"))
        if not files:
            raise OnnxUnsupported(f"no model*.safetensors in {folder}")
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        self._quantisation = quantisation(config) if isinstance(config, dict) else None
        self._where: dict[str, tuple[Any, str]] = {}
        self._set: dict[str, np.ndarray] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="np")
                keys = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error types for bad files
                raise OnnxUnsupported(f"{file}: cannot read: {exc}") from None
            self._where.update({_strip(key): (handle, key) for key in keys})
        self._packed: dict[str, tuple[tuple[Any, str], tuple[Any, str], str]] = {}
        """Stripped ``<layer>.weight`` -> where its scales and biases are, its MLX path."""
        if self._quantisation is not None:
            for key in [k for k in self._where if k.endswith(".scales")]:
                layer = key[: -len(".scales")]
                if f"{layer}.weight" in self._where and f"{layer}.biases" in self._where:
                    module = self._where[f"{layer}.weight"][1][: -len(".weight")]
                    sidecars = self._where.pop(key), self._where.pop(f"{layer}.biases")
                    self._packed[f"{layer}.weight"] = (*sidecars, module)

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self._set:
            return self._set[key]
        if key in self._packed:
            return self._expanded(key)
        handle, name = self._where[key]
        try:
            return _float32(handle.get_tensor(name))
        except Exception as exc:
            raise OnnxUnsupported(f"{name}: cannot read: {exc}") from None

    def _expanded(self, key: str) -> np.ndarray:
        assert self._quantisation is not None
        scales, biases, module = self._packed[key]
        arrays = []
        for handle, name in (self._where[key], scales, biases):
            try:
                arrays.append(handle.get_tensor(name))
            except Exception as exc:
                raise OnnxUnsupported(f"{name}: cannot read: {exc}") from None
        try:
            return dequantize(*arrays, self._quantisation.scheme(module), f"{module}.weight")
        except QuantisationUnsupported as exc:
            raise OnnxUnsupported(str(exc)) from None

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self._set[key] = value

    def __delitem__(self, key: str) -> None:
        if self._set.pop(key, None) is None:
            del self._where[key]

    def __iter__(self) -> Iterator[str]:
        return iter({**self._where, **self._set})

    def __len__(self) -> int:
        return len({**self._where, **self._set})


def register_bfloat16() -> None:
    """Make numpy know ``bfloat16``, or safetensors' numpy reader fails on a bf16 array (the
    scales of mlx-community's bf16 conversions): ``onnx`` imports ``ml_dtypes``, which does it,
    but a start from a cached graph never imports ``onnx``."""
    # without it a bf16 array is refused, with safetensors' own message
    with contextlib.suppress(ImportError):
        import ml_dtypes  # noqa: F401


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _float32(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        return array  # position_ids buffers and the like: not used
    return np.ascontiguousarray(array, dtype=np.float32)


def build(folder: Path, attention: str = "fused") -> bytes:
    """The serialised ONNX model for ``folder``; raises :class:`OnnxUnsupported`."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shape = EncoderShape.from_config(config)
    model = build_from(shape, read_weights(folder), attention)
    return bytes(model.SerializeToString())


def build_from(shape: EncoderShape, w: dict[str, np.ndarray], attention: str = "fused") -> Any:
    """The ``onnx.ModelProto`` for ``shape`` with weights ``w`` (checked for completeness).

    ``attention``: ``fused`` (``com.microsoft.Attention``, the default) or ``standard`` (plain
    MatMul/Softmax ops, which ORT's CPU optimizer leaves unfused): the benchmark compares them.
    """
    from onnx import TensorProto

    graph = Graph(w)
    word = graph.weight("embeddings.word_embeddings.weight")
    positions = graph.take("embeddings.position_embeddings.weight")[shape.position_offset:]
    types = w.pop("embeddings.token_type_embeddings.weight", None)
    if types is not None:
        positions = positions + types[0]
    graph.init("positions", positions)
    graph.node("Gather", [word, "input_ids"], ["words"], axis=0)
    graph.node("Shape", ["input_ids"], ["ids_shape"])
    one = graph.const("one", np.array([1], np.int64))
    two = graph.const("two", np.array([2], np.int64))
    graph.node("Slice", ["ids_shape", one, two], ["length"])  # [tokens], 1-D
    zero = graph.const("zero", np.array([0], np.int64))
    graph.node("Slice", ["positions", zero, "length", zero], ["pos"])
    graph.node("Add", ["words", "pos"], ["embedded"])
    x = graph.layer_norm("embedded", "embeddings.LayerNorm", shape.eps)
    if attention == "standard":
        graph.node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
        graph.node("Sub", [graph.const("f_one", np.array(1.0, np.float32)), "mask_f"], ["unmask"])
        lowest = np.array(np.finfo(np.float32).min, np.float32)
        graph.node("Mul", ["unmask", graph.const("lowest", lowest)], ["bias2d"])
        graph.node("Unsqueeze", ["bias2d", graph.const("axes12", np.array([1, 2], np.int64))],
                   ["mask_bias"])  # fmt: skip
    for i in range(shape.layers):
        x = _layer(graph, shape, f"encoder.layer.{i}", x, attention)
    # no onnx.checker: it would copy the model whole; the tests run it
    name = f"mlx-stack {shape.model_type} encoder"
    return graph.model(x, shape.hidden, name, OPSET, ir_version=8)


def _layer(graph: Graph, shape: EncoderShape, p: str, x: str, attention: str) -> str:
    """One post-norm encoder layer: attention, add & norm, feed-forward, add & norm."""
    att = f"{p}.attention"
    if attention == "standard":
        _standard_attention(graph, shape, p, x)
    else:
        _fused_attention(graph, shape, p, x)
    attended = graph.dense_skip_norm(f"{p}.att", x, f"{att}.output.dense",
                                     f"{att}.output.LayerNorm", shape.eps)  # fmt: skip
    graph.node("MatMul", [attended, graph.transposed(f"{p}.intermediate.dense.weight")],
               [f"{p}.up"])  # fmt: skip
    graph.node("BiasGelu", [f"{p}.up", graph.weight(f"{p}.intermediate.dense.bias")],
               [f"{p}.gelu"], domain=MS_DOMAIN)  # fmt: skip
    return graph.dense_skip_norm(f"{p}.gelu", attended, f"{p}.output.dense",
                                 f"{p}.output.LayerNorm", shape.eps)  # fmt: skip


def _standard_attention(graph: Graph, shape: EncoderShape, p: str, x: str) -> None:
    """Scaled dot-product attention in plain ONNX ops; the scale folded into the query."""
    att = f"{p}.attention.self"
    head = shape.hidden // shape.heads
    split = graph.const("split_heads", np.array([0, 0, shape.heads, head], np.int64))
    merge = graph.const("merge_heads", np.array([0, 0, shape.hidden], np.int64))
    scale = np.float32(1.0 / np.sqrt(head))
    names = {}
    for part, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
        weight, bias = graph.take(f"{att}.{part}.weight").T, graph.take(f"{att}.{part}.bias")
        if part == "query":
            weight, bias = weight * scale, bias * scale
        graph.node("MatMul", [x, graph.init(f"{att}.{part}.wT", weight)], [f"{att}.{part}.mm"])
        graph.node("Add", [f"{att}.{part}.mm", graph.init(f"{att}.{part}.b", bias)],
                   [f"{att}.{part}.biased"])  # fmt: skip
        graph.node("Reshape", [f"{att}.{part}.biased", split], [f"{att}.{part}.heads"])
        graph.node("Transpose", [f"{att}.{part}.heads"], [f"{att}.{part}.t"], perm=perm)
        names[part] = f"{att}.{part}.t"
    graph.node("MatMul", [names["query"], names["key"]], [f"{att}.scores"])
    graph.node("Add", [f"{att}.scores", "mask_bias"], [f"{att}.masked"])
    graph.node("Softmax", [f"{att}.masked"], [f"{att}.probs"], axis=-1)
    graph.node("MatMul", [f"{att}.probs", names["value"]], [f"{att}.context"])
    graph.node("Transpose", [f"{att}.context"], [f"{att}.context_t"], perm=[0, 2, 1, 3])
    graph.node("Reshape", [f"{att}.context_t", merge], [f"{p}.att"])


def _fused_attention(graph: Graph, shape: EncoderShape, p: str, x: str) -> None:
    """ONNX Runtime's ``com.microsoft.Attention``: one node for QKV, scores, softmax, context."""
    att = f"{p}.attention"
    parts = ("query", "key", "value")
    qkv_w = np.concatenate([graph.take(f"{att}.self.{n}.weight").T for n in parts], axis=1)
    qkv_b = np.concatenate([graph.take(f"{att}.self.{n}.bias") for n in parts])
    graph.init(f"{p}.qkv_w", qkv_w)
    graph.init(f"{p}.qkv_b", qkv_b)
    graph.node("Attention", [x, f"{p}.qkv_w", f"{p}.qkv_b", "attention_mask"], [f"{p}.att"],
               domain=MS_DOMAIN, num_heads=shape.heads)  # fmt: skip


class Graph:
    """Nodes and initialisers being collected; every checkpoint array used exactly by name.

    Each array leaves the checkpoint dict when used and becomes a tensor at once, so the
    build holds about one copy of the weights (MiniLM: 620 -> ~300 MB peak, measured).
    """

    def __init__(self, weights: MutableMapping[str, np.ndarray]) -> None:
        self._w = weights
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._names: set[str] = set()

    def use(self, weights: MutableMapping[str, np.ndarray]) -> None:
        """Take arrays from ``weights`` from now on."""
        self._w = weights

    def take(self, key: str) -> np.ndarray:
        try:
            return self._w.pop(key)
        except KeyError:
            raise OnnxUnsupported(f"no array {key!r} in the checkpoint") from None

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.tensor(name, np.ascontiguousarray(array)))
        self._names.add(name)
        return name

    def tensor(self, name: str, array: np.ndarray) -> Any:
        """The initialiser for ``array``, its bytes inside (a subclass may write them out)."""
        from onnx import numpy_helper

        return numpy_helper.from_array(array, name)

    def weight(self, key: str) -> str:
        return self.init(key, self.take(key))

    def transposed(self, key: str) -> str:
        return self.init(f"{key}.T", self.take(key).T)

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self._names:
            self.init(name, value)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "",
             **attrs: Any) -> None:  # fmt: skip
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], domain=domain,
                                           **attrs))  # fmt: skip

    def positions(self) -> None:
        """``position_ids`` ``[batch, tokens]`` (0, 1, ... per row) and ``pos_col``
        ``[tokens, 1]`` float, computed for the batch's length (for rotary tables)."""
        from onnx import TensorProto

        self.node("Shape", ["input_ids"], ["ids_shape"])
        self.node("Gather", ["ids_shape", self.const("i_one", np.array(1, np.int64))],
                  ["length"], axis=0)  # fmt: skip
        self.node("Range", [self.const("i_zero", np.array(0, np.int64)), "length", "i_one"],
                  ["pos"])  # fmt: skip
        self.node("Unsqueeze", ["pos", self.const("ax0", np.array([0], np.int64))], ["pos_row"])
        self.node("Expand", ["pos_row", "ids_shape"], ["position_ids"])
        self.node("Cast", ["pos"], ["pos_f"], to=TensorProto.FLOAT)
        self.node("Unsqueeze", ["pos_f", self.const("ax1", np.array([1], np.int64))],
                  ["pos_col"])  # fmt: skip

    def key_padding_mask(self) -> None:
        """``mask_full`` ``[batch, 1, tokens, tokens]``: 0 for real keys, float32's lowest
        finite value for padding (a padding row stays finite), the query axis spelt out as
        opset 23's ``Attention`` wants. Needs :meth:`positions`' ``ids_shape``."""
        from onnx import TensorProto

        self.node("Cast", ["attention_mask"], ["keys_b"], to=TensorProto.BOOL)
        self.node("Unsqueeze", ["keys_b", self.const("ax12", np.array([1, 2], np.int64))],
                  ["keys4"])  # fmt: skip
        lowest = self.const("f_lowest", np.array(np.finfo(np.float32).min, np.float32))
        self.node("Where", ["keys4", self.const("f_zero", np.array(0.0, np.float32)), lowest],
                  ["mask_keys"])  # fmt: skip
        self.const("ax1", np.array([1], np.int64))
        self.node("Slice", ["ids_shape", self.const("s0", np.array([0], np.int64)), "ax1"],
                  ["batch_1d"])  # fmt: skip
        self.node("Slice", ["ids_shape", "ax1", self.const("s2", np.array([2], np.int64))],
                  ["length_1d"])  # fmt: skip
        self.node("Concat", ["batch_1d", "ax1", "length_1d", "length_1d"], ["mask_shape"],
                  axis=0)  # fmt: skip
        self.node("Expand", ["mask_keys", "mask_shape"], ["mask_full"])

    def model(self, last: str, hidden: int, name: str, opset: int, ir_version: int) -> Any:
        """The finished model: int32 ``input_ids``/``attention_mask`` ``[batch, tokens]`` in,
        ``last`` out as float32 ``last_hidden_state`` ``[batch, tokens, hidden]``."""
        from onnx import TensorProto, helper

        self.node("Identity", [last], ["last_hidden_state"])
        inputs = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", "tokens"])
                  for n in ("input_ids", "attention_mask")]  # fmt: skip
        output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                               ["batch", "tokens", hidden])  # fmt: skip
        proto = helper.make_graph(self.nodes, name, inputs, [output], self.inits)
        opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(proto, opset_imports=opsets)
        model.ir_version = ir_version
        model.producer_name = "mlx-stack"
        return model

    def layer_norm(self, x: str, p: str, eps: float) -> str:
        out = f"{p}.out"
        self.node("LayerNormalization", [x, self.weight(f"{p}.weight"), self.weight(f"{p}.bias")],
                  [out], axis=-1, epsilon=eps)  # fmt: skip
        return out

    def dense_skip_norm(self, x: str, skip: str, dense: str, norm: str, eps: float) -> str:
        """LayerNorm(x @ W.T + b + skip), as one fused node after the product."""
        self.node("MatMul", [x, self.transposed(f"{dense}.weight")], [f"{dense}.mm"])
        out = f"{norm}.out"
        self.node("SkipLayerNormalization",
                  [f"{dense}.mm", skip, self.weight(f"{norm}.weight"), self.weight(f"{norm}.bias"),
                   self.weight(f"{dense}.bias")], [out], domain=MS_DOMAIN, epsilon=eps)  # fmt: skip
        return out
