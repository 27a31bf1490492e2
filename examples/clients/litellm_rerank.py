"""litellm.rerank() as a library, through the proxy's local-rerank model (docs/clients.md)."""

import os

# Before importing litellm: use its bundled price list instead of downloading one at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm

response = litellm.rerank(
    model="cohere/local-rerank",  # "cohere/" = Cohere's rerank API, which the proxy speaks
    api_base=os.environ.get("MLX_STACK_URL", "http://127.0.0.1:4000/v1").removesuffix("/v1"),
    api_key=os.environ["MLX_STACK_KEY"],
    query="reduce endpoint latency",
    documents=["Optimize API response time", "Travel and expenses", "Load testing"],
    top_n=2,
)
for result in response.results:
    print(f"document {result['index']}: relevance {result['relevance_score']:.3f}")
