"""NomicBERT (``model_type: nomic_bert``, nomic-embed-text v1/v1.5) in MLX.

mlx-embeddings has no such architecture, and nomic's own code is remote code on the hub, so it
lives here. It reads nomic's config and checkpoint as published (GPT-2 style config names
``n_embd``/``n_head``/..., weights ``encoder.layers.N.attn.Wqkv`` etc.), so a downloaded folder
loads unchanged. The model is a post-norm BERT with rotary position embeddings, a fused QKV
projection, SwiGLU feed-forward layers and no position-embedding table.

Reads top to bottom: arguments, layers, model, ``sanitize``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

MASKED = -1e9
"""Added to attention scores of padding tokens (finite, so an all-pad row cannot make NaN)."""

Attend = Callable[[mx.array, mx.array, mx.array, mx.array, float], mx.array]
"""``(q, k, v, mask_rows, scale) -> context``: q/k/v ``[batch, heads, tokens, head_dim]``,
``mask_rows`` ``[batch, tokens]`` added to every row of scores. ``cpu/fastpath.py`` may swap it."""
GatedActivation = Callable[[mx.array, mx.array], mx.array]
"""``(up, gate) -> up * act(gate)``; ``cpu/fastpath.py`` may swap it."""


def mlx_attention(
    q: mx.array, k: mx.array, v: mx.array, mask_rows: mx.array, scale: float
) -> mx.array:
    mask = mask_rows[:, None, None, :]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


_GATED: dict[str, Callable[[mx.array], mx.array]] = {"swiglu": nn.silu, "geglu": nn.gelu}
_PLAIN = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")
"""nomic's code applies the exact GELU for every ``gelu*`` name."""


@dataclass(frozen=True)
class ModelArgs:
    """The subset of nomic's ``config.json`` that changes the computation."""

    vocab_size: int
    n_embd: int
    n_head: int
    n_layer: int
    n_inner: int
    type_vocab_size: int = 2
    layer_norm_epsilon: float = 1e-12
    rotary_emb_base: float = 10_000.0
    rotary_emb_fraction: float = 1.0
    rotary_emb_interleaved: bool = False
    rotary_scaling_factor: float | None = None
    max_trained_positions: int = 2048
    qkv_proj_bias: bool = True
    mlp_fc1_bias: bool = True
    mlp_fc2_bias: bool = True
    activation_function: str = "swiglu"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Unknown keys are ignored; unsupported variants are refused with the reason."""
        for flag, why in (("prenorm", "only post-norm"), ("causal", "not an embedding model")):
            if config.get(flag):
                raise ValueError(f"nomic_bert with {flag}=true is not supported ({why})")
        if config.get("use_rms_norm"):
            raise ValueError("nomic_bert with use_rms_norm=true is not supported")
        if not config.get("rotary_emb_fraction", 1.0):
            raise ValueError("nomic_bert without rotary embeddings is not supported")
        activation = config.get("activation_function", "swiglu")
        if activation not in _GATED and activation not in _PLAIN:
            raise ValueError(f"nomic_bert activation_function {activation!r} is not supported")
        fields = {
            key: config[key]
            for key in cls.__dataclass_fields__
            if key in config and config[key] is not None
        }
        n_embd = int(config["n_embd"])
        multiple = int(config.get("pad_vocab_size_multiple") or 1)
        fields["vocab_size"] = -(-int(config["vocab_size"]) // multiple) * multiple
        inner = config.get("n_inner")
        if activation in _GATED:  # nomic rounds the gated width up to a multiple of 256
            inner = inner or int(8 * n_embd / 3)
            fields["n_inner"] = -(-inner // 256) * 256
        else:
            fields["n_inner"] = inner or 4 * n_embd
        return cls(**fields)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_emb_fraction)


class Embeddings(nn.Module):
    """Word (+ token-type 0) embeddings; positions come from the rotary encoding instead."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.n_embd)
        if args.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.n_embd)

    def __call__(self, ids: mx.array) -> mx.array:
        words = self.word_embeddings(ids)
        if "token_type_embeddings" in self:
            return words + self.token_type_embeddings.weight[0]
        return words


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.Wqkv = nn.Linear(args.n_embd, 3 * args.n_embd, bias=args.qkv_proj_bias)
        self.out_proj = nn.Linear(args.n_embd, args.n_embd, bias=args.qkv_proj_bias)
        self.attend: Attend = mlx_attention

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, _ = x.shape
        heads, head_dim = self.args.n_head, self.args.head_dim
        qkv = self.Wqkv(x).reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        base = _rotary_base(self.args, length)
        rotate = self.args.rotary_dim
        interleaved = self.args.rotary_emb_interleaved
        q = mx.fast.rope(qkv[0], rotate, traditional=interleaved, base=base, scale=1.0, offset=0)
        k = mx.fast.rope(qkv[1], rotate, traditional=interleaved, base=base, scale=1.0, offset=0)
        out = self.attend(q, k, qkv[2], mask, 1.0 / math.sqrt(head_dim))
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """Gated (``fc11`` up, ``fc12`` through the activation) or plain (``fc1``), then ``fc2``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.activation = args.activation_function
        gate = _GATED.get(args.activation_function)
        self.gated: GatedActivation | None = None
        if gate is not None:
            self.gated = lambda up, x: up * gate(x)
            self.fc11 = nn.Linear(args.n_embd, args.n_inner, bias=args.mlp_fc1_bias)
            self.fc12 = nn.Linear(args.n_embd, args.n_inner, bias=args.mlp_fc1_bias)
        else:
            self.fc1 = nn.Linear(args.n_embd, args.n_inner, bias=args.mlp_fc1_bias)
            self.act = nn.GELU()
        self.fc2 = nn.Linear(args.n_inner, args.n_embd, bias=args.mlp_fc2_bias)

    def __call__(self, x: mx.array) -> mx.array:
        if self.gated is not None:
            return self.fc2(self.gated(self.fc11(x), self.fc12(x)))
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-norm: ``norm1(x + attn(x))`` then ``norm2(x + mlp(x))``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attn = Attention(args)
        self.mlp = FeedForward(args)
        self.norm1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.norm2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.layers = [Block(args) for _ in range(args.n_layer)]


class Model(nn.Module):
    """``Model(ids, attention_mask)`` -> last hidden states ``[batch, tokens, n_embd]``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.emb_ln = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.encoder = Encoder(args)

    def __call__(self, ids: mx.array, attention_mask: mx.array) -> mx.array:
        x = self.emb_ln(self.embeddings(ids))
        mask = mx.where(attention_mask.astype(mx.bool_), 0.0, MASKED).astype(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return x

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop heads that embeddings do not use; accept a ``bert.``-prefixed checkpoint."""
        kept: dict[str, mx.array] = {}
        for key, value in weights.items():
            key = key.removeprefix("bert.")
            if key.startswith(("lm_head.", "cls.", "pooler.")) or "rotary_emb" in key:
                continue
            kept[key] = value
        return kept


def _rotary_base(args: ModelArgs, length: int) -> float:
    """nomic's dynamic NTK scaling: a larger base beyond the trained length, if configured."""
    factor = args.rotary_scaling_factor
    if factor is None or length <= args.max_trained_positions:
        return float(args.rotary_emb_base)
    dim = args.rotary_dim
    grown = (factor * length / args.max_trained_positions) - (factor - 1)
    return float(args.rotary_emb_base * grown ** (dim / (dim - 2)))
