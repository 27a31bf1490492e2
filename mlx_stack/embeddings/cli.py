"""Command line of the embeddings server: parse, validate, bind, serve.

Mistakes in the arguments exit non-zero with one line on stderr; the port is bound before the
model loads, so ``/health`` answers 503 while it does. The BLAS is loaded for the model
(``cpu/blas.py``) right after, before anything imports MLX: importing this module must not.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from mlx_stack.backendkey import KEY_ENV
from mlx_stack.errors import MlxStackError, PortInUseError

from .api.access import AccessPolicy
from .api.connection import BODY_TIMEOUT, HEADER_TIMEOUT, MAX_CONNECTIONS, ConnectionLimits
from .api.server import HttpOptions
from .cpu import blas
from .engine.choice import (
    ENGINE_ENV,
    ENGINE_MODES,
    EngineError,
    EngineMode,
    Machine,
    mode_from,
    plan,
)
from .model.architectures import POOLINGS
from .model.settings import TASKS, ModelFolderError, ModelSettings, Overrides, resolve
from .serving.batcher import BatchPolicy
from .serving.service import MAX_CONCURRENT, ServiceOptions

PROG = "mlx-stack embeddings"
log = logging.getLogger("mlx_stack.embeddings")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_stack.embeddings",
        description="OpenAI-compatible embeddings server for a local Hugging Face model folder.",
    )
    parser.add_argument("--model-path", required=True, type=Path, help="local model folder")
    parser.add_argument("--served-name", required=True, help="model name clients must send")
    parser.add_argument(
        "--alias", action="append", default=[], help="another accepted name (repeatable)"
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        help="embed, or rerank (a cross-encoder; for a *ForCausalLM folder such as "
        "Qwen3-Reranker, a yes/no reranker); default: rerank for a *ForSequenceClassification "
        "folder, else embed",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--pooling", choices=POOLINGS, help="default: the folder's")
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise vectors (default: the folder's; on without sentence-transformers files)",
    )
    parser.add_argument(
        "--max-seq-len", type=int, help="maximum tokens per input (default: the folder's)"
    )
    parser.add_argument(
        "--dimensions",
        type=_int_list,
        default=(),
        help="Matryoshka sizes a request may ask for, e.g. 768,512,256",
    )
    parser.add_argument("--query-prefix", help="prepended when input_type is 'query'")
    parser.add_argument("--document-prefix", help="prepended when input_type is 'document'")
    parser.add_argument(
        "--truncate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cut inputs longer than the maximum (default; reported in a response header); "
        "--no-truncate refuses them with a 400 instead",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=BatchPolicy.max_batch_tokens,
        help="padded tokens per forward pass (texts x longest); default %(default)s",
    )
    parser.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=BatchPolicy.batch_timeout_ms,
        help="longest wait for requests still being tokenised before a pass starts; "
        "default %(default)s",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=MAX_CONCURRENT,
        help="requests in progress before new ones get 429; default %(default)s",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINE_MODES,
        help="what runs the encoder: mlx, onnx (ONNX Runtime; bert and xlm_roberta embedding "
        f"models), or auto: measured on first start, cached (default: ${ENGINE_ENV} or auto; "
        "always MLX on Apple Silicon)",
    )
    parser.add_argument(
        "--exact-kernels",
        "--exact-gelu",
        action="store_true",
        help="keep MLX's exact (slow on CPU) GELU and softmax kernels",
    )
    parser.add_argument(
        "--allowed-hosts",
        type=_name_list,
        action="extend",
        default=[],
        help="Host names or addresses served besides loopback and --host (comma-separated, "
        "repeatable; '*' for any): the Host check stops DNS rebinding",
    )
    parser.add_argument(
        "--allowed-origins",
        type=_name_list,
        action="extend",
        default=[],
        help="web origins (e.g. http://localhost:3000) whose pages may call the server, with "
        "CORS; default none: requests carrying any other Origin are refused",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=HEADER_TIMEOUT,
        help="seconds a client may take to send a request head; default %(default)s",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_TIMEOUT,
        help="seconds a client may take to send a request body; default %(default)s",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="open connections before new ones get 503; default %(default)s",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser.parse_args(argv)


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 after a clean stop, 1 if the model failed to load, else the error's."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = resolve(
            args.model_path.expanduser().resolve(),
            Overrides(
                pooling=args.pooling,
                normalize=args.normalize,
                max_seq_len=args.max_seq_len,
                dimensions=args.dimensions,
                query_prefix=args.query_prefix,
                document_prefix=args.document_prefix,
                task=args.task,
            ),
        )
        engine = _engine_mode(args.engine, settings)
        options = _options(args)
        http = _http_options(args)
        sock = _bind(args.host, args.port)
    except MlxStackError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    blas.preload(model=settings.path)  # before MLX: measured on this model's shapes, or cached
    return _serve(args, settings, options, http, sock, engine)


def _engine_mode(flag: str | None, settings: ModelSettings) -> EngineMode:
    """The engine mode, refused now (exit 2) if a forced engine cannot serve this folder."""
    try:
        mode = mode_from(flag)
        if settings.task != "embed":
            if flag == "onnx":
                raise EngineError("--engine onnx: a reranker runs on MLX only; drop --engine")
            return "mlx"
        from .engine.onnxencoder import onnx_problem

        if mode == "onnx":
            plan(mode, Machine("", (), False), onnx_problem(settings))
    except EngineError as exc:
        raise ModelFolderError(str(exc)) from None
    return mode


def _options(args: argparse.Namespace) -> ServiceOptions:
    try:
        return ServiceOptions(
            batch=BatchPolicy(args.max_batch_tokens, args.batch_timeout_ms),
            max_concurrent=args.max_concurrent,
            truncate=args.truncate,
        )
    except ValueError as exc:
        raise MlxStackError(f"{exc.args[0].replace('_', '-')}") from None


@dataclass(frozen=True)
class _Http:
    options: HttpOptions
    limits: ConnectionLimits


def _http_options(args: argparse.Namespace) -> _Http:
    try:
        access = AccessPolicy.build(args.allowed_hosts, args.allowed_origins, args.host,
                                    key=os.environ.pop(KEY_ENV, None))
        limits = ConnectionLimits(args.header_timeout, args.body_timeout, args.max_connections)
    except ValueError as exc:
        raise MlxStackError(f"{exc.args[0].replace('_', '-')}") from None
    return _Http(HttpOptions(access, body_timeout=limits.body_timeout), limits)


def _bind(host: str, port: int) -> socket.socket:
    """Bind now, so a taken port is a clear error and clients can connect during the load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise MlxStackError(f"cannot resolve --host {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PortInUseError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
            "or stop the program holding it"
        ) from None
    return sock


