"""Tokenise with the `tokenizers` library straight from ``tokenizer.json``.

We skip ``transformers``' tokenizer classes (slow to import, and mlx-embeddings' wrapper may
reach for the hub) and take control of two settings the file may carry: a fixed padding length
(MiniLM's pads every input to 128 tokens, wasting compute) and its own truncation length.
Padding is done per batch, by :func:`pad_batch`, to the longest member.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Encoded:
    """Token ids of one input after truncation, and its length before."""

    ids: list[int]
    full_length: int

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.ids)


class TextTokenizer:
    """Text -> token ids, truncated to ``max_length``, unpadded."""

    def __init__(self, model_path: Path, max_length: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        self.pad_id = _pad_id(self._tokenizer, model_path)  # before padding is switched off
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self._specials = int(self._tokenizer.num_special_tokens_to_add(False))
        self._encode_batch = getattr(
            self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch
        )  # the fast variant skips character offsets, which we never use
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Encode with the model's special tokens (``[CLS] ... [SEP]`` for BERT)."""
        encodings = self._encode_batch(list(texts), add_special_tokens=True)
        return [
            Encoded(
                e.ids,
                len(e.ids) + sum(len(o.ids) - self._specials for o in e.overflowing),
            )
            for e in encodings
        ]

    def truncate_ids(self, ids: Sequence[int] | np.ndarray) -> Encoded:
        """Pre-tokenised input is taken as-is (OpenAI semantics): no special tokens added."""
        return Encoded([int(i) for i in ids[: self.max_length]], len(ids))


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence: (ids int32 [n, t], attention mask int32 [n, t])."""
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), longest), dtype=np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def _pad_id(tokenizer: Tokenizer, model_path: Path) -> int:
    """The pad token's id; its value hardly matters (masked out) but must be a valid row."""
    padding = tokenizer.padding
    if padding and isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            token = json.loads((model_path / name).read_text(encoding="utf-8")).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return int(tokenizer.token_to_id(token))
    return 0
