"""The prompt a yes/no reranker (Qwen3-Reranker) reads, as token ids.

The model card's usage: a system turn stating the task, a user turn
``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}``, and the assistant's turn
opened with an empty think block; the model's next token is "yes" or "no". The card tokenises
the user turn as one string; here it is tokenised in two pieces, ``...<Document>:`` and
``" " + doc``, which gives the same ids (the byte-level pre-tokeniser always splits between
``:`` and a following space) and lets a long document be cut without re-tokenising. A pair
longer than the maximum loses document tokens first (the card's truncation cuts the end of the
user turn, which is the document); a query longer than half the maximum is cut to that half,
keeping the template around it, as the cross-encoders' pair tokenizer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .tokenizer import PairIds, open_tokenizer

SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the '
          'Instruct provided. Note that the answer can only be "yes" or "no".')  # fmt: skip
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
ANSWERS = ("no", "yes")
"""The two answer tokens, in the order of the card's softmax ``[no, yes]``."""


class PromptTokenizer:
    """(query, document) pairs -> the ids of the whole prompt, unpadded."""

    def __init__(self, model_path: Path, max_length: int,
                 instruction: str = DEFAULT_INSTRUCTION) -> None:  # fmt: skip
        self._tokenizer, self.pad_id = open_tokenizer(model_path)
        self.instruction = instruction
        self.answer_ids = tuple(self._id(token) for token in ANSWERS)
        self._prefix = self._encode(PREFIX)
        self._suffix = self._encode(SUFFIX)
        self._query_open = self._encode(f"<Instruct>: {instruction}\n<Query>:")
        self._query_close = self._encode("\n<Document>:")
        template = len(self._prefix) + len(self._suffix)
        if (max_length - template) // 2 <= len(self._query_open) + len(self._query_close):
            raise ValueError(f"a maximum of {max_length} tokens leaves no room for a query and "
                             f"a document in the reranker's {template}-token template")
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode_pairs(
        self, query: str, documents: Sequence[str], max_document_tokens: int | None = None
    ) -> list[PairIds]:
        budget = self.max_length - len(self._prefix) - len(self._suffix)
        head = self._encode(f"<Instruct>: {self.instruction}\n<Query>: {query}\n<Document>:")
        docs = self._tokenizer.encode_batch([" " + d for d in documents], add_special_tokens=False)
        pairs = []
        for doc in docs:
            d_len = len(doc.ids)
            full = len(self._prefix) + len(head) + d_len + len(self._suffix)
            if max_document_tokens is not None:
                d_len = min(d_len, max_document_tokens)
            user = head
            if len(head) + d_len > budget:
                keep = min(len(head), max(budget - d_len, budget // 2))
                user = head if keep == len(head) else self._cut_query(query, keep)
                d_len = budget - len(user)
            pair = PairIds([*self._prefix, *user, *doc.ids[:d_len], *self._suffix])
            pair.type_ids = [0] * len(pair)
            pair.full_length = full
            pairs.append(pair)
        return pairs

    def _cut_query(self, query: str, length: int) -> list[int]:
        """The user turn's head in ``length`` tokens: the query cut, the template whole."""
        room = length - len(self._query_open) - len(self._query_close)
        cut = self._encode(" " + query)[:room]
        return [*self._query_open, *cut, *self._query_close]

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _id(self, token: str) -> int:
        found = self._tokenizer.token_to_id(token)
        if found is None:
            raise ValueError(f"the tokenizer has no {token!r} token: not a yes/no reranker")
        return int(found)
