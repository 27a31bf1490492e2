"""Swap MLX's slow CPU kernels in a loaded network for faster, equivalent ones.

With an optimised BLAS (``blas.py``) matrix products stop being an encoder's bottleneck on a
CPU; the elementwise work around them becomes it, since MLX computes transcendental functions
one scalar at a time there. So for the BERT family (mlx-embeddings' ``bert`` and
``xlm_roberta``) each encoder layer is replaced by :class:`KernelBertLayer`: the same weights
and maths, the four weight products still in MLX (its BLAS), and attention (scores, softmax,
weighted values), GELU, bias additions and residual layer norms in ``kernels.cpp``'s
vectorised C++. Our ``nomic_bert`` gets the softmax and SwiGLU kernels through its hooks.
Other architectures keep MLX's kernels, except that GELU modules get ``fastgelu.py``'s
compiled polynomial.

Nothing is swapped off the CPU (Metal kernels are fast already), for half precision or for
quantised layers, and every kernel was checked against an exact reference when it loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..model import nomic_bert
from . import fastgelu
from .kernels import Kernels, Pinned, pin
from .kernels import load as load_kernels

_BERT_LAYERS = {"BertLayer": False, "XLMRobertaLayer": True}
"""mlx-embeddings layer class -> whether its ``__call__`` returns a 1-tuple."""


def install(module: nn.Module) -> tuple[str, ...]:
    """Apply every replacement that works here; returns what was swapped, for the log."""
    if mx.default_device() != mx.cpu:
        return ()
    kernels = load_kernels()
    done: list[str] = []
    if kernels is not None:
        layers = _swap_bert_layers(module, kernels)
        if layers:
            done.append(f"fused encoder layers x{layers}")
        hooks = _hook_nomic(module, kernels)
        if hooks:
            done.append(f"softmax/SwiGLU kernels x{hooks}")
    gelus = fastgelu.install(module)  # exact GELU modules left anywhere else
    if gelus:
        done.append(f"compiled GELU x{gelus}")
    return tuple(done)


class KernelBertLayer(nn.Module):
    """One BERT/XLM-R encoder layer (post-norm) on MLX matrix products and fused C++ kernels.

    Every kernel writes in place into the fresh output of the matrix product just before it,
    which nothing else references; the layer's input is only read.
    """

    def __init__(self, layer: nn.Module, kernels: Kernels, as_tuple: bool) -> None:
        super().__init__()
        attention = layer.attention.self
        self.heads = int(attention.num_attention_heads)
        self.head_size = int(attention.attention_head_size)
        parts = (attention.query, attention.key, attention.value)
        # weights stored transposed ([in, out], contiguous): ~30% faster products for short
        # inputs, where reading the weights is the cost; the original layer is dropped
        self.qkv_weight = _transposed(mx.concatenate([p.weight for p in parts], axis=0))
        self.out_weight = _transposed(layer.attention.output.dense.weight)
        self.up_weight = _transposed(layer.intermediate.dense.weight)
        self.down_weight = _transposed(layer.output.dense.weight)
        qkv_bias = mx.concatenate([p.bias for p in parts], axis=0)
        mx.eval(qkv_bias)
        # Vectors only the C++ kernels read, their addresses taken once: in a plain object,
        # not module attributes (~2.5 us saved per vector per call; ~0.13 ms per MiniLM pass).
        self._vectors = _LayerVectors(
            qkv_bias=pin(qkv_bias),
            out_bias=pin(layer.attention.output.dense.bias),
            out_norm=_norm(layer.attention.output.LayerNorm),
            up_bias=pin(layer.intermediate.dense.bias),
            down_bias=pin(layer.output.dense.bias),
            down_norm=_norm(layer.output.LayerNorm),
        )
        self._kernels = kernels
        self._as_tuple = as_tuple
        # one C++ kernel for scores, softmax and values (1.5-10x faster than MLX's products
        # around the softmax kernel, measured) when heads split into 16-float vectors
        self._fused_attention = self.head_size % 16 == 0

    def __call__(self, x: mx.array, attention_mask: Any = None, *_: Any) -> Any:
        batch, length, width = x.shape
        k, c = self._kernels, self._vectors
        qkv = x @ self.qkv_weight
        rows = _mask_rows(attention_mask, batch, length)
        mx.eval([a for a in (qkv, rows) if a is not None])
        k.bias_add_(qkv, c.qkv_bias)
        scale = 1.0 / math.sqrt(self.head_size)
        if self._fused_attention:
            k.attention_(qkv, rows, self.heads, scale)
            context = qkv.reshape(batch, length, 3, width)[:, :, 0]  # written over q
        else:
            q, key, v = qkv.reshape(batch, length, 3, self.heads, self.head_size).transpose(
                2, 0, 3, 1, 4
            )
            scores = q @ key.swapaxes(-1, -2)
            mx.eval(scores)
            k.softmax_(scores, scale, rows, self.heads * length)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
        attended = context @ self.out_weight
        mx.eval(attended)
        k.add_layernorm_(attended, c.out_bias, x, *c.out_norm)
        hidden = attended @ self.up_weight
        mx.eval(hidden)
        k.bias_gelu_(hidden, c.up_bias)
        output = hidden @ self.down_weight
        mx.eval(output)
        k.add_layernorm_(output, c.down_bias, attended, *c.down_norm)
        return (output,) if self._as_tuple else output


@dataclass(frozen=True)
class _LayerVectors:
    qkv_bias: Pinned
    out_bias: Pinned
    out_norm: tuple[Pinned, Pinned, float]
    up_bias: Pinned
    down_bias: Pinned
    down_norm: tuple[Pinned, Pinned, float]


def _transposed(weight: mx.array) -> mx.array:
    result = mx.contiguous(weight.T)
    mx.eval(result)
    return result


def kernel_attention(kernels: Kernels) -> nomic_bert.Attend:
    """``softmax(q k^T * scale + mask) v`` with the softmax done in place by the C++ kernel."""

    def attend(q: mx.array, k: mx.array, v: mx.array, mask_rows: Any, scale: float) -> mx.array:
        scores = q @ k.swapaxes(-1, -2)
        if scores.dtype != mx.float32:
            return nomic_bert.mlx_attention(q, k, v, mask_rows, scale)
        rows = mask_rows.astype(mx.float32)
        mx.eval(scores, rows)
        kernels.softmax_(scores, scale, rows, scores.shape[1] * scores.shape[2])
        return scores @ v

    return attend


def kernel_swiglu(kernels: Kernels) -> nomic_bert.GatedActivation:
    def gated(up: mx.array, gate: mx.array) -> mx.array:
        if up.dtype != mx.float32 or gate.dtype != mx.float32:
            return up * nn.silu(gate)
        mx.eval(up, gate)
        kernels.swiglu_(up, gate)
        return up

    return gated


def _mask_rows(attention_mask: Any, batch: int, length: int) -> mx.array | None:
    """The model's additive ``[batch, 1, 1, tokens]`` mask as ``[batch, tokens]`` float32."""
    if attention_mask is None:
        return None
    if attention_mask.size != batch * length:
        raise ValueError(f"unexpected attention mask shape {attention_mask.shape}")
    return attention_mask.reshape(batch, length).astype(mx.float32)


