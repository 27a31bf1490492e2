"""An embedding model under ONNX Runtime, with the MLX engine's interface.

Same tokenizer, same right padding, same pooling (``model/pooling.py``), the same
sentence-transformers Dense layers after pooling (EmbeddingGemma's, applied here in float32
numpy) and the same finish (``encoder.finish``) as ``model/encoder.TextEncoder``: only the
forward pass differs. The graph is built from the folder's weights on first use
(``onnxgraph.py`` for BERT-family encoders, ``onnxdecoder.py`` for qwen3 and gemma3_text,
``onnxnomic.py`` for nomic_bert) and
kept in the private cache folder ``~/.cache/mlx-stack/onnx``, named by the folder's content
hash and the builder's version, written atomically (a decoder's weights in a ``.data`` file
beside its graph). No torch is involved, at build time or run time.

Not thread-safe: the server calls one instance from its single worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlx_stack.atomic import write_atomic

from ..model.encoder import WARM_UP_TEXT, Embeddings, finish
from ..model.pooling import pool
from ..model.settings import ModelSettings
from ..model.tokenizer import Encoded, TextTokenizer, pad_batch
from . import onnxdecoder, onnxgraph, onnxnomic

SPIN_ENV = "MLX_STACK_ONNX_SPIN"
"""``1``: ONNX Runtime's idle threads spin (its default); unset: they sleep (ours)."""

THREADS_ENV = "MLX_STACK_ONNX_THREADS"
"""ONNX Runtime's intra-op threads (default: its own, one per physical core)."""

GRAPH_VERSION = 1
"""Bumped when ``onnxgraph`` builds a different graph: older cached files are not reused."""

SUPPORTED = onnxgraph.SUPPORTED + onnxdecoder.SUPPORTED + onnxnomic.SUPPORTED

log = logging.getLogger("mlx_stack.embeddings")


def onnx_problem(settings: ModelSettings) -> str | None:
    """Why the ONNX engine cannot serve this folder, or ``None`` if it can (cheap: no weights)."""
    if settings.task != "embed":
        return "it serves embeddings only (rerank stays on MLX)"
    model_type = settings.architecture.model_type
    if model_type not in SUPPORTED:
        return f"architecture {model_type} (the ONNX engine builds {', '.join(SUPPORTED)})"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime onnx)"
    try:
        config = json.loads((settings.path / "config.json").read_text(encoding="utf-8"))
        if model_type in onnxdecoder.SUPPORTED:
            onnxdecoder.DecoderShape.from_config(config)
        elif model_type in onnxnomic.SUPPORTED:
            onnxnomic.NomicShape.from_config(config)
        else:
            onnxgraph.EncoderShape.from_config(config)
    except onnxgraph.OnnxUnsupported as exc:
        return str(exc)
    except (OSError, ValueError, KeyError) as exc:
        return f"config.json: {exc}"
    return None


def onnxruntime_version() -> str:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except ImportError:
        return "absent"


