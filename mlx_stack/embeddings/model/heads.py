"""Cross-encoder classification heads, applied from their checkpoint arrays.

mlx-embeddings' classes carry heads that differ from transformers' (its ModernBERT head
hard-codes exact GELU and its default pooling is ``mean`` where transformers' is ``cls``),
so the arrays are taken out of the checkpoint and applied here, in float32, as transformers'
``*ForSequenceClassification`` does:

- BERT / XLM-RoBERTa: the first token, dense, tanh, output layer. BERT keeps the dense layer
  as its pooler (``bert.pooler.dense``, also loaded into the encoder, which owns a pooler) and
  the output as ``classifier``; RoBERTa keeps both in ``classifier`` (``dense``, ``out_proj``).
- ModernBERT: the first token or the mean over real tokens (``classifier_pooling``), then
  ``head`` (dense, ``classifier_activation``, layer norm) and ``classifier``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

_ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": nn.gelu,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "silu": nn.silu,
    "relu": nn.relu,
}


class TanhHead:
    """BERT/RoBERTa: dense + tanh on the first token, then one logit."""

    def __init__(self, dense: tuple[mx.array, mx.array], output: tuple[mx.array, mx.array]) -> None:
        self._dense = dense
        self._output = output

    def arrays(self) -> tuple[mx.array, ...]:
        return (*self._dense, *self._output)

    def __call__(self, hidden: mx.array, mask: mx.array) -> mx.array:
        hidden = mx.tanh(_linear(hidden[:, 0], *self._dense))
        return _linear(hidden, *self._output)


class ModernBertHead:
    """ModernBERT: pooling, dense, activation, layer norm, then one logit."""

    def __init__(self, arrays: dict[str, mx.array | None], pooling: str,
                 activation: Callable[[mx.array], mx.array], eps: float) -> None:  # fmt: skip
        self._a = arrays
        self._pooling = pooling
        self._activation = activation
        self._eps = eps

    def arrays(self) -> tuple[mx.array, ...]:
        return tuple(a for a in self._a.values() if a is not None)

    def __call__(self, hidden: mx.array, mask: mx.array) -> mx.array:
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        a = self._a
        pooled = self._activation(_linear(pooled, a["head.dense.weight"], a["head.dense.bias"]))
        pooled = mx.fast.layer_norm(pooled, _f32(a["head.norm.weight"]), _f32(a["head.norm.bias"]),
                                    self._eps)  # fmt: skip
        return _linear(pooled, a["classifier.weight"], a["classifier.bias"])


Head = TanhHead | ModernBertHead


def take_head(model_type: str, config: dict[str, Any], weights: dict[str, mx.array],
              where: str) -> Head:  # fmt: skip
    """Remove the head's arrays from ``weights`` (the encoder gets the rest) and build it;
    a missing required array means the folder is not this kind of cross-encoder."""
    if model_type == "bert":
        dense = _required(weights, "bert.pooler.dense", where, keep=True)
        return TanhHead(dense, _required(weights, "classifier", where))
    if model_type == "xlm_roberta":
        return TanhHead(_required(weights, "classifier.dense", where),
                        _required(weights, "classifier.out_proj", where))  # fmt: skip
    activation_name = str(config.get("classifier_activation", "gelu"))
    if activation_name not in _ACTIVATIONS:
        raise ValueError(f"{where}: classifier_activation {activation_name!r} is not supported "
                         f"(supported: {', '.join(_ACTIVATIONS)})")  # fmt: skip
    pooling = str(config.get("classifier_pooling", "cls"))  # transformers' default
    if pooling not in ("cls", "mean"):
        raise ValueError(f"{where}: classifier_pooling {pooling!r} is not cls or mean")
    arrays: dict[str, mx.array | None] = {}
    for layer in ("head.dense", "head.norm", "classifier"):
        arrays[f"{layer}.weight"], arrays[f"{layer}.bias"] = _required(
            weights, layer, where, bias_optional=layer != "classifier")
    return ModernBertHead(arrays, pooling, _ACTIVATIONS[activation_name],
                          float(config.get("norm_eps", 1e-5)))  # fmt: skip


def _required(weights: dict[str, mx.array], layer: str, where: str, keep: bool = False,
              bias_optional: bool = False) -> tuple[Any, Any]:  # fmt: skip
    take = weights.get if keep else weights.pop
    weight, bias = take(f"{layer}.weight", None), take(f"{layer}.bias", None)
    missing = [f"{layer}.{part}" for part, array in (("weight", weight), ("bias", bias))
               if array is None and not (part == "bias" and bias_optional)]  # fmt: skip
    if missing:
        raise ValueError(f"{where}: no classifier weights {', '.join(missing)} in the "
                         "checkpoint: not a cross-encoder of this architecture")  # fmt: skip
    return weight, bias


def _f32(array: mx.array | None) -> mx.array | None:
    return None if array is None else array.astype(mx.float32)


def _linear(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    out = x @ weight.astype(mx.float32).T
    return out if bias is None else out + bias.astype(mx.float32)
