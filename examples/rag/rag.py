#!/usr/bin/env python3
"""Retrieval-augmented generation on mlx-stack: index a folder, search it, ask a chat tier.

    export MLX_STACK_KEY=$(mlx-stack key)
    python examples/rag/rag.py index examples/rag/corpus
    python examples/rag/rag.py ask "How do I reduce endpoint latency?"
    python examples/rag/rag.py ask --search two-pass "How do I reduce endpoint latency?"
    python examples/rag/rag.py eval examples/rag/questions.json

Search runs one of four ways (``--search``): ``float`` (cosine of float vectors), ``int8`` and
``binary`` (the server's quantised vectors: a quarter and a thirty-second of the size), or
``two-pass``: the binary scan's top 50, then the stack's reranker (``local-rerank``, a
cross-encoder reading query and passage together) orders them. ``eval`` measures recall@1 and
recall@5 of each on a labelled set of questions.

Vectors come from the proxy's ``local-embed`` model at http://127.0.0.1:4000/v1 (``MLX_STACK_URL``
moves it); the key is ``MLX_STACK_KEY``, else the output of ``mlx-stack key``. The index is two
plain files in a folder (``./rag-index`` by default): ``vectors.npy`` (float32, one unit-length
row per chunk) and ``index.json`` (the chunks, their files, and a fingerprint of the embeddings
model, so an index is never searched with vectors from another model), plus the same rows as
int8 (``int8.npy``) and as packed sign bits (``bits.npy``). It needs only ``openai`` and
``numpy``, which mlx-stack already installs. Guide: docs/embeddings.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai

DEFAULT_URL = "http://127.0.0.1:4000/v1"
EMBED_MODEL = "local-embed"
RERANK_MODEL = "local-rerank"
SEARCHES = ("float", "int8", "binary", "two-pass")
CANDIDATES = 50
"""How many passages the binary scan hands to the reranker."""
DEFAULT_STORE = Path("rag-index")
MAX_CHUNK_CHARS = 800
"""~200 tokens: under the 256-token window of the default model (all-MiniLM-L6-v2)."""
BATCH = 64
FINGERPRINT_TEXT = "mlx-stack index fingerprint: the quick brown fox jumps over the lazy dog."
SAME_MODEL_COSINE = 0.999
"""The same model gives the same vector (cosine ~1.0); another model gives ~0 or a new size."""
INDEX_FORMAT = 2
SYSTEM_PROMPT = (
    "Answer the question using only the numbered context passages. Cite the passages you use "
    "as [1], [2]. If the context does not contain the answer, say that you do not know."
)


class RagError(Exception):
    """A failure with a message that says what to do; printed without a traceback."""


@dataclass(frozen=True)
class Chunk:
    source: str
    text: str


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    source: str
    text: str


@dataclass(frozen=True)
class Index:
    chunks: list[Chunk]
    vectors: np.ndarray
    fingerprint: np.ndarray
    int8: np.ndarray
    """The server's int8 rows (``embedding_type: int8``)."""
    bits: np.ndarray
    """The server's packed sign bits (``embedding_type: ubinary``), uint8."""


def connect() -> openai.OpenAI:
    """A client for the proxy: ``MLX_STACK_URL`` and ``MLX_STACK_KEY``, as in docs/clients.md."""
    url = os.environ.get("MLX_STACK_URL", DEFAULT_URL)
    return openai.OpenAI(base_url=url, api_key=_key(), timeout=120)


def _key() -> str:
    if os.environ.get("MLX_STACK_KEY"):
        return os.environ["MLX_STACK_KEY"]
    exe = shutil.which("mlx-stack")
    if exe is not None:
        res = subprocess.run([exe, "key"], capture_output=True, text=True, timeout=60, check=False)
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.strip()
    raise RagError("no proxy key: run `export MLX_STACK_KEY=$(mlx-stack key)` first")