def _serve(
    args: argparse.Namespace,
    settings: ModelSettings,
    options: ServiceOptions,
    http: _Http,
    sock: socket.socket,
    engine: EngineMode = "auto",
) -> int:
    import uvicorn

    from .api.connection import KEEP_ALIVE_SECONDS, MAX_HEAD_BYTES, protocol_factory
    from .api.server import ServedModel, create_app
    from .serving.service import EmbeddingService, default_loader

    host, port = sock.getsockname()[:2]
    log.info("%s", _startup_line(args.served_name, settings, options, host, port))
    log.info("%s", _http_line(http))
    server: uvicorn.Server | None = None
    failed: list[BaseException] = []

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    service = EmbeddingService(
        settings, default_loader(not args.exact_kernels, engine), options, on_load_failure
    )
    served = ServedModel(args.served_name, tuple(args.alias), blas.preload(), int(time.time()))
    config = uvicorn.Config(
        create_app(service, served, http.options),
        http=protocol_factory(
            http.limits, lambda reason: service.metrics.refused.inc(reason=reason)
        ),  # type: ignore[arg-type]  # a factory of protocols, as uvicorn calls it
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        ws="none",  # no WebSocket routes: an upgrade request is served as plain HTTP
        log_config=None,
        access_log=args.access_log,
        log_level=args.log_level,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        return _exit(130)
    return _exit(1 if failed else 0)


def _startup_line(
    name: str, settings: ModelSettings, options: ServiceOptions, host: str, port: int
) -> str:
    normalised = "normalised" if settings.normalize else "not normalised"
    longer = "truncated" if options.truncate else "refused"
    host = f"[{host}]" if ":" in host else host
    what = (f"a {settings.architecture.model_type} reranker, max {settings.max_seq_len} tokens "
            f"per pair, longer pairs {longer}" if settings.task == "rerank" else
            f"{settings.architecture.model_type}, {settings.dimension} dims, {settings.pooling} "
            f"pooling, {normalised}, max {settings.max_seq_len} tokens, longer inputs {longer}")
    return (
        f"serving {name!r} from {settings.path} ({what}) on http://{host}:{port}; "
        f"batches of <= {options.batch.max_batch_tokens} tokens, "
        f"wait <= {options.batch.batch_timeout_ms:g} ms, "
        f"<= {options.max_concurrent} concurrent requests; "
        f"BLAS: {blas.preload().describe()}"
    )


def _http_line(http: _Http) -> str:
    access, limits = http.options.access, http.limits
    hosts = "any" if access.any_host else " + ".join(["loopback", *sorted(access.hosts)])
    origins = ", ".join(sorted(access.origins)) or "none"
    return (
        f"HTTP: Host {hosts}; web origins {origins}; request head within "
        f"{limits.header_timeout:g} s, body within {limits.body_timeout:g} s; "
        f"<= {limits.max_connections} connections"
    )


def _exit(code: int) -> NoReturn:
    """Leave now: a batch still running on the worker thread must not delay shutdown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
