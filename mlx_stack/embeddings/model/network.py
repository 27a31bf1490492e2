"""Build a model folder's MLX network, importing only the model file it needs.

mlx-embeddings' and mlx-lm's package ``__init__`` import transformers, mlx-vlm and, when it is
installed, torch: about +360 MB resident and +10 s before the first request. Their model files
need only MLX, so while neither package is imported yet we register them as bare packages
(their real folders, no ``__init__`` run) and import just ``models/<model_type>.py``. Weight
loading mirrors ``mlx_embeddings.utils.load_model``: every ``model*.safetensors`` under the folder
(sentence-transformers Dense folders prefixed with their folder name), ``sanitize``, quantisation.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .architectures import Architecture

_BARE_PARENTS = ("mlx_embeddings", "mlx_lm")


class Network:
    """An MLX module plus how to read per-token hidden states out of it."""

    def __init__(self, module: nn.Module, architecture: Architecture) -> None:
        self.module = module
        self.architecture = architecture

    def hidden_states(self, ids: mx.array, mask: mx.array) -> mx.array:
        """``[batch, tokens, hidden]`` for right-padded ``ids`` with a 0/1 ``mask``."""
        how = self.architecture.hidden_states
        if how == "direct":
            return self.module(ids, attention_mask=mask)
        if how == "windowed":
            return _bidirectional_windows(self.module.model, ids, mask)
        if how == "inner":  # the outer class pools by itself: call the encoder it wraps
            out = self.module.model(ids, attention_mask=mask.astype(mx.float32))
            return out["last_hidden_state"] if isinstance(out, dict) else out[0]
        return self.module(ids, attention_mask=mask).last_hidden_state

    def after_pooling(self, pooled: mx.array) -> mx.array:
        """sentence-transformers Dense layers that some models carry after pooling.

        Each layer gets its input in its compute dtype: the weight's, or for a quantised layer
        (mlx-community's embeddinggemma 4/8-bit) its scales', since its weight is packed
        uint32 and casting to that turned the pooled vector into garbage (NaN out).
        """
        if self.architecture.dense_after_pooling:
            for layer in self.module.dense:
                pooled = layer(pooled.astype(getattr(layer, "scales", layer.weight).dtype))
        return pooled


def _bidirectional_windows(model: Any, ids: mx.array, mask: mx.array) -> mx.array:
    """Gemma 3 as EmbeddingGemma runs it: bidirectional, sliding layers within a window.

    transformers (``use_bidirectional_attention``) lets a sliding layer's token see the tokens
    at most ``sliding_window // 2`` positions away on either side, and the global layers every
    token. mlx-embeddings' class gives every layer the global mask, which changes the vector
    of any text longer than half the window (257 tokens for embeddinggemma-300m; measured on a
    tiny model: cosine 0.89 to sentence-transformers). Which layers slide is read from the
    layers themselves, so the mask always agrees with the rotary base each one uses. Masked
    scores get the dtype's lowest finite value, not -inf: a padding token far from any real
    one has no visible key, and an all -inf row would put NaN into the values others read.
    """
    args = model.config
    hidden = model.embed_tokens(ids)
    # the scale in the compute dtype, as transformers; not the table's: a quantised table is
    # uint32, which would round sqrt(768) = 27.7 down to 27
    hidden = hidden * mx.array(args.hidden_size**0.5, hidden.dtype)
    positions = mx.arange(ids.shape[1])
    near = mx.abs(positions[:, None] - positions[None, :]) <= args.sliding_window // 2
    keys = mask.astype(mx.bool_)[:, None, None, :]
    lowest = mx.array(mx.finfo(hidden.dtype).min, hidden.dtype)
    zero = mx.array(0.0, hidden.dtype)
    full = mx.broadcast_to(mx.where(keys, zero, lowest), (ids.shape[0], 1, *near.shape))
    sliding = mx.where(keys & near, zero, lowest)
    for layer in model.layers:
        hidden = layer(hidden, sliding if layer.self_attn.is_sliding else full, None)
    return model.norm(hidden)


def load_network(path: Path, architecture: Architecture) -> Network:
    """Read config and weights from ``path``; raises ``ValueError``/``OSError`` naming the file."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if architecture.native:
        from . import nomic_bert

        model_file: Any = nomic_bert
    else:
        model_file = import_model_file(f"mlx_embeddings.models.{architecture.model_type}")
    module = model_file.Model(model_file.ModelArgs.from_dict(config))
    match_activations(module, config)
    load_checkpoint(module, config, read_weights(path))
    mx.eval(module.parameters())
    module.eval()
    return Network(module, architecture)


def match_activations(module: nn.Module, config: dict[str, Any]) -> None:
    """Give ModernBERT's feed-forward layers the GELU its config names.

    mlx-embeddings' ``ModernBertMLP`` always uses ``nn.GELU(approx="precise")``, which in MLX
    is the tanh approximation, while ``hidden_activation: gelu`` (every ModernBERT checkpoint)
    means transformers' exact GELU: up to 5e-4 apart per layer, measured 2.4e-4 on a tiny
    cross-encoder's logit, too much for a reranker's 1e-4 parity.
    """
    exact = config.get("hidden_activation", "gelu") == "gelu"
    for _, child in module.named_modules():
        if type(child).__name__ == "ModernBertMLP":
            child.act = nn.GELU() if exact else nn.GELU(approx="precise")


def import_model_file(name: str) -> types.ModuleType:
    """Import ``pkg.models.x`` without running ``pkg/__init__.py`` if nobody has yet."""
    for parent in _BARE_PARENTS:
        if parent in sys.modules:
            continue
        spec = importlib.util.find_spec(parent)  # locates, does not execute
        if spec is None or spec.submodule_search_locations is None:
            continue
        bare = types.ModuleType(parent, f"{parent} (bare: package __init__ skipped)")
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules[parent] = bare
    return importlib.import_module(name)


def read_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(path.glob("**/model*.safetensors")) or sorted(path.glob("weight*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            loaded = mx.load(str(file))
        except Exception as exc:  # MLX raises bare RuntimeError/ValueError for corrupt files
            raise ValueError(f"{file}: cannot read safetensors: {exc}") from None
        assert isinstance(loaded, dict)
        prefix = "" if file.parent == path else f"{file.parent.name}."
        weights.update({prefix + key: value for key, value in loaded.items()})
    return weights


def load_checkpoint(module: nn.Module, config: dict[str, Any], weights: dict[str, Any]) -> None:
    """A folder's weights into a model: the model file's own ``sanitize`` (key renames), the
    folder's quantisation, then the arrays. Shared by embedders and both kinds of reranker."""
    if hasattr(module, "sanitize"):
        weights = module.sanitize(weights)
    _quantize_if_needed(module, config, weights)
    module.load_weights(list(weights.items()))


def _quantize_if_needed(module: nn.Module, config: dict[str, Any], weights: dict[str, Any]) -> None:
    """mlx-community's quantised folders carry ``quantization`` in config.json."""
    quantization = config.get("quantization")
    if not isinstance(quantization, dict):
        return

    def predicate(name: str, layer: nn.Module) -> bool | dict[str, Any]:
        if name in quantization:
            return quantization[name]  # a per-layer bool or {group_size, bits}
        if not hasattr(layer, "to_quantized"):
            return False
        if hasattr(layer, "weight") and layer.weight.size % 64 != 0:
            return False
        return f"{name}.scales" in weights

    nn.quantize(
        module,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )
