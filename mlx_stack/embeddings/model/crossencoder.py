"""A cross-encoder (reranker): a (query, document) pair in, one relevance logit out.

Hugging Face's ``*ForSequenceClassification`` with one label is an encoder (mlx-embeddings'
model file, as the embeddings use) and a small head, applied here from its checkpoint arrays
because mlx-embeddings' own heads differ from transformers' (see :mod:`.heads`). BERT and
XLM-RoBERTa get the pair's token types (BERT's segments); ModernBERT has none.

Not thread-safe: the server calls one instance from a single worker thread, as the encoder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..cpu import blas
from .settings import ModelSettings
from .tokenizer import PairIds, PairTokenizer

WARM_UP_PAIR = ("mlx-stack warm-up", "a document")


class _Layout(NamedTuple):
    """Where a family keeps its encoder in the checkpoint, and which encoder class runs it."""

    prefix: str
    encoder_class: str
    token_types: bool


_LAYOUTS = {
    "bert": _Layout("bert.", "Model", True),
    "xlm_roberta": _Layout("roberta.", "Model", True),
    "modernbert": _Layout("model.", "ModernBertModel", False),
}


class CrossEncoder:
    """A loaded cross-encoder and its pair tokenizer."""

    def __init__(self, settings: ModelSettings, encoder: Any, head: Any,
                 tokenizer: PairTokenizer) -> None:  # fmt: skip
        self.settings = settings
        self.tokenizer = tokenizer
        self.module = encoder
        self._head = head
        self.load_seconds = 0.0
        self.fast_kernels: tuple[str, ...] = ()

    @classmethod
    def load(cls, settings: ModelSettings, fast_kernels: bool = True) -> CrossEncoder:
        """Load the folder and score one pair (a real forward pass) before serving."""
        started = time.monotonic()
        blas.preload(model=settings.path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import mlx.core as mx

        from .heads import take_head
        from .network import import_model_file, load_checkpoint, match_activations, read_weights

        path = settings.path
        model_type = settings.architecture.model_type
        layout = _LAYOUTS[model_type]
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config["add_pooling_layer"] = model_type == "bert"  # RoBERTa's head has its own dense
        model_file = import_model_file(f"mlx_embeddings.models.{model_type}")
        args = model_file.ModelArgs.from_dict(config)
        encoder = getattr(model_file, layout.encoder_class)(args)
        match_activations(encoder, config)
        weights = read_weights(path)
        head = take_head(model_type, config, weights, str(path))
        load_checkpoint(encoder, config,
                        {k.removeprefix(layout.prefix): v for k, v in weights.items()})
        mx.eval(encoder.parameters(), *head.arrays())
        encoder.eval()
        instance = cls(settings, encoder, head, PairTokenizer(path, settings.max_seq_len))
        if fast_kernels:
            from ..cpu import fastpath

            instance.fast_kernels = fastpath.install(encoder)
        instance.forward(instance.tokenizer.encode_pairs(WARM_UP_PAIR[0], [WARM_UP_PAIR[1]]))
        instance.load_seconds = time.monotonic() - started
        return instance

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def forward(self, pairs: Sequence[PairIds]) -> np.ndarray:
        """Relevance logits ``[n, 1]`` (float32) for one batch, right-padded here."""
        import mlx.core as mx

        longest = max(len(p) for p in pairs)
        ids = np.full((len(pairs), longest), self.tokenizer.pad_id, dtype=np.int32)
        types = np.zeros((len(pairs), longest), dtype=np.int32)
        mask = np.zeros((len(pairs), longest), dtype=np.int32)
        for row, pair in enumerate(pairs):
            ids[row, : len(pair)] = pair
            types[row, : len(pair)] = pair.type_ids
            mask[row, : len(pair)] = 1
        mask_f = mx.array(mask).astype(mx.float32)
        if _LAYOUTS[self.settings.architecture.model_type].token_types:
            out = self.module(mx.array(ids), token_type_ids=mx.array(types),
                              attention_mask=mask_f).last_hidden_state  # fmt: skip
        else:
            out = self.module(mx.array(ids), attention_mask=mask_f)["last_hidden_state"]
        logits = self._head(out.astype(mx.float32), mask_f)
        mx.eval(logits)
        return np.array(logits, dtype=np.float32)


def relevance(logits: np.ndarray) -> np.ndarray:
    """The model's relevance probability: the sigmoid of its logit (sentence-transformers'
    ``CrossEncoder`` default for one label), computed without overflow."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out
