"""The model catalog: typed, validated entries for the chat, embedding and rerank models we know.

The shipped catalog lives in ``catalog/*.yaml`` (package data ``mlx_stack.catalog_data``); a user
can add entries of their own in ``$MLX_STACK_HOME/catalog/*.yaml``, which override shipped
entries of the same name. Each file is validated once, on load, with errors naming file, line
and field path.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mlx_stack.config.schema import Field, Problems, close_matches, describe, read_mapping
from mlx_stack.config.sources import Source, SourceError, parse_source
from mlx_stack.config.yamlfile import YamlDoc, load_yaml, parse_yaml
from mlx_stack.embeddings.model.architectures import POOLINGS, RERANK_ARCHITECTURES
from mlx_stack.errors import CatalogError, ConfigError


class ModelType(str, enum.Enum):
    CHAT = "chat"
    EMBEDDING = "embedding"
    RERANK = "rerank"


TIER_HINTS = ("standard", "fast")
#: Cross-encoder families the rerank server loads (config.json ``model_type``, ``-`` -> ``_``):
#: checked here so a stack file naming another one is refused before anything starts.


@dataclass(frozen=True)
class Quantization:
    """One downloadable variant of a model: its id (``4bit``, ``bf16``...), where, how big."""

    id: str
    sources: tuple[Source, ...]
    memory_mb: int


@dataclass(frozen=True)
class CatalogEntry:
    """Fields common to chat and embedding models."""

    name: str
    type: ModelType
    source: str
    description: str
    quantizations: tuple[Quantization, ...]
    origin: str

    @property
    def default_quant(self) -> Quantization:
        return self.quantizations[0]

    @property
    def memory_mb(self) -> int:
        return self.default_quant.memory_mb

    def quant(self, quant_id: str | None) -> Quantization:
        if quant_id is None:
            return self.default_quant
        for q in self.quantizations:
            if q.id == quant_id:
                return q
        ids = [q.id for q in self.quantizations]
        raise CatalogError(
            f"model {self.name!r} has no quantisation {quant_id!r}{close_matches(quant_id, ids)}; "
            f"choose one of: {', '.join(ids)}"
        )


@dataclass(frozen=True)
class ChatModel(CatalogEntry):
    params_b: float
    context_length: int
    tier_hint: str


@dataclass(frozen=True)
class EmbeddingModel(CatalogEntry):
    architecture: str
    params_m: float
    dimensions: int
    max_sequence_length: int
    pooling: str
    normalize: bool
    mteb_score: float
    matryoshka_dimensions: tuple[int, ...]
    query_prefix: str
    document_prefix: str


@dataclass(frozen=True)
class RerankModel(CatalogEntry):
    """A cross-encoder: reads a query and a document together and scores their relevance."""

    architecture: str
    params_m: float
    max_sequence_length: int


_QUANT_FIELDS = [
    Field("id", (str,), "quantisation id, e.g. 4bit, 8bit, bf16, fp32"),
    Field(
        "source", (str, list), "where the weights are: hf:owner/repo, path:/dir or package:mod/dir"
    ),
    Field("memory_mb", (int,), "resident memory when loaded, in MB"),
]
_COMMON_FIELDS = [
    Field("name", (str,), "the name used in stack files"),
    Field("type", (str,), "chat, embedding or rerank"),
    Field("source", (str,), "the upstream repository the weights come from"),
    Field("description", (str,), "one line for `mlx-stack models`", ""),
    Field("memory_mb", (int,), "memory of the default quantisation, in MB"),
    Field("quantizations", (list,), "downloadable variants; the first is the default"),
]
CHAT_FIELDS = [
    *_COMMON_FIELDS,
    Field("params_b", (float,), "parameters, in billions"),
    Field("context_length", (int,), "maximum context, in tokens"),
    Field("tier_hint", (str,), "which tier `init` may pick it for: standard or fast"),
]
EMBEDDING_FIELDS = [
    *_COMMON_FIELDS,
    Field("architecture", (str,), "model_type of the weights (bert, xlm-roberta, qwen3, ...)"),
    Field("params_m", (float,), "parameters, in millions"),
    Field("dimensions", (int,), "length of the vectors"),
    Field("max_sequence_length", (int,), "longest input, in tokens; longer input is truncated"),
    Field("pooling", (str,), "mean, cls or last (last token)"),
    Field("normalize", (bool,), "whether vectors are L2-normalised"),
    Field("mteb_score", (float,), "MTEB English average, as published by the model's authors"),
    Field("matryoshka_dimensions", (list,), "smaller sizes `dimensions` may ask for", []),
    Field("query_prefix", (str,), "prepended to queries (input_type: query)", ""),
    Field("document_prefix", (str,), "prepended to documents (input_type: document)", ""),
]
RERANK_FIELDS = [
    *_COMMON_FIELDS,
    Field("architecture", (str,), f"model_type of the weights: {', '.join(RERANK_ARCHITECTURES)}"),
    Field("params_m", (float,), "parameters, in millions"),
    Field(
        "max_sequence_length", (int,),
        "longest query+document pair, in tokens; longer pairs are truncated (document first)",
    ),
]
FIELDS_BY_TYPE = {"chat": CHAT_FIELDS, "embedding": EMBEDDING_FIELDS, "rerank": RERANK_FIELDS}
FILE_FIELDS = [Field("models", (list,), "the catalog entries")]


def _read_quants(raw: list, path: str, problems: Problems) -> tuple[Quantization, ...]:
    quants: list[Quantization] = []
    if not raw:
        problems.add(path, "needs at least one quantisation")
    seen: set[str] = set()
    for i, item in enumerate(raw):
        qpath = f"{path}[{i}]"
        q = read_mapping(item, qpath, _QUANT_FIELDS, problems)
        if q is None:
            continue
        if q["id"] in seen:
            problems.add(f"{qpath}.id", f"duplicate quantisation {q['id']!r}")
            continue
        seen.add(q["id"])
        raw_sources = q["source"] if isinstance(q["source"], list) else [q["source"]]
        sources: list[Source] = []
        for j, s in enumerate(raw_sources):
            where = f"{qpath}.source[{j}]" if isinstance(q["source"], list) else f"{qpath}.source"
            if not isinstance(s, str):  # `source: [1]`: only the list itself was type-checked
                problems.add(where, f"expected a string, got {describe(s)} ({s!r})")
                continue
            try:
                sources.append(parse_source(s))
            except SourceError as exc:
                problems.add(where, str(exc))
        if q["memory_mb"] <= 0:
            problems.add(f"{qpath}.memory_mb", "must be > 0")
        quants.append(Quantization(q["id"], tuple(sources), q["memory_mb"]))
    return tuple(quants)


def _read_entry(raw: object, path: str, origin: str, problems: Problems) -> CatalogEntry | None:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in FIELDS_BY_TYPE:
        if isinstance(raw, dict):
            problems.add(f"{path}.type", f"must be 'chat', 'embedding' or 'rerank', got {kind!r}")
        else:
            read_mapping(raw, path, CHAT_FIELDS, problems)
        return None
    fields = FIELDS_BY_TYPE[kind]
    before = len(problems.items)
    d = read_mapping(raw, path, fields, problems)
    if d is None:
        return None
    quants = _read_quants(d["quantizations"], f"{path}.quantizations", problems)
    if quants and d["memory_mb"] != quants[0].memory_mb:
        problems.add(f"{path}.memory_mb", "must equal the first quantisation's memory_mb")
    common = dict(
        name=d["name"],
        type=ModelType(kind),
        source=d["source"],
        description=d["description"],
        quantizations=quants,
        origin=origin,
    )
    if kind == "chat":
        if d["tier_hint"] not in TIER_HINTS:
            problems.add(f"{path}.tier_hint", f"must be one of {', '.join(TIER_HINTS)}")
        if len(problems.items) > before:
            return None
        return ChatModel(
            **common,
            params_b=d["params_b"],
            context_length=d["context_length"],
            tier_hint=d["tier_hint"],
        )
    if kind == "rerank":
        return _rerank_entry(d, common, path, problems, before)
    if d["pooling"] not in POOLINGS:
        problems.add(
            f"{path}.pooling", f"must be one of {', '.join(POOLINGS)}, got {d['pooling']!r}"
        )
    dims = d["matryoshka_dimensions"]
    if not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 < x <= d["dimensions"] for x in dims
    ):
        problems.add(
            f"{path}.matryoshka_dimensions",
            f"must be whole numbers between 1 and dimensions ({d['dimensions']})",
        )
    if len(problems.items) > before:
        return None
    return EmbeddingModel(
        **common,
        architecture=d["architecture"],
        params_m=d["params_m"],
        dimensions=d["dimensions"],
        max_sequence_length=d["max_sequence_length"],
        pooling=d["pooling"],
        normalize=d["normalize"],
        mteb_score=d["mteb_score"],
        matryoshka_dimensions=tuple(sorted(set(dims), reverse=True)),
        query_prefix=d["query_prefix"],
        document_prefix=d["document_prefix"],
    )


def _rerank_entry(
    d: dict, common: dict, path: str, problems: Problems, before: int
) -> RerankModel | None:
    if d["architecture"] not in RERANK_ARCHITECTURES:
        problems.add(
            f"{path}.architecture",
            f"{d['architecture']!r} is not a reranker this version serves"
            f"{close_matches(d['architecture'], RERANK_ARCHITECTURES)}; "
            f"use one of {', '.join(RERANK_ARCHITECTURES)}",
        )
    if d["max_sequence_length"] <= 0:
        problems.add(f"{path}.max_sequence_length", "must be > 0")
    if d["params_m"] <= 0:
        problems.add(f"{path}.params_m", "must be > 0")
    if len(problems.items) > before:
        return None
    return RerankModel(
        **common,
        architecture=d["architecture"],
        params_m=d["params_m"],
        max_sequence_length=d["max_sequence_length"],
    )


def parse_catalog_file(doc: YamlDoc) -> list[CatalogEntry]:
    """Validate one catalog document; raise ConfigError listing every problem in it."""
    problems = Problems(doc)
    top = read_mapping(doc.data, "", FILE_FIELDS, problems)
    entries: list[CatalogEntry] = []
    if top is not None:
        names: set[str] = set()
        for i, raw in enumerate(top["models"]):
            entry = _read_entry(raw, f"models[{i}]", str(doc.path), problems)
            if entry is None:
                continue
            if entry.name in names:
                problems.add(f"models[{i}].name", f"duplicate model name {entry.name!r}")
                continue
            names.add(entry.name)
            entries.append(entry)
    if problems:
        raise ConfigError(doc.path, problems.items)
    return entries


class Catalog:
    """All known models by name; shipped entries first, the user's own overriding them."""

    def __init__(self, entries: Iterable[CatalogEntry]) -> None:
        self._by_name: dict[str, CatalogEntry] = {}
        for e in entries:
            self._by_name[e.name] = e

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> CatalogEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise CatalogError(
                f"unknown model {name!r}{close_matches(name, list(self._by_name))}; "
                "run `mlx-stack models` to list the catalog"
            ) from None

    def of_type(self, kind: ModelType) -> list[CatalogEntry]:
        return [e for e in self if e.type == kind]

    def chat(self, name: str) -> ChatModel:
        entry = self.get(name)
        if not isinstance(entry, ChatModel):
            raise CatalogError(f"model {name!r} is {_article(entry)} model, not a chat model")
        return entry

    def embedding(self, name: str) -> EmbeddingModel:
        entry = self.get(name)
        if not isinstance(entry, EmbeddingModel):
            raise CatalogError(
                f"model {name!r} is {_article(entry)} model, not an embedding model")
        return entry

    def rerank(self, name: str) -> RerankModel:
        entry = self.get(name)
        if not isinstance(entry, RerankModel):
            raise CatalogError(f"model {name!r} is {_article(entry)} model, not a rerank model "
                               "(`mlx-stack models --type rerank` lists those)")
        return entry


def _article(entry: CatalogEntry) -> str:
    return {ModelType.CHAT: "a chat", ModelType.EMBEDDING: "an embedding",
            ModelType.RERANK: "a rerank"}[entry.type]


def _shipped_files() -> list[tuple[Path, str]]:
    root = resources.files("mlx_stack.catalog_data")
    out = []
    for item in sorted(root.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".yaml"):
            out.append((Path(str(item)), item.read_text(encoding="utf-8")))
    return out


def load_catalog(user_dir: Path | None = None) -> Catalog:
    """Load the shipped catalog and then the user's ``*.yaml`` files from ``user_dir``."""
    entries: list[CatalogEntry] = []
    for path, text in _shipped_files():
        entries.extend(parse_catalog_file(parse_yaml(text, path)))
    if user_dir is not None and user_dir.is_dir():
        for path in sorted(user_dir.glob("*.yaml")):  # read as the stack file is: size, bad bytes
            entries.extend(parse_catalog_file(load_yaml(path)))
    return Catalog(entries)
