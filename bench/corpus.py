"""The benchmark's fixed corpus: deterministic, mixed-length English-like texts.

Lengths follow a retrieval workload: half short (queries, titles: 4-16 words), a third medium
(passages: 25-80 words), the rest long (chunks: 100-260 words, some beyond MiniLM's 256-token
limit, so truncation is exercised too). Built from a seeded generator, so every run and every
server sees the same texts in the same order.
"""

from __future__ import annotations

import random

_VOCABULARY = (
    "the of and to in is was for on that with as by at from this it an be are or which one "
    "all would there their what so up out if about who get go me when make can like time no "
    "just him know take people into year your good some could them see other than then now "
    "look only come its over think also back after use two how our work first well way even "
    "new want because any these give day most us model server batch token vector memory "
    "latency throughput request client queue embedding search query document index cosine "
    "python linux machine core thread kernel matrix layer attention pooling weight cache disk "
    "network process signal timeout retry health river mountain history music garden city "
    "library science market energy climate ocean forest language travel recipe medicine law"
)
_WORDS = tuple(_VOCABULARY.split())

SIZES = ((0.50, 4, 16), (0.85, 25, 80), (1.00, 100, 260))
"""(cumulative share, fewest words, most words)."""


def build(count: int = 1024, seed: int = 20251122) -> list[str]:
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(count):
        draw = rng.random()
        low, high = next((lo, hi) for share, lo, hi in SIZES if draw < share)
        words = [rng.choice(_WORDS) for _ in range(rng.randint(low, high))]
        sentences: list[str] = []
        while words:
            cut = rng.randint(6, 18)
            sentence, words = words[:cut], words[cut:]
            sentences.append(" ".join(sentence).capitalize() + ".")
        texts.append(" ".join(sentences))
    return texts
