"""Which ``model_type`` values the embeddings server can serve, known without importing MLX.

The CLI validates stack files against :data:`SUPPORTED_ARCHITECTURES` cheaply; the model code
uses :func:`architecture_for` to learn how to get per-token hidden states out of
mlx-embeddings' model class, since its classes disagree on that. ``nomic_bert``, which
mlx-embeddings lacks, is this package's own (``nomic_bert.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Pooling = Literal["mean", "cls", "last"]
POOLINGS: tuple[Pooling, ...] = ("mean", "cls", "last")

HiddenStates = Literal["output", "inner", "direct", "windowed"]


@dataclass(frozen=True)
class Architecture:
    """How to run one mlx-embeddings model family.

    ``hidden_states``: ``output`` reads ``last_hidden_state`` of the model's output (per token);
    ``inner`` calls the wrapped ``model.model`` because the outer class pools on its own;
    ``direct``: the model returns the hidden states itself (our own models);
    ``windowed``: run the wrapped ``model.model``'s layers here, each with its own mask
    (EmbeddingGemma's sliding layers see only nearby tokens, which mlx-embeddings ignores).
    ``dense_after_pooling``: the class carries sentence-transformers Dense layers
    (``model.dense``) that belong after pooling. ``native``: implemented in this package.
    """

    model_type: str
    default_pooling: Pooling = "mean"
    hidden_states: HiddenStates = "output"
    dense_after_pooling: bool = False
    native: bool = False


_ARCHITECTURES = (
    Architecture("bert"),
    Architecture("xlm_roberta"),
    Architecture("modernbert", hidden_states="inner"),
    Architecture("qwen3", default_pooling="last"),
    Architecture("gemma3_text", hidden_states="windowed", dense_after_pooling=True),
    Architecture("llama_bidirec"),
    Architecture("nomic_bert", hidden_states="direct", native=True),
)

SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset(a.model_type for a in _ARCHITECTURES)
CROSS_ENCODER_ARCHITECTURES = ("bert", "xlm_roberta", "modernbert")
"""Cross-encoders the rerank mode runs (``*ForSequenceClassification``, one label): an encoder,
then a head to one relevance logit: BERT/XLM-R dense + tanh on the first token, ModernBERT
pooling + dense + activation + norm + classifier (``model/crossencoder.py``)."""
YES_NO_ARCHITECTURES = ("qwen3",)
"""Causal LMs that rerank by answering "yes" or "no" under a prompt (Qwen3-Reranker,
``*ForCausalLM`` served with ``--task rerank``; ``model/yesno.py``)."""
RERANK_ARCHITECTURES = CROSS_ENCODER_ARCHITECTURES + YES_NO_ARCHITECTURES
"""Text-embedding ``model_type`` values (config.json), after ``-`` -> ``_``."""

HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd")
POSITIONS_KEYS = ("max_position_embeddings", "n_positions")
"""config.json names of the width and the position limit (HF BERT style, then GPT-2 style)."""

_BY_TYPE = {a.model_type: a for a in _ARCHITECTURES}


class UnsupportedArchitectureError(ValueError):
    """The folder's ``model_type`` is not one mlx-embeddings can run as a text embedder."""


def read_model_type(model_path: Path) -> str:
    """The normalised ``model_type`` of a Hugging Face folder; raises ``ValueError`` if absent."""
    config_file = model_path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{config_file} not found: not a Hugging Face model folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file} is unreadable: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{config_file} has no model_type")
    return model_type.replace("-", "_")


def architecture_for(model_type: str) -> Architecture:
    """The recipe for ``model_type``, or a message listing what is supported."""
    normalised = model_type.replace("-", "_")
    try:
        return _BY_TYPE[normalised]
    except KeyError:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by the embeddings server "
            f"(supported: {supported}); pick a model of one of these types"
        ) from None