class OnnxEncoder:
    """An ONNX Runtime session plus the folder's tokenizer and pooling recipe."""

    engine = "onnx"
    fast_kernels: tuple[str, ...] = ()

    def __init__(self, settings: ModelSettings, session: Any, tokenizer: TextTokenizer,
                 rows: int, dense: list[tuple[np.ndarray, np.ndarray | None]] | None = None,
                 ) -> None:  # fmt: skip
        self.settings = settings
        self.tokenizer = tokenizer
        self._session = session
        self._rows = rows
        self._dense = dense or []
        self.load_seconds = 0.0
        self.graph_path: Path | None = None

    @classmethod
    def load(cls, settings: ModelSettings, content_sha256: str,
             cache: Path | None) -> OnnxEncoder:  # fmt: skip
        """Build (or read back) the graph, open a session, run one real forward pass."""
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="mlx-stack-onnx-") as scratch:
            model, path = _graph(settings.path, content_sha256, cache, Path(scratch))
            session = _session(model)
        dense = (onnxdecoder.read_dense(settings.path)
                 if settings.architecture.dense_after_pooling else [])  # fmt: skip
        instance = cls(settings, session, TextTokenizer(settings.path, settings.max_seq_len),
                       _rows(settings.path), dense)  # fmt: skip
        instance.graph_path = path
        warm = instance.embed([WARM_UP_TEXT])
        if warm.vectors.shape[1] != settings.dimension:
            raise RuntimeError(f"{settings.path}: the ONNX graph produced "
                               f"{warm.vectors.shape[1]} dimensions, config.json says "
                               f"{settings.dimension}")  # fmt: skip
        instance.load_seconds = time.monotonic() - started
        return instance

    @property
    def vocab_size(self) -> int:
        """Token ids a request may send: the tokenizer's vocabulary, capped by the table."""
        vocab = self.tokenizer.vocab_size
        return min(vocab, self._rows) if self._rows else vocab

    def forward(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled, unnormalised float32 vectors for one batch, right-padded here."""
        ids, mask = pad_batch(sequences, self.tokenizer.pad_id)
        (hidden,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
        pooled = np.asarray(pool(hidden, mask, self.settings.pooling, np), dtype=np.float32)
        for weight, bias in self._dense:  # sentence-transformers Dense, identity activation
            pooled = pooled @ weight if bias is None else pooled @ weight + bias
        return pooled

    def embed(self, texts: Sequence[str], dimensions: int | None = None) -> Embeddings:
        """Tokenise, run, finish: for warm-up and direct use (the server batches instead)."""
        return self.embed_encoded(self.tokenizer.encode(texts), dimensions)

    def embed_encoded(self, encoded: Sequence[Encoded], dimensions: int | None) -> Embeddings:
        vectors = self.forward([e.ids for e in encoded])
        return Embeddings(vectors=finish(vectors, dimensions, self.settings.normalize),
                          token_counts=[len(e.ids) for e in encoded],
                          truncated=[e.truncated for e in encoded])  # fmt: skip


def _graph(folder: Path, content_sha256: str, cache: Path | None,
           scratch: Path) -> tuple[bytes | str, Path | None]:  # fmt: skip
    """The model: a cached file's path if present, else freshly built bytes (then cached).

    A decoder is always a file (its weights beside it, over protobuf's 2 GB at 0.6B in
    float32): in the cache, or in ``scratch`` (deleted once the session has read it)."""
    model_type = _model_type(folder)
    if model_type in onnxdecoder.SUPPORTED:
        return _decoder_graph(folder, content_sha256, cache, scratch)
    nomic = model_type in onnxnomic.SUPPORTED
    version = f"n{onnxnomic.GRAPH_VERSION}" if nomic else f"g{GRAPH_VERSION}"
    if cache is not None:
        path = cache / f"{content_sha256[:32]}-{version}.onnx"
        if path.is_file() and not path.is_symlink():
            return str(path), path
    built = onnxnomic.build(folder) if nomic else onnxgraph.build(folder)
    if cache is None:
        return built, None
    try:
        write_atomic(path, built)
    except OSError as exc:
        log.warning("cannot cache the ONNX graph in %s: %s", cache, exc)
        return built, None
    del built  # the session reads the file: ~100 MB less resident for MiniLM than from bytes
    return str(path), path


def _decoder_graph(folder: Path, content_sha256: str, cache: Path | None,
                   scratch: Path) -> tuple[str, Path | None]:  # fmt: skip
    name = f"{content_sha256[:32]}-d{onnxdecoder.GRAPH_VERSION}.onnx"
    if cache is not None:
        path = cache / name
        if path.is_file() and not path.is_symlink():
            return str(path), path
        try:
            onnxdecoder.build(folder, path)
            return str(path), path
        except OSError as exc:
            log.warning("cannot cache the ONNX graph in %s: %s", cache, exc)
    onnxdecoder.build(folder, scratch / name)
    return str(scratch / name), None


def _model_type(folder: Path) -> str:
    try:
        return str(onnxdecoder.read_config(folder).get("model_type", "")).replace("-", "_")
    except (OSError, ValueError):
        return ""


def _session(model: bytes | str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # its warnings about unused initialisers are noise here
    # idle intra-op threads sleep instead of spinning: on a 2-core machine spinning threads took
    # the cores from the event loop and the clients (a short query 7 ms without, 18 with, under
    # load; the same lesson as MKL's KMP_BLOCKTIME, cpu/blas.py). Alone, spinning saves ~0.4 ms
    # of a 4.4 ms pass (bench/onnx_graphs.py); SPIN_ENV=1 turns it on to compare under load.
    spin = "1" if os.environ.get(SPIN_ENV) == "1" else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    threads = os.environ.get(THREADS_ENV, "")
    if threads.isdigit() and int(threads) > 0:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _rows(folder: Path) -> int:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return int(config.get("vocab_size", 0))
    except (OSError, ValueError, TypeError):
        return 0
