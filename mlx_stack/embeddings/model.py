"""Run an mlx-embeddings model and turn its hidden states into sentence embeddings.

We borrow only mlx-embeddings' model classes and weight loader (``load_model`` on a local
path, so nothing reaches a hub); tokenising, padding, pooling and normalisation are ours, so
they behave the same across architectures and follow the folder's sentence-transformers
settings rather than each class's hard-wired choice.

Not thread-safe: the server calls one instance from a single worker thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import blas
from .settings import ModelSettings
from .tokenizer import Encoded, TextTokenizer, pad_batch

BATCH_SIZE = 32
"""Sequences per forward pass; inputs are sorted by length first so padding stays small."""


@dataclass(frozen=True)
class Embeddings:
    """One embedding per input, in input order, with what ``usage`` needs."""

    vectors: np.ndarray  # float32 [n, dim]
    token_counts: list[int]
    truncated: list[bool]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


class EmbeddingModel:
    """A loaded model plus its tokenizer and pooling recipe."""

    def __init__(self, settings: ModelSettings, model: Any, tokenizer: TextTokenizer) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self._model = model
        self._vocab_size = int(getattr(model.config, "vocab_size", 0) or tokenizer.vocab_size)
        self.load_seconds = 0.0
        self.fast_gelu_layers = 0

    @classmethod
    def load(cls, settings: ModelSettings, fast_gelu: bool = True) -> EmbeddingModel:
        """Load weights from the local folder and run one real forward pass.

        ``fast_gelu`` swaps exact GELUs for a fused approximation (see ``fastgelu.py``).
        """
        started = time.monotonic()
        blas.preload()  # no-op if done already; must precede the first mlx import
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from mlx_embeddings.utils import load_model

        model = load_model(settings.path, lazy=False, path_to_repo=str(settings.path))
        tokenizer = TextTokenizer(settings.path, settings.max_seq_len)
        instance = cls(settings, model, tokenizer)
        if fast_gelu:
            from . import fastgelu

            instance.fast_gelu_layers = fastgelu.install(model)
        warm = instance.embed(["mlx-stack warm-up"])
        if warm.vectors.shape[1] != settings.dimension:
            raise RuntimeError(
                f"{settings.path}: model produced {warm.vectors.shape[1]} dimensions, "
                f"config.json says {settings.dimension}"
            )
        instance.load_seconds = time.monotonic() - started
        return instance

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def embed(self, texts: Sequence[str], dimensions: int | None = None) -> Embeddings:
        """Embed texts (special tokens added, truncated to ``max_seq_len``)."""
        return self._embed(self.tokenizer.encode(texts), dimensions)

    def embed_token_ids(
        self, inputs: Sequence[Sequence[int]], dimensions: int | None = None
    ) -> Embeddings:
        """Embed pre-tokenised inputs as given (ids must be < :attr:`vocab_size`)."""
        return self._embed([self.tokenizer.truncate_ids(ids) for ids in inputs], dimensions)

    def _embed(self, encoded: list[Encoded], dimensions: int | None) -> Embeddings:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids), reverse=True)
        vectors = np.empty((0, self.settings.dimension), dtype=np.float32)
        for start in range(0, len(order), BATCH_SIZE):
            rows = order[start : start + BATCH_SIZE]
            batch = self._forward([encoded[i].ids for i in rows])
            if start == 0:
                vectors = np.empty((len(encoded), batch.shape[1]), dtype=np.float32)
            vectors[rows] = batch
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = np.ascontiguousarray(vectors[:, :dimensions])
        if self.settings.normalize:
            vectors = _l2_normalise(vectors)
        return Embeddings(
            vectors=vectors,
            token_counts=[len(e.ids) for e in encoded],
            truncated=[e.truncated for e in encoded],
        )

    def _forward(self, sequences: list[list[int]]) -> np.ndarray:
        """Pooled, unnormalised float32 vectors for one right-padded batch."""
        import mlx.core as mx

        ids_np, mask_np = pad_batch(sequences, self.tokenizer.pad_id)
        ids = mx.array(ids_np)
        mask = mx.array(mask_np)
        architecture = self.settings.architecture
        if architecture.hidden_states == "inner":
            out = self._model.model(ids, attention_mask=mask.astype(mx.float32))
            hidden = out["last_hidden_state"] if isinstance(out, dict) else out[0]
        else:
            hidden = self._model(ids, attention_mask=mask).last_hidden_state
        pooled = _pool(hidden.astype(mx.float32), mask, self.settings.pooling)
        if architecture.dense_after_pooling:
            for layer in self._model.dense:
                pooled = layer(pooled.astype(layer.weight.dtype))
        pooled = pooled.astype(mx.float32)
        mx.eval(pooled)
        return np.array(pooled)


def _pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """Attention-mask-aware pooling over [batch, tokens, hidden] (right padding)."""
    import mlx.core as mx

    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.sum(axis=1) - 1
        return hidden[mx.arange(hidden.shape[0]), last]
    weights = mask.astype(mx.float32)[..., None]
    return (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1e-9)


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
