"""Turn token ids into sentence embeddings: one padded forward pass, pooling, normalisation.

The network comes from ``network.py`` (mlx-embeddings' model classes, or our own for
architectures it lacks); tokenising, padding, pooling and normalisation are ours, so they behave
the same across architectures and follow the folder's sentence-transformers settings rather than
each class's hard-wired choice. Batching across requests is ``serving/batcher.py``'s job:
:meth:`forward` runs exactly the batch it is given.

Not thread-safe: the server calls one instance from a single worker thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cpu import blas
from .pooling import pool
from .settings import ModelSettings
from .tokenizer import Encoded, TextTokenizer, pad_batch

WARM_UP_TEXT = "mlx-stack warm-up"
_EMBEDDING_TABLES = ("word_embeddings.weight", "embed_tokens.weight", "tok_embeddings.weight")


@dataclass(frozen=True)
class Embeddings:
    """One embedding per input, in input order, with what ``usage`` needs."""

    vectors: np.ndarray  # float32 [n, dim]
    token_counts: list[int]
    truncated: list[bool]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


class TextEncoder:
    """A loaded network plus its tokenizer and pooling recipe: texts in, sentence vectors out.

    Not the catalog's ``mlx_stack.catalog.EmbeddingModel`` (an entry describing a model).
    """

    engine = "mlx"

    def __init__(self, settings: ModelSettings, network: Any, tokenizer: TextTokenizer) -> None:
        self.settings = settings
        self.engine_choice: Any = None  # set by engine/select.py: why MLX runs this model
        self.tokenizer = tokenizer
        self._network = network
        self.load_seconds = 0.0
        self.fast_kernels: tuple[str, ...] = ()

    @classmethod
    def load(cls, settings: ModelSettings, fast_kernels: bool = True) -> TextEncoder:
        """Load weights from the local folder and run one real forward pass.

        ``fast_kernels`` swaps MLX's slow CPU softmax/GELU for faster equivalents
        (``cpu/fastpath.py``).
        """
        started = time.monotonic()
        blas.preload(model=settings.path)  # no-op if done already; must precede MLX
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from .network import load_network

        network = load_network(settings.path, settings.architecture)
        tokenizer = TextTokenizer(settings.path, settings.max_seq_len)
        instance = cls(settings, network, tokenizer)
        if fast_kernels:
            from ..cpu import fastpath

            instance.fast_kernels = fastpath.install(network.module)
        warm = instance.embed([WARM_UP_TEXT])
        if warm.vectors.shape[1] != settings.dimension:
            raise RuntimeError(
                f"{settings.path}: model produced {warm.vectors.shape[1]} dimensions, "
                f"config.json says {settings.dimension}"
            )
        instance.load_seconds = time.monotonic() - started
        return instance

    @property
    def vocab_size(self) -> int:
        """Token ids a request may send: the tokenizer's vocabulary, capped by the table."""
        table = _embedding_rows(self._network.module)
        vocab = self.tokenizer.vocab_size
        return min(vocab, table) if table else vocab

    def forward(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled, unnormalised float32 vectors for one batch, right-padded here."""
        import mlx.core as mx

        ids_np, mask_np = pad_batch(sequences, self.tokenizer.pad_id)
        ids = mx.array(ids_np)
        mask = mx.array(mask_np)
        hidden = self._network.hidden_states(ids, mask)
        pooled = pool(hidden.astype(mx.float32), mask, self.settings.pooling, mx)
        pooled = self._network.after_pooling(pooled).astype(mx.float32)
        mx.eval(pooled)
        return np.array(pooled)

    def embed(self, texts: Sequence[str], dimensions: int | None = None) -> Embeddings:
        """Tokenise, run, finish: for warm-up and direct use (the server batches instead)."""
        return self.embed_encoded(self.tokenizer.encode(texts), dimensions)

    def embed_encoded(self, encoded: Sequence[Encoded], dimensions: int | None) -> Embeddings:
        vectors = self.forward([e.ids for e in encoded])
        return Embeddings(
            vectors=finish(vectors, dimensions, self.settings.normalize),
            token_counts=[len(e.ids) for e in encoded],
            truncated=[e.truncated for e in encoded],
        )


def finish(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka truncation first, then L2 normalisation, so a shortened vector is unit too."""
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _embedding_rows(module: Any) -> int:
    """Rows of the word-embedding table, wherever the architecture keeps it (0 if unknown)."""
    from mlx.utils import tree_flatten

    for name, value in tree_flatten(module.parameters()):
        if name.endswith(_EMBEDDING_TABLES):
            return int(value.shape[0])
    return 0
