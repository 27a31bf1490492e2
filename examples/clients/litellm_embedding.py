"""litellm.embedding() as a library, through the proxy (docs/clients.md)."""

import os

# Before importing litellm: use its bundled price list instead of downloading one at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm

response = litellm.embedding(
    model="openai/local-embed",  # "openai/" = any OpenAI-compatible server
    api_base=os.environ.get("MLX_STACK_URL", "http://127.0.0.1:4000/v1"),
    api_key=os.environ["MLX_STACK_KEY"],
    input=["optimize API response time", "reduce endpoint latency"],
)
vectors = [d["embedding"] for d in response.data]
print(f"{len(vectors)} vectors of {len(vectors[0])} dimensions")
print(f"similarity {sum(a * b for a, b in zip(*vectors, strict=True)):.2f}")