def read_chunks(folder: Path) -> list[Chunk]:
    """Paragraphs of every .md/.txt file, merged up to MAX_CHUNK_CHARS, each led by its title."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".md", ".txt") and p.is_file())
    chunks: list[Chunk] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        title = next(
            (line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("# ")),
            path.stem,
        )
        source = path.relative_to(folder).as_posix()
        for body in _pack(p.strip() for p in text.split("\n\n")):
            lead = "" if body.startswith("# ") else f"{title}\n\n"
            chunks.append(Chunk(source, lead + body))
    return chunks


def _pack(paragraphs: Iterable[str]) -> list[str]:
    out: list[str] = []
    current = ""
    for para in (piece for p in paragraphs for piece in _split_long(p)):
        heading_only = current.startswith("#") and "\n" not in current  # keep it with its text
        if current and not heading_only and len(current) + len(para) + 2 > MAX_CHUNK_CHARS:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def _split_long(paragraph: str) -> list[str]:
    """A paragraph longer than a chunk, cut between words (the server would cut it anyway)."""
    if len(paragraph) <= MAX_CHUNK_CHARS:
        return [paragraph] if paragraph else []
    pieces: list[str] = []
    current = ""
    for word in paragraph.split(" "):
        if current and len(current) + 1 + len(word) > MAX_CHUNK_CHARS:
            pieces.append(current)
            current = ""
        current = f"{current} {word}" if current else word
    return [*pieces, current] if current else pieces


def embed(
    client: openai.OpenAI, texts: Sequence[str], input_type: str | None, kind: str = "float"
) -> np.ndarray:
    """Unit-length float32 rows, or the server's quantised ones (``kind`` int8 / ubinary).
    ``input_type`` picks the model's query or document prefix."""
    extra: dict[str, str] = {"input_type": input_type} if input_type else {}
    if kind != "float":
        extra["embedding_type"] = kind
    rows: list[list[float]] = []
    for start in range(0, len(texts), BATCH):
        try:
            res = client.embeddings.create(
                model=EMBED_MODEL, input=list(texts[start : start + BATCH]),
                extra_body=extra or None,
            )
        except openai.APIConnectionError:
            raise RagError(
                f"cannot reach the proxy at {client.base_url}: is the stack up? "
                "(`mlx-stack status`; MLX_STACK_URL sets another address)"
            ) from None
        except openai.APIStatusError as exc:
            # LiteLLM answers a wrong key with 400 "No connected db." (it would look it up in
            # a database this stack does not have), a missing one with 401.
            if exc.status_code == 401 or "No connected db" in str(exc):
                raise RagError(
                    "the proxy refused the key: `export MLX_STACK_KEY=$(mlx-stack key)`"
                ) from None
            raise RagError(
                f"embeddings failed ({exc.status_code}): {_message(exc)}; does the stack have an "
                "embeddings tier? (`mlx-stack status`, `mlx-stack init --add-embeddings MODEL`)"
            ) from None
        rows.extend(d.embedding for d in sorted(res.data, key=lambda d: d.index))
    if kind != "float":
        return np.rint(rows).astype(np.int8 if kind == "int8" else np.uint8)
    vectors = np.asarray(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"].splitlines()[0][:300]
    return str(exc)[:300]


def build_index(client: openai.OpenAI, folder: Path, store: Path) -> Index:
    """Embed every chunk of ``folder`` as a document and write the index to ``store``."""
    chunks = read_chunks(folder)
    if not chunks:
        raise RagError(f"no .md or .txt files with text under {folder}")
    texts = [c.text for c in chunks]
    index = Index(
        chunks,
        embed(client, texts, "document"),
        embed(client, [FINGERPRINT_TEXT], None)[0],
        embed(client, texts, "document", "int8"),
        embed(client, texts, "document", "ubinary"),
    )
    store.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": INDEX_FORMAT,
        "model": EMBED_MODEL,
        "dimensions": int(index.vectors.shape[1]),
        "fingerprint": index.fingerprint.tolist(),
        "chunks": [asdict(c) for c in chunks],
    }
    # Write both files under temporary names, then rename: a crash never leaves half an index.
    arrays = {"vectors": index.vectors, "int8": index.int8, "bits": index.bits}
    for name, array in arrays.items():
        np.save(store / f"{name}.tmp.npy", array)
    (store / "index.tmp.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    for name in arrays:
        os.replace(store / f"{name}.tmp.npy", store / f"{name}.npy")
    os.replace(store / "index.tmp.json", store / "index.json")  # last: it names the format
    return index


def load_index(store: Path) -> Index:
    try:
        meta = json.loads((store / "index.json").read_text(encoding="utf-8"))
        if meta.get("format") != INDEX_FORMAT:
            raise RagError(f"{store} holds an index this script cannot read: rebuild it")
        vectors, int8, bits = (np.load(store / f"{n}.npy") for n in ("vectors", "int8", "bits"))
    except FileNotFoundError:
        raise RagError(f"no index in {store}: run `rag.py index FOLDER --store {store}`") from None
    if not len(meta["chunks"]) == len(vectors) == len(int8) == len(bits):
        raise RagError(f"{store} holds an index this script cannot read: rebuild it")
    chunks = [Chunk(**c) for c in meta["chunks"]]
    fingerprint = np.asarray(meta["fingerprint"], dtype=np.float32)
    return Index(chunks, vectors, fingerprint, int8, bits)


def check_same_model(client: openai.OpenAI, index: Index) -> None:
    """Refuse to compare vectors from two different models: the scores would be meaningless."""
    now = embed(client, [FINGERPRINT_TEXT], None)[0]
    if now.shape != index.fingerprint.shape:
        change = f"{index.fingerprint.shape[0]} -> {now.shape[0]} dimensions"
    elif float(now @ index.fingerprint) < SAME_MODEL_COSINE:
        change = f"fingerprint cosine {float(now @ index.fingerprint):.3f}"
    else:
        return
    raise RagError(
        f"the embeddings model behind {EMBED_MODEL!r} changed since this index was built "
        f"({change}); vectors of two models must never be mixed: rebuild the index with "
        "`rag.py index FOLDER` (docs/embeddings.md)"
    )


def search(
    client: openai.OpenAI, index: Index, query: str, k: int, how: str = "float"
) -> list[Hit]:
    """The ``k`` best passages, by one of ``SEARCHES`` (see the module docstring)."""
    check_same_model(client, index)
    if how == "float":
        scores = index.vectors @ embed(client, [query], "query")[0]
    elif how == "int8":
        q8 = embed(client, [query], "query", "int8")[0]
        scores = index.int8.astype(np.int32) @ q8.astype(np.int32)
    else:
        q_bits = embed(client, [query], "query", "ubinary")[0]
        differ = np.unpackbits(np.bitwise_xor(index.bits, q_bits), axis=1).sum(axis=1)
        scores = -differ.astype(np.float32)  # fewer differing bits: closer
    order = np.argsort(-scores, kind="stable")
    if how == "two-pass":
        candidates = order[:CANDIDATES]
        ranked = rerank(client, query, [index.chunks[i].text for i in candidates])
        return [Hit(rank + 1, score, index.chunks[candidates[i]].source,
                    index.chunks[candidates[i]].text)
                for rank, (i, score) in enumerate(ranked[:k])]  # fmt: skip
    return [
        Hit(rank + 1, float(scores[i]), index.chunks[i].source, index.chunks[i].text)
        for rank, i in enumerate(order[:k])
    ]


def rerank(client: openai.OpenAI, query: str, passages: Sequence[str]) -> list[tuple[int, float]]:
    """(position in ``passages``, relevance) best first, from the stack's rerank tier."""
    try:
        answer: Any = client.post("/rerank", cast_to=object, body={
            "model": RERANK_MODEL, "query": query, "documents": list(passages)})
    except openai.NotFoundError:
        raise RagError("the stack has no rerank tier: `mlx-stack init --add-rerank MODEL`, "
                       "or search with --search float|int8|binary") from None
    except openai.APIStatusError as exc:
        if exc.status_code == 400 and "Invalid model name" in str(exc):
            raise RagError("the stack has no rerank tier (`local-rerank`): `mlx-stack init "
                           "--add-rerank MODEL`, or --search float|int8|binary") from None
        raise RagError(f"rerank failed ({exc.status_code}): {_message(exc)}") from None
    return [(int(r["index"]), float(r["relevance_score"])) for r in answer["results"]]


def evaluate(
    client: openai.OpenAI,
    index: Index,
    questions: Sequence[dict[str, str]],
    searches: Sequence[str],
) -> dict[str, dict[str, float]]:
    """recall@1 and recall@5 per search: the share of questions whose labelled file is the
    source of the first passage, or of one of the first five."""
    out: dict[str, dict[str, float]] = {}
    for how in searches:
        first = top5 = 0
        for item in questions:
            sources = [h.source for h in search(client, index, item["question"], 5, how)]
            first += sources[:1] == [item["source"]]
            top5 += item["source"] in sources
        out[how] = {"recall@1": first / len(questions), "recall@5": top5 / len(questions)}
    return out


def pick_chat_model(models: Sequence[dict[str, Any]]) -> str | None:
    """The first chat tier the proxy lists (LiteLLM marks each model with its ``mode``)."""
    for m in models:
        if m.get("id") != EMBED_MODEL and m.get("mode", "chat") == "chat":
            return str(m["id"])
    return None


def ask_chat(
    client: openai.OpenAI, model: str | None, query: str, hits: list[Hit], max_tokens: int
) -> tuple[str | None, str | None, str | None]:
    """(model, answer, why skipped): a missing or failing chat tier skips the step, no more."""
    try:
        if model is None:
            listed = client.models.list().model_dump()["data"]
            model = pick_chat_model(listed)
            if model is None:
                return None, None, "the stack has no chat tier (add one to stack.yaml)"
        context = "\n\n".join(f"[{h.rank}] ({h.source}) {h.text}" for h in hits)
        res = client.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {query}"},
            ],
            max_tokens=max_tokens,
        )
    except openai.APIStatusError as exc:
        return model, None, f"chat tier {model!r} failed ({exc.status_code}): {_message(exc)}"
    except openai.APIConnectionError as exc:
        return model, None, f"chat tier {model!r} unreachable: {exc}"
    return model, res.choices[0].message.content or "", None


