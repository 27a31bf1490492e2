"""A plain sentence-transformers embeddings server (torch, CPU): the benchmark's baseline.

What most people would write: an OpenAI-shaped ``POST /v1/embeddings`` whose requests run one
at a time on a worker thread through ``SentenceTransformer.encode`` (which sorts a request's
texts by length and batches them by 32). torch uses every core for each request; there is no
batching across requests. Supports ``encoding_format: base64`` like OpenAI; ``usage`` is not
counted (the benchmark counts tokens itself, identically for every server).

    python bench/st_server.py --model-path DIR --port 8101
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(model_path: str, name: str) -> Starlette:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu", local_files_only=True)
    worker = ThreadPoolExecutor(max_workers=1)

    def encode(texts: list[str]) -> np.ndarray:
        vectors = model.encode(texts, batch_size=32, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)

    async def embeddings(request: Request) -> Response:
        body: dict[str, Any] = json.loads(await request.body())
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = await asyncio.get_running_loop().run_in_executor(worker, encode, texts)
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if as_base64
                else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": 0, "total_tokens": 0}  # not counted: the client counts
        return JSONResponse({"object": "list", "data": data, "model": name, "usage": usage})

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--served-name", default="minilm")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    app = create_app(args.model_path, args.served_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
