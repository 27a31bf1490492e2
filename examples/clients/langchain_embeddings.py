"""LangChain's OpenAIEmbeddings on the proxy's local-embed model (docs/clients.md)."""

import os

from langchain_openai import OpenAIEmbeddings

embeddings = OpenAIEmbeddings(
    model="local-embed",
    base_url=os.environ.get("MLX_STACK_URL", "http://127.0.0.1:4000/v1"),
    api_key=os.environ["MLX_STACK_KEY"],
    # Send the texts as they are. The default (True) first splits them with OpenAI's tiktoken
    # tokenizer, which downloads its tables from the internet and does not match local models.
    check_embedding_ctx_length=False,
)
docs = embeddings.embed_documents(["optimize API response time", "a recipe for banana bread"])
query = embeddings.embed_query("reduce endpoint latency")
scores = [sum(q * d for q, d in zip(query, doc, strict=True)) for doc in docs]
print(f"{len(docs)} documents, {len(query)} dimensions, scores {scores[0]:.2f} {scores[1]:.2f}")
