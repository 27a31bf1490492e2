"""What ``init`` puts in a new stack file: tiers that fit this machine's memory.

Pure functions of the catalog, the memory size and what is present on disk, so the choices can
be tested as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from mlx_stack.config.catalog import Catalog, CatalogEntry, ChatModel, EmbeddingModel, ModelType
from mlx_stack.config.stackfile import RERANK_PORT, ChatTier, EmbeddingsTier, RerankTier

#: Share of RAM the stack may plan for; the rest stays with macOS and the agents.
MEMORY_SHARE = 0.6
FAST_SHARE, FAST_CAP_MB = 0.25, 3000
TIER_PORTS = {"standard": 8000, "fast": 8001}
EMBEDDINGS_PORT = 8003
#: Embedding models `init --with-embeddings` prefers, best first; the first one present wins.
EMBEDDING_PREFERENCE = ("nomic-embed-text-v1.5", "bge-small-en-v1.5", "all-minilm-l6-v2")

#: The reranker `init --with-rerank` picks: the smallest, and an English passage ranker.
RERANK_DEFAULT = "ms-marco-minilm-l6-v2"

IsPresent = Callable[[CatalogEntry], bool]


@dataclass(frozen=True)
class Plan:
    tiers: tuple[ChatTier, ...]
    embeddings: EmbeddingsTier | None
    rerank: RerankTier | None
    #: Recommended models left out because their weights are not here: (tier, model).
    missing: tuple[tuple[str, CatalogEntry], ...]


def _largest_fitting(models: list[ChatModel], budget_mb: float) -> ChatModel | None:
    fitting = [m for m in models if m.memory_mb <= budget_mb]
    return max(fitting, key=lambda m: m.memory_mb, default=None)


def choose_embedding(
    catalog: Catalog, is_present: IsPresent, supported: Collection[str]
) -> tuple[EmbeddingModel | None, bool]:
    """The preferred embedding model that is present and supported, else a fallback to pull.

    Returns the model and whether its weights are present.
    """
    candidates = [
        e
        for e in catalog.of_type(ModelType.EMBEDDING)
        if isinstance(e, EmbeddingModel) and e.architecture in supported
    ]
    order = {name: i for i, name in enumerate(EMBEDDING_PREFERENCE)}
    candidates.sort(key=lambda e: order.get(e.name, len(order)))
    for e in candidates:
        if is_present(e):
            return e, True
    return (candidates[0], False) if candidates else (None, False)


def plan(
    catalog: Catalog,
    memory_gb: float,
    is_present: IsPresent,
    *,
    with_embeddings: bool,
    include_absent: bool,
    supported_embeddings: Collection[str],
    with_rerank: bool = False,
) -> Plan:
    budget = memory_gb * 1024 * MEMORY_SHARE
    emb_tier: EmbeddingsTier | None = None
    rerank_tier: RerankTier | None = None
    missing: list[tuple[str, CatalogEntry]] = []
    if with_rerank:
        reranker = catalog.rerank(RERANK_DEFAULT)
        if is_present(reranker) or include_absent:
            rerank_tier = RerankTier(reranker, reranker.default_quant.id, RERANK_PORT)
            budget -= reranker.memory_mb
        else:
            missing.append(("rerank", reranker))
    if with_embeddings:
        emb, present = choose_embedding(catalog, is_present, supported_embeddings)
        if emb is not None and (present or include_absent):
            emb_tier = EmbeddingsTier(emb, emb.default_quant.id, EMBEDDINGS_PORT, "mlx-embed")
            budget -= emb.memory_mb
        elif emb is not None:
            missing.append(("embeddings", emb))
    chat = [m for m in catalog.of_type(ModelType.CHAT) if isinstance(m, ChatModel)]
    fast = _largest_fitting(
        [m for m in chat if m.tier_hint == "fast"], min(budget * FAST_SHARE, FAST_CAP_MB)
    )
    standard = _largest_fitting(
        [m for m in chat if m.tier_hint == "standard"], budget - (fast.memory_mb if fast else 0)
    )
    tiers: list[ChatTier] = []
    for name, model in (("standard", standard), ("fast", fast)):
        if model is None:
            continue
        if is_present(model) or include_absent:
            tiers.append(ChatTier(name, model, model.default_quant.id, TIER_PORTS[name], "mlx-lm"))
        else:
            missing.append((name, model))
    return Plan(tuple(tiers), emb_tier, rerank_tier, tuple(missing))
