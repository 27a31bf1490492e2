"""Embeddings with the openai SDK through the proxy (docs/clients.md)."""

import os

import numpy as np
from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("MLX_STACK_URL", "http://127.0.0.1:4000/v1"),
    api_key=os.environ["MLX_STACK_KEY"],  # export MLX_STACK_KEY=$(mlx-stack key)
)
texts = ["optimize API response time", "reduce endpoint latency", "a recipe for banana bread"]

# The SDK asks for base64 by default and decodes it for you: you get lists of floats.
default = client.embeddings.create(model="local-embed", input=texts)
# encoding_format="float" asks for JSON numbers instead: the same vectors, a bigger response.
floats = client.embeddings.create(model="local-embed", input=texts, encoding_format="float")

a = np.array([d.embedding for d in default.data])
b = np.array([d.embedding for d in floats.data])
print(f"{a.shape[0]} vectors of {a.shape[1]} dimensions, base64 vs float: {abs(a - b).max():.1e}")
# The vectors have unit length, so a dot product is the cosine similarity.
print(f"paraphrase {a[0] @ a[1]:.2f}, unrelated {a[0] @ a[2]:.2f}")
