"""An LLM-style reranker: a causal LM asked whether the document answers the query.

Qwen3-Reranker is a plain ``Qwen3ForCausalLM``: its score is P("yes") against "no" for the
token after the prompt (:mod:`.yesnoprompt`), ``softmax([no, yes])[yes]``, which equals
``sigmoid(yes - no)``. So :meth:`YesNoReranker.forward` returns the logit difference and the
server's sigmoid (the cross-encoders') gives the card's probability; ``raw_scores`` gives the
log-odds. The network is mlx-lm's ``qwen3`` model file (imported without mlx-lm's package
``__init__``); only the last real token's hidden state meets the output layer, and only its
two answer rows (dequantised once at load for a quantised model), not the whole vocabulary.

Pairs are padded on the right, not on the left as the card does: under the causal mask a
token never sees later padding, so a row's positions and result do not depend on its batch
(rotary attention depends only on relative positions, so the card's left padding gives the
same scores up to rounding).

Not thread-safe: the server calls one instance from a single worker thread.
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
from .tokenizer import PairIds
from .yesnoprompt import PromptTokenizer

WARM_UP_PAIR = ("mlx-stack warm-up", "a document")


class YesNoReranker:
    """A loaded causal LM, its two answer rows ``[no, yes]`` and its prompt tokenizer."""

    def __init__(self, settings: ModelSettings, module: Any, answers: Any,
                 tokenizer: PromptTokenizer) -> None:  # fmt: skip
        self.settings = settings
        self.tokenizer = tokenizer
        self.module = module
        self._answers = answers
        self.load_seconds = 0.0
        self.fast_kernels: tuple[str, ...] = ()

    @classmethod
    def load(cls, settings: ModelSettings) -> YesNoReranker:
        """Load the folder and score one pair (a real forward pass) before serving."""
        started = time.monotonic()
        blas.preload(model=settings.path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import mlx.core as mx

        from .network import import_model_file, load_checkpoint, read_weights

        path = settings.path
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        model_file = import_model_file(f"mlx_lm.models.{settings.architecture.model_type}")
        module = model_file.Model(model_file.ModelArgs.from_dict(config))
        load_checkpoint(module, config, read_weights(path))
        module.eval()
        tokenizer = PromptTokenizer(path, settings.max_seq_len)
        output = module.model.embed_tokens if module.args.tie_word_embeddings else module.lm_head
        answers = _rows(output, tokenizer.answer_ids)
        mx.eval(module.parameters(), answers)
        instance = cls(settings, module, answers, tokenizer)
        instance.forward(tokenizer.encode_pairs(WARM_UP_PAIR[0], [WARM_UP_PAIR[1]]))
        instance.load_seconds = time.monotonic() - started
        return instance

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def forward(self, pairs: Sequence[PairIds]) -> np.ndarray:
        """``logit(yes) - logit(no)`` at each prompt's last token, ``[n, 1]`` float32."""
        import mlx.core as mx

        longest = max(len(p) for p in pairs)
        ids = np.full((len(pairs), longest), self.tokenizer.pad_id, dtype=np.int32)
        for row, pair in enumerate(pairs):
            ids[row, : len(pair)] = pair
        last = mx.array([len(p) - 1 for p in pairs])
        hidden = self.module.model(mx.array(ids))  # causal mask, final norm applied
        final = hidden[mx.arange(len(pairs)), last].astype(mx.float32)
        no_yes = final @ self._answers.T
        logits = no_yes[:, 1:2] - no_yes[:, 0:1]
        mx.eval(logits)
        return np.array(logits, dtype=np.float32)


def _rows(layer: Any, ids: tuple[int, ...]) -> Any:
    """The output layer's rows for ``ids`` in float32 (a tied embedding or ``lm_head``, plain or
    quantised: a quantised row is independent of the others, so it dequantises alone)."""
    import mlx.core as mx

    index = mx.array(list(ids))
    if hasattr(layer, "scales"):
        biases = layer.biases[index] if getattr(layer, "biases", None) is not None else None
        rows = mx.dequantize(layer.weight[index], layer.scales[index], biases,
                             group_size=layer.group_size, bits=layer.bits,
                             mode=getattr(layer, "mode", "affine"))  # fmt: skip
    else:
        rows = layer.weight[index]
    return rows.astype(mx.float32)
