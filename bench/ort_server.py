"""An ONNX Runtime embeddings server (CPU): the benchmark's strongest CPU peer, for any model.

What sentence-transformers' ``backend="onnx"`` runs: the model's transformer exported to ONNX,
one ``onnxruntime.InferenceSession`` (default options: every graph optimisation, one intra-op
thread per core), then the folder's own sentence-transformers modules after it. Those cannot
run through sentence-transformers here (its ONNX backend needs ``optimum-onnx``, whose newest
release wants transformers < 4.58 while sentence-transformers 6.2 wants >= 5), so this server
does the steps itself, read from the folder as sentence-transformers reads them: the pooling of
``1_Pooling/config.json`` (mean, CLS or last token), the ``N_Dense`` layers (EmbeddingGemma's),
then L2. Texts are padded on the right, so the last token of a row is its last unmasked one
(the causal models' last-token pooling needs no left padding then). Requests run one at a time
on a worker thread, as in ``st_server.py``; no batching across requests. The benchmark checks
its vectors against mlx-stack's (cosine) before measuring it.

    python bench/ort_server.py --model-path DIR --onnx FILE --port 8102
    python bench/ort_server.py --model-path DIR --export FILE   # once, needs torch + onnx
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
            "pooling_mode_lasttoken": "lasttoken"}  # fmt: skip
MAX_TOKENS = 256


def export(model_path: Path, out: Path) -> None:
    """Write the model's transformer as ONNX (dynamic batch and length), via torch's exporter.

    Inputs are what the model's ``forward`` takes of ids, mask and token types; models over
    2 GB are written with their weights as external data next to ``out``.
    """
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_path), attn_implementation="eager").eval()
    accepted = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in accepted
                                               else [])  # fmt: skip

    extra = {"use_cache": False} if "use_cache" in accepted else {}
    config = model.config
    bidirectional_window = (config.sliding_window if getattr(config, "model_type", "") ==
                            "gemma3_text" and getattr(config, "use_bidirectional_attention",
                                                      False) else None)  # fmt: skip

    class Hidden(torch.nn.Module):
        """Keyword arguments in, last hidden state out: transformers 5 reordered forward()."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *args: Any) -> Any:
            feeds = dict(zip(names, args, strict=True))
            if bidirectional_window is not None:
                feeds["attention_mask"] = _gemma_masks(feeds["attention_mask"],
                                                       bidirectional_window)  # fmt: skip
            return self.inner(**feeds, **extra)[0]

    ids = torch.full((2, 8), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row, so the traced graph keeps the mask's path
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    out.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch", 1: "tokens"} for name in (*names, "last_hidden_state")}
    with torch.no_grad():
        torch.onnx.export(
            Hidden(), tuple(feeds[n] for n in names), str(out), input_names=names,
            output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
            dynamo=False,
        )


def _gemma_masks(mask: Any, window: int) -> dict[str, Any]:
    """EmbeddingGemma's two masks, built here: transformers' own mask builder (vmap) does not
    trace. Additive, ``[batch, 1, query, key]``: every unpadded key for the global layers,
    those nearer than ``window`` for the sliding ones (bidirectional both)."""
    import torch

    keys = mask[:, None, None, :].bool()
    positions = torch.arange(mask.shape[1])
    near = (positions[None, :] - positions[:, None]).abs() < window
    low = torch.finfo(torch.float32).min

    def additive(allowed: Any) -> Any:
        return torch.where(allowed, torch.tensor(0.0), torch.tensor(low))

    return {"full_attention": additive(keys), "sliding_attention": additive(keys & near)}


@dataclass(frozen=True)
class Head:
    """The folder's sentence-transformers modules after the transformer."""

    pooling: str
    dense: tuple[np.ndarray, ...]
    """Weights ``[out, in]`` of the Dense layers in order (no bias, identity activation)."""

    @classmethod
    def read(cls, folder: Path) -> Head:
        modules = json.loads((folder / "modules.json").read_text())
        pooling, dense = "mean", []
        for module in modules:
            kind, path = module["type"].rsplit(".", 1)[-1], folder / module.get("path", "")
            if kind == "Pooling":
                config = json.loads((path / "config.json").read_text())
                on = [POOLINGS[k] for k in POOLINGS if config.get(k)]
                extra = [k for k, v in config.items() if k.startswith("pooling_mode") and v
                         and k not in POOLINGS]  # fmt: skip
                if len(on) != 1 or extra:
                    raise SystemExit(f"{path}: pooling {on + extra} not supported by this peer")
                pooling = on[0]
            elif kind == "Dense":
                dense.append(_dense_weight(path))
            elif kind not in ("Transformer", "Normalize"):
                raise SystemExit(f"{folder}: module {module['type']} not supported by this peer")
        return cls(pooling, tuple(dense))

    def apply(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Pool (right-padded rows), Dense layers, L2."""
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "lasttoken":
            last = mask.sum(axis=1) - 1
            pooled = hidden[np.arange(hidden.shape[0]), last]
        else:
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        for weight in self.dense:
            pooled = pooled @ weight.T
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def _dense_weight(folder: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    if config.get("bias", True) or not str(config.get("activation_function", "")).endswith(
        "Identity"
    ):
        raise SystemExit(f"{folder}: only bias-free, identity Dense layers are supported")
    return load_file(str(folder / "model.safetensors"))["linear.weight"].astype(np.float32)


def make_encoder(model_path: Path, onnx_path: str) -> Callable[[list[str]], np.ndarray]:
    """Texts in, normalised vectors out, in length-sorted batches of 32 as sentence-transformers."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    head = Head.read(model_path)
    tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    pad_id = _pad_id(model_path, tokenizer)
    tokenizer.enable_padding(direction="right", pad_id=pad_id)

    def encode(texts: list[str]) -> np.ndarray:
        encoded = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = session.run(None, {name: feeds[name] for name in wanted})[0]
        return head.apply(hidden, mask)

    def encode_in_batches(texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts: dict[int, np.ndarray] = {}
        for start in range(0, len(order), 32):
            chunk = order[start : start + 32]
            for i, vector in zip(chunk, encode([texts[i] for i in chunk]), strict=True):
                parts[i] = vector
        return np.stack([parts[i] for i in range(len(texts))])

    return encode_in_batches


def _pad_id(folder: Path, tokenizer: Any) -> int:
    """The pad token of ``tokenizer_config.json`` (any id would do: padded rows are masked)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    token = config.get("pad_token")
    if isinstance(token, dict):
        token = token.get("content")
    found = tokenizer.token_to_id(token) if isinstance(token, str) else None
    return int(found) if found is not None else 0


def create_app(model_path: str, onnx_path: str, name: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    encode = make_encoder(Path(model_path), onnx_path)
    worker = ThreadPoolExecutor(max_workers=1)

    async def embeddings(request: Request) -> Response:
        body: dict[str, Any] = json.loads(await request.body())
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(worker, encode, texts)
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
