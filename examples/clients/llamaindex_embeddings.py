"""LlamaIndex's OpenAI-compatible embedding class on local-embed, in a small index."""

import os

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.embeddings.openai_like import OpenAILikeEmbedding

Settings.embed_model = OpenAILikeEmbedding(
    model_name="local-embed",
    api_base=os.environ.get("MLX_STACK_URL", "http://127.0.0.1:4000/v1"),
    api_key=os.environ["MLX_STACK_KEY"],
    embed_batch_size=64,
)
# LlamaIndex sizes chunks with tiktoken, which downloads its tables on first use. Counting
# words instead keeps indexing offline (chunk sizes are then in words, not tokens).
Settings.tokenizer = str.split

notes = [
    "Optimize API response time: profile slow routes, add the missing index, cache results.",
    "Banana bread: three ripe bananas, flour, butter, one hour in the oven.",
    "Travel: book through the portal two weeks ahead; economy under six hours.",
]
index = VectorStoreIndex.from_documents([Document(text=n) for n in notes])
for hit in index.as_retriever(similarity_top_k=2).retrieve("reduce endpoint latency"):
    print(f"{hit.score:.2f}  {hit.text}")