def _cmd_index(args: argparse.Namespace) -> int:
    if not args.folder.is_dir():
        raise RagError(f"{args.folder} is not a folder")
    index = build_index(connect(), args.folder, args.store)
    files = len({c.source for c in index.chunks})
    print(
        f"indexed {len(index.chunks)} chunks from {files} files into {args.store} "
        f"({index.vectors.shape[1]} dimensions)"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        questions = json.loads(args.questions.read_text(encoding="utf-8"))["questions"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RagError(f"{args.questions}: not a questions file ({exc})") from None
    client = connect()
    listed = {m["id"] for m in client.models.list().model_dump()["data"]}
    searches = [s for s in SEARCHES if s != "two-pass" or RERANK_MODEL in listed]
    results = evaluate(client, load_index(args.store), questions, searches)
    if args.json:
        print(json.dumps({"questions": len(questions), "recall": results}, indent=2))
        return 0
    print(f"{len(questions)} questions\n\n| search | recall@1 | recall@5 |\n|---|---:|---:|")
    for how, r in results.items():
        print(f"| {how} | {r['recall@1']:.2f} | {r['recall@5']:.2f} |")
    if "two-pass" not in results:
        print(f"\ntwo-pass skipped: the proxy lists no {RERANK_MODEL!r}", file=sys.stderr)
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    client = connect()
    hits = search(client, load_index(args.store), args.query, args.k, args.search)
    model = answer = skipped = None
    if args.no_chat:
        skipped = "--no-chat"
    else:
        model, answer, skipped = ask_chat(
            client, args.chat_model, args.query, hits, args.max_tokens
        )
    if args.json:
        out = {
            "query": args.query,
            "hits": [asdict(h) for h in hits],
            "chat_model": model,
            "answer": answer,
            "chat_skipped": skipped,
        }
        print(json.dumps(out, indent=2))
        return 0
    for h in hits:
        first = " ".join(h.text.split())[:90]
        print(f"{h.rank}. {h.score:.3f}  {h.source}  {first}")
    if answer is not None:
        print(f"\nanswer ({model}):\n{answer.strip()}")
    else:
        print(f"\nchat step skipped: {skipped}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_index = sub.add_parser("index", help="embed every .md/.txt file of FOLDER")
    p_index.add_argument("folder", type=Path)
    p_ask = sub.add_parser("ask", help="search the index, then ask a chat tier")
    p_ask.add_argument("query")
    p_ask.add_argument("-k", type=int, default=4, help="passages to retrieve (default: 4)")
    p_ask.add_argument("--chat-model", help="proxy model to ask (default: the first chat tier)")
    p_ask.add_argument("--no-chat", action="store_true", help="search only")
    p_ask.add_argument("--max-tokens", type=int, default=256, help="answer length limit")
    p_ask.add_argument("--json", action="store_true", help="machine-readable output")
    p_ask.add_argument("--search", choices=SEARCHES, default="float",
                       help="how to find passages (default: float)")  # fmt: skip
    p_eval = sub.add_parser("eval", help="recall@1/@5 of each search on labelled questions")
    p_eval.add_argument("questions", type=Path, help='JSON: {"questions": [{question, source}]}')
    p_eval.add_argument("--json", action="store_true", help="machine-readable output")
    for p in (p_index, p_ask, p_eval):
        p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="index folder")
    args = parser.parse_args(argv)
    commands = {"index": _cmd_index, "ask": _cmd_ask, "eval": _cmd_eval}
    try:
        return commands[args.command](args)
    except RagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
