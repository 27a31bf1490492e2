"""Where a request's time goes inside the embeddings server: the real server with timing spans.

Runs ``python -m mlx_stack.embeddings`` in this process with a few functions wrapped in
``time.perf_counter_ns`` spans (nothing in the package changes), and prints each span's median
and mean when the server stops (Ctrl-C). Send it requests with any client, e.g.
``bench/run.py``'s, or curl in a loop; the first 20 of each span are dropped (warm-up).

    python bench/serving_spans.py --model-path DIR --port 8003 --engine onnx

Spans: the whole ASGI call (first byte of the request handed over -> last byte of the answer
sent), reading the body, tokenising (on whichever thread does it), the service's embed call
(tokenising, queueing, the pass and finishing, hops included), the forward pass on the worker
thread, and rendering the JSON. What the ASGI call does beyond the listed spans is the
routing, the guards, decoding and the metrics.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import mlx_stack.embeddings.api.server as server
import mlx_stack.embeddings.cli as cli
import mlx_stack.embeddings.serving.service as service

SKIP = 20
spans: dict[str, list[float]] = defaultdict(list)


def record(name: str, started: int) -> None:
    spans[name].append((time.perf_counter_ns() - started) / 1e6)


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter_ns()
        try:
            return function(*args, **kwargs)
        finally:
            record(name, started)

    return run


def timed_async(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    async def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter_ns()
        try:
            return await function(*args, **kwargs)
        finally:
            record(name, started)

    return run


def instrument() -> None:
    server.read_body = timed_async("read body", server.read_body)
    server._render = timed("render JSON", server._render)
    service.EmbeddingService.embed_texts = timed_async(
        "service.embed_texts (all of it)", service.EmbeddingService.embed_texts
    )
    ready = service.EmbeddingService._ready

    def on_ready(self: service.EmbeddingService, model: Any, identity: Any) -> None:
        model.tokenizer.encode = timed("tokenise (its thread)", model.tokenizer.encode)
        model.forward = timed("forward pass (worker thread)", model.forward)
        ready(self, model, identity)

    service.EmbeddingService._ready = on_ready  # type: ignore[method-assign]
    create_app = server.create_app

    def create(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["path"] != "/v1/embeddings":
                return await app(scope, receive, send)
            started = time.perf_counter_ns()

            async def sending(message: Any) -> None:
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    record("ASGI call, accept -> last byte", started)

            return await app(scope, receive, sending)

        return asgi

    server.create_app = create
    leave = cli._exit

    def report_then_exit(code: int) -> Any:
        report()
        return leave(code)

    cli._exit = report_then_exit


def report() -> None:
    for name, values in sorted(spans.items(), key=lambda item: -statistics.median(item[1])):
        kept = values[SKIP:]
        if kept:
            print(f"{name:34s} n={len(kept):5d}  median {statistics.median(kept):7.3f} ms  "
                  f"mean {statistics.mean(kept):7.3f} ms", file=sys.stderr)


if __name__ == "__main__":
    instrument()
    sys.exit(cli.main(sys.argv[1:]))