def _norm(norm: nn.LayerNorm) -> tuple[Pinned, Pinned, float]:
    return pin(norm.weight), pin(norm.bias), float(norm.eps)


def _swap_bert_layers(module: nn.Module, kernels: Kernels) -> int:
    swapped = 0
    for _, parent in module.named_modules():
        for value in parent.values():
            if not isinstance(value, list):
                continue
            for index, layer in enumerate(value):
                kind = type(layer).__name__
                if kind in _BERT_LAYERS and _plain_float32_bert_layer(layer):
                    value[index] = KernelBertLayer(layer, kernels, _BERT_LAYERS[kind])
                    swapped += 1
    return swapped


def _plain_float32_bert_layer(layer: nn.Module) -> bool:
    """Unquantised float32 ``nn.Linear``/``nn.LayerNorm`` with biases and an exact GELU."""
    try:
        attention = layer.attention.self
        linears = [attention.query, attention.key, attention.value]
        linears += [layer.attention.output.dense, layer.intermediate.dense, layer.output.dense]
        norms = [layer.attention.output.LayerNorm, layer.output.LayerNorm]
    except AttributeError:
        return False
    if not all(type(lin) is nn.Linear and "bias" in lin for lin in linears):
        return False
    if not all(type(norm) is nn.LayerNorm and "bias" in norm for norm in norms):
        return False
    arrays = [lin.weight for lin in linears] + [norm.weight for norm in norms]
    if any(a.dtype != mx.float32 for a in arrays):
        return False
    activation = layer.intermediate.get("intermediate_act_fn")
    if activation is None:  # XLM-R calls the exact nn.gelu in code
        return type(layer.intermediate).__name__ == "XLMRobertaIntermediate"
    return type(activation) is nn.GELU and getattr(activation, "_approx", None) == "none"


def _hook_nomic(module: nn.Module, kernels: Kernels) -> int:
    hooked = 0
    for _, layer in module.named_modules():
        if isinstance(layer, nomic_bert.Attention):
            layer.attend = kernel_attention(kernels)
            hooked += 1
        elif isinstance(layer, nomic_bert.FeedForward) and layer.activation == "swiglu":
            layer.gated = kernel_swiglu(kernels)
            hooked += 1
    return hooked
