"""Chat and streaming chat with the openai SDK through the proxy (docs/clients.md)."""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("MLX_STACK_URL", "http://127.0.0.1:4000/v1"),
    api_key=os.environ["MLX_STACK_KEY"],  # export MLX_STACK_KEY=$(mlx-stack key)
)
messages = [{"role": "user", "content": "Say hello in five words."}]

reply = client.chat.completions.create(model="standard", messages=messages, max_tokens=32)
print(reply.choices[0].message.content)
print(f"finish_reason={reply.choices[0].finish_reason} tokens={reply.usage.completion_tokens}")

chunks = 0
stream = client.chat.completions.create(
    model="standard", messages=messages, max_tokens=32, stream=True
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        chunks += 1
        print(chunk.choices[0].delta.content, end="", flush=True)
print(f"\nstreamed in {chunks} chunks")
