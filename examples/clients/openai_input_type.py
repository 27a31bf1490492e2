"""Query and document prefixes through input_type, with the openai SDK (docs/embeddings.md)."""

import os

import numpy as np
from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("MLX_STACK_URL", "http://127.0.0.1:4000/v1"),
    api_key=os.environ["MLX_STACK_KEY"],  # export MLX_STACK_KEY=$(mlx-stack key)
)
questions = ["how do I restore a backup?"]
passages = [
    "Every production database is backed up nightly, and restores are rehearsed monthly.",
    "Book travel through the company portal at least two weeks ahead.",
]

# input_type says what the texts are; the server adds the model's query or document prefix.
q = client.embeddings.create(
    model="local-embed", input=questions, extra_body={"input_type": "query"}
)
d = client.embeddings.create(
    model="local-embed", input=passages, extra_body={"input_type": "document"}
)

scores = np.array([e.embedding for e in d.data]) @ np.array(q.data[0].embedding)
best = int(scores.argmax())
print(f"best passage {best} ({scores[best]:.2f}): {passages[best]}")
