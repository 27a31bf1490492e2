"""A cross-encoder (reranker): a (query, document) pair in, one relevance logit out.

Hugging Face's ``BertForSequenceClassification`` and ``XLMRobertaForSequenceClassification``
with one label are a BERT-family encoder (mlx-embeddings' ``bert`` / ``xlm_roberta`` model
files, as the embeddings use) and a small head on the first token: dense, tanh, then a linear
layer to the logit. BERT keeps that dense layer as its pooler (``bert.pooler.dense``) and the
last as ``classifier``; RoBERTa keeps both in ``classifier`` (``dense``, ``out_proj``). The
head is four arrays, applied here; the encoder gets the pair's token types (BERT's segments).

Not thread-safe: the server calls one instance from a single worker thread, as the encoder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..cpu import blas
from .settings import ModelSettings
from .tokenizer import PairIds, PairTokenizer

WARM_UP_PAIR = ("mlx-stack warm-up", "a document")

#: Checkpoint prefix of the encoder, and names of the head's (dense, output) layers.
_LAYOUTS = {
    "bert": ("bert.", "bert.pooler.dense", "classifier"),
    "xlm_roberta": ("roberta.", "classifier.dense", "classifier.out_proj"),
}


class CrossEncoder:
    """A loaded cross-encoder and its pair tokenizer."""

    def __init__(self, settings: ModelSettings, encoder: Any, head: tuple[Any, ...],
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
        blas.preload()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import mlx.core as mx

        from .network import _quantize_if_needed, _read_weights, import_model_file

        path = settings.path
        model_type = settings.architecture.model_type
        prefix, dense, output = _LAYOUTS[model_type]
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config["add_pooling_layer"] = model_type == "bert"  # RoBERTa's head has its own dense
        model_file = import_model_file(f"mlx_embeddings.models.{model_type}")
        encoder = model_file.Model(model_file.ModelArgs.from_dict(config))
        weights = _read_weights(path)
        head = tuple(weights.pop(f"{layer}.{part}", None) for layer in (dense, output)
                     for part in ("weight", "bias"))  # fmt: skip
        missing = [f"{layer}.{part}" for (layer, part), w in zip(
            [(dense, "weight"), (dense, "bias"), (output, "weight"), (output, "bias")], head,
            strict=True) if w is None]  # fmt: skip
        if missing:
            raise ValueError(f"{path}: no classifier weights {', '.join(missing)} in the "
                             "checkpoint: not a cross-encoder of this architecture")
        if model_type == "bert":  # the pooler is also part of the encoder module
            weights[f"{dense}.weight"], weights[f"{dense}.bias"] = head[0], head[1]
        weights = {k.removeprefix(prefix): v for k, v in weights.items()}
        if hasattr(encoder, "sanitize"):
            weights = encoder.sanitize(weights)
        _quantize_if_needed(encoder, config, weights)
        encoder.load_weights(list(weights.items()))
        mx.eval(encoder.parameters(), *head)
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
        out = self.module(mx.array(ids), token_type_ids=mx.array(types),
                          attention_mask=mx.array(mask).astype(mx.float32))  # fmt: skip
        first = out.last_hidden_state[:, 0].astype(mx.float32)
        dense_w, dense_b, out_w, out_b = self._head
        hidden = mx.tanh(first @ dense_w.astype(mx.float32).T + dense_b.astype(mx.float32))
        logits = hidden @ out_w.astype(mx.float32).T + out_b.astype(mx.float32)
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
