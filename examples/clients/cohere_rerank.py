"""Cohere's Python SDK, reranking through the proxy's local-rerank model (docs/clients.md)."""

import os

import cohere

proxy = os.environ.get("MLX_STACK_URL", "http://127.0.0.1:4000/v1").removesuffix("/v1")
co = cohere.ClientV2(api_key=os.environ["MLX_STACK_KEY"], base_url=proxy)  # calls /v2/rerank

response = co.rerank(
    model="local-rerank",
    query="reduce endpoint latency",
    documents=["Optimize API response time", "Travel and expenses", "Load testing"],
    top_n=2,
)
for result in response.results:
    print(f"document {result.index}: relevance {result.relevance_score:.3f}")
