"""LangChain's ChatOpenAI on a chat tier of the proxy (docs/clients.md)."""

import os

from langchain_openai import ChatOpenAI

llm = ChatOpenAI(
    model="standard",  # a tier name from stack.yaml
    base_url=os.environ.get("MLX_STACK_URL", "http://127.0.0.1:4000/v1"),
    api_key=os.environ["MLX_STACK_KEY"],
    max_tokens=32,
)
reply = llm.invoke("Say hello in five words.")
print(reply.content)
print(f"tokens={reply.usage_metadata['output_tokens']}")

chunks = 0
for chunk in llm.stream("Say hello in five words."):
    if chunk.content:
        chunks += 1
        print(chunk.content, end="", flush=True)
print(f"\nstreamed in {chunks} chunks")
