"""A small real OpenAI-compatible server, or an Ollama-shaped one, for external-tier tests.

Run as a program (``python fakeopenai.py --port N [--flavour ollama]``): the stack starts it as
a ``command:`` tier, or a test starts it and names it as a ``url:`` tier. llama.cpp's server,
vllm-mlx or a real Ollama are not needed to test how the stack runs, probes, routes and
normalises an external server: this program speaks the same HTTP (and Ollama's quirks).

- ``openai`` flavour: ``/v1/chat/completions`` (plain and streamed), ``/v1/embeddings`` that
  honours ``encoding_format`` and ``dimensions`` as OpenAI does, ``/v1/models``, ``/health``.
- ``ollama`` flavour, as Ollama's OpenAI face behaves: ``/v1/embeddings`` ignores
  ``encoding_format`` (floats always) and ``dimensions`` (full length); plus Ollama's own
  ``/api/version``, ``/api/tags``, ``/api/embed``; model names match with or without
  ``:latest``; an unknown model is a 404 as Ollama's "model ... not found".

Vectors are unit length and a fixed function of the text (``vector_for``), so a test can
compute the exact vector a client must receive. ``--key-file``: every route but the health
ones wants ``Authorization: Bearer <key>`` (401 otherwise). ``--record``: every POST's path,
headers and body are appended to a file as JSON lines.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

HEALTH_PATHS = ("/health", "/api/version", "/")


def vector_for(text: str, dims: int) -> np.ndarray:
    """The fake model's embedding of ``text``: unit length, the same on every run."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vec = np.random.default_rng(seed).standard_normal(dims)
    return vec / np.linalg.norm(vec)


class Options:
    flavour = "openai"
    model = "fake-model"
    dims = 64
    key: str | None = None
    record: str | None = None
    tag = ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, body: object, status: int = 200) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, message: str) -> None:
        if Options.flavour == "ollama":
            self._send({"error": {"message": message, "type": "api_error", "param": None,
                                  "code": None}}, status)
        else:
            self._send({"error": {"message": message, "type": "invalid_request_error",
                                  "param": None, "code": None}}, status)

    def _authorised(self) -> bool:
        if Options.key is None:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {Options.key}":
            return True
        self._error(401, "fake: missing or wrong bearer key")
        return False

    def _known(self, model: object) -> bool:
        names = {Options.model, f"{Options.model}:latest"}
        if model in names:
            return True
        if Options.flavour == "ollama":
            self._error(404, f'model "{model}" not found, try pulling it first')
        else:
            self._error(404, f"The model `{model}` does not exist")
        return False

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path in HEALTH_PATHS:
            self._send({"version": "0.0.0-fake"} if path == "/api/version"
                       else {"status": "ok"})
        elif not self._authorised():
            return
        elif path == "/v1/models":
            self._send({"object": "list", "data": [
                {"id": Options.model, "object": "model", "created": 0, "owned_by": "fake"}]})
        elif path == "/api/tags" and Options.flavour == "ollama":
            self._send({"models": [{"name": f"{Options.model}:latest",
                                    "model": f"{Options.model}:latest", "size": 1,
                                    "details": {"family": "bert"}}]})
        else:
            self._error(404, f"no route {path}")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if Options.record:
            with open(Options.record, "a", encoding="utf-8") as f:
                f.write(json.dumps({"path": self.path, "headers": dict(self.headers),
                                    "body": raw.decode("utf-8", "replace")}) + "\n")
        if not self._authorised():
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._error(400, "fake: the body is not JSON")
            return
        if self.path == "/v1/chat/completions":
            self._chat(body)
        elif self.path == "/v1/embeddings":
            self._embeddings(body)
        elif self.path == "/api/embed" and Options.flavour == "ollama":
            if self._known(body.get("model")):
                texts = _texts(body.get("input"))
                self._send({"model": body["model"], "embeddings": [
                    vector_for(t, Options.dims).tolist() for t in texts]})
        else:
            self._error(404, f"no route {self.path}")

    def _chat(self, body: dict) -> None:
        if not self._known(body.get("model")):
            return
        last = body.get("messages", [{}])[-1].get("content", "")
        text = f"{Options.tag}echo: {last}"
        if body.get("stream"):
            self._stream(body, text)
            return
        self._send({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        })

    def _stream(self, body: dict, text: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": piece},
                                  "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        done = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.wfile.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True

    def _embeddings(self, body: dict) -> None:
        if not self._known(body.get("model")):
            return
        texts = _texts(body.get("input"))
        vecs = [vector_for(t, Options.dims) for t in texts]
        if Options.flavour == "openai":  # honours both, as OpenAI's API does
            dims = body.get("dimensions")
            if dims:
                vecs = [v[:dims] / np.linalg.norm(v[:dims]) for v in vecs]
            if body.get("encoding_format") == "base64":
                data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vecs]
                self._send(_embedding_list(body["model"], data))
                return
        self._send(_embedding_list(body["model"], [v.tolist() for v in vecs]))


def _texts(value: object) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value or []]


def _embedding_list(model: str, data: list) -> dict:
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e}
                     for i, e in enumerate(data)],
            "usage": {"prompt_tokens": len(data), "total_tokens": len(data)}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int,
                   help="default: the port of OLLAMA_HOST (host:port), as `ollama serve` reads")
    p.add_argument("--flavour", choices=("openai", "ollama"), default="openai")
    p.add_argument("--model", default="fake-model", help="the one model name it serves")
    p.add_argument("--dims", type=int, default=64)
    p.add_argument("--key-file", help="require this file's key as a bearer token")
    p.add_argument("--record", help="append every POST (path, headers, body) to this file")
    p.add_argument("--tag", default="", help="prefix of every chat answer (which server)")
    a = p.parse_args()
    if a.port is None:
        a.port = int(os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")[2])
    Options.flavour, Options.model, Options.dims = a.flavour, a.model, a.dims
    Options.record, Options.tag = a.record, a.tag
    if a.key_file:
        with open(a.key_file, encoding="utf-8") as f:
            Options.key = f.read().strip()
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    print(f"fakeopenai ({a.flavour}) serving {a.model} on 127.0.0.1:{a.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
