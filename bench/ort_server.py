"""An ONNX Runtime embeddings server (CPU): the benchmark's strongest CPU peer.

What sentence-transformers' ``backend="onnx"`` runs: the model's transformer exported to ONNX,
one ``onnxruntime.InferenceSession`` (default options: every graph optimisation, one intra-op
thread per core), then the model's pooling and normalisation. sentence-transformers itself
cannot load it here: its ONNX backend needs ``optimum-onnx``, whose newest release (0.1.0)
wants transformers < 4.58 while sentence-transformers 6.2 wants transformers >= 5. So this
server does the same three steps itself (tokenise, session, mean-pool + L2), and the
benchmark checks its vectors against mlx-stack's. Requests run one at a time on a worker
thread, as in ``st_server.py``; no batching across requests.

    python bench/ort_server.py --model-path DIR --onnx FILE --port 8102
    python bench/ort_server.py --model-path DIR --export FILE   # once, needs torch + onnx
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export(model_path: Path, out: Path) -> None:
    """Write the model's transformer as ONNX (dynamic batch and length), via torch's exporter."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_path), attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        """Keyword arguments in, last hidden state out: transformers 5 reordered forward()."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids: Any, mask: Any, types: Any) -> Any:
            return self.inner(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]

    ids = torch.ones(2, 8, dtype=torch.long)
    out.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUTS, "last_hidden_state")}
    torch.onnx.export(
        Hidden(), (ids, ids, torch.zeros_like(ids)), str(out), input_names=list(INPUTS),
        output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False,
    )


def create_app(model_path: str, onnx_path: str, name: str) -> Any:
    import onnxruntime as ort
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from tokenizers import Tokenizer

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    tokenizer.enable_truncation(256)
    tokenizer.enable_padding()
    worker = ThreadPoolExecutor(max_workers=1)

    def encode(texts: list[str]) -> np.ndarray:
        encoded = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = session.run(None, feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

    def encode_in_batches(texts: list[str]) -> np.ndarray:
        """Length-sorted batches of 32, as sentence-transformers' ``encode`` does."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts: dict[int, np.ndarray] = {}
        for start in range(0, len(order), 32):
            chunk = order[start : start + 32]
            for i, vector in zip(chunk, encode([texts[i] for i in chunk]), strict=True):
                parts[i] = vector
        return np.stack([parts[i] for i in range(len(texts))])

    async def embeddings(request: Request) -> Response:
        body: dict[str, Any] = json.loads(await request.body())
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(worker, encode_in_batches, texts)
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

    return Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--onnx", help="the exported model.onnx to serve")
    parser.add_argument("--export", type=Path, help="export the model to this file and exit")
    parser.add_argument("--served-name", default="minilm")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8102)
    args = parser.parse_args()
    if args.export is not None:
        export(Path(args.model_path), args.export)
        return
    import uvicorn

    app = create_app(args.model_path, args.onnx, args.served_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
