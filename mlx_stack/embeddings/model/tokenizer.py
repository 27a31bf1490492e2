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
from typing import Any

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


def open_tokenizer(model_path: Path) -> tuple[Tokenizer, int]:
    """The folder's ``tokenizer.json`` with its own padding and truncation switched off (we pad
    per batch and cut by our own rules), and its pad token's id (read before padding is off)."""
    tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    pad_id = _pad_id(tokenizer, model_path)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, pad_id


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


class PairIds(list[int]):
    """A (query, document) pair's token ids, with the token type of each (BERT's segment ids):
    a list, so the batcher plans passes by its length as for a text."""

    type_ids: list[int]
    full_length: int

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self)


class PairTokenizer:
    """(query, document) pairs -> ids in the model's pair template (``[CLS] q [SEP] d [SEP]``).

    A pair longer than the model's maximum loses document tokens first; a query longer than
    half the maximum is cut to that half, so every document keeps the other half.
    """

    def __init__(self, model_path: Path, max_length: int) -> None:
        self._tokenizer, self.pad_id = open_tokenizer(model_path)
        self._specials = int(self._tokenizer.num_special_tokens_to_add(True))
        if max_length <= self._specials + 1:
            raise ValueError(f"a maximum of {max_length} tokens leaves no room for a pair")
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode_pairs(
        self, query: str, documents: Sequence[str], max_document_tokens: int | None = None
    ) -> list[PairIds]:
        budget = self.max_length - self._specials
        query_enc = self._tokenizer.encode(query, add_special_tokens=False)
        docs = self._tokenizer.encode_batch(list(documents), add_special_tokens=False)
        pairs = []
        for doc in docs:
            q_len, d_len = len(query_enc.ids), len(doc.ids)
            full = q_len + d_len + self._specials
            if max_document_tokens is not None:
                d_len = min(d_len, max_document_tokens)
            if q_len + d_len > budget:
                q_len = min(q_len, max(budget - d_len, budget // 2))
                d_len = budget - q_len
            pairs.append(self._pair(query_enc, q_len, doc, d_len, full))
        return pairs

    def _pair(self, query: Any, q_len: int, doc: Any, d_len: int, full: int) -> PairIds:
        query, doc = _cut(query, q_len), _cut(doc, d_len)
        joined = self._tokenizer.post_process(query, doc, add_special_tokens=True)
        pair = PairIds(joined.ids)
        pair.type_ids = list(joined.type_ids)
        pair.full_length = full
        return pair


def _cut(encoding: Any, length: int) -> Any:
    if len(encoding.ids) > length:
        encoding.truncate(length)
    return encoding
