"""`init`'s choices as a table: memory size and what is on disk decide the tiers."""

from __future__ import annotations

import pytest

from mlx_stack.config.catalog import load_catalog
from mlx_stack.config.recommend import plan

CATALOG = load_catalog()
SUPPORTED = {"bert", "qwen3", "gemma3_text"}


def everything(_entry) -> bool:
    return True


def nothing(_entry) -> bool:
    return False


@pytest.mark.parametrize(
    ("memory_gb", "standard", "fast"),
    [
        (8, "qwen3-4b-instruct-2507", "qwen3-0.6b"),
        (16, "qwen3-8b", "llama-3.2-3b-instruct"),
        (24, "qwen3-8b", "llama-3.2-3b-instruct"),
        (64, "qwen3-30b-a3b-instruct-2507", "llama-3.2-3b-instruct"),
    ],
)
def test_tiers_fit_the_memory(memory_gb, standard, fast):
    p = plan(
        CATALOG,
        memory_gb,
        everything,
        with_embeddings=True,
        include_absent=False,
        supported_embeddings=SUPPORTED,
    )
    tiers = {t.name: t.model.name for t in p.tiers}
    assert tiers == {"standard": standard, "fast": fast}
    used = sum(t.model.memory_mb for t in p.tiers) + (
        p.embeddings.model.memory_mb if p.embeddings else 0
    )
    assert used <= memory_gb * 1024 * 0.6
    assert {t.port for t in p.tiers} == {8000, 8001}


def test_absent_models_are_left_out_and_named():
    p = plan(
        CATALOG,
        24,
        nothing,
        with_embeddings=True,
        include_absent=False,
        supported_embeddings=SUPPORTED,
    )
    assert p.tiers == () and p.embeddings is None
    assert {tier for tier, _ in p.missing} == {"standard", "fast", "embeddings"}


def test_embeddings_prefer_a_present_supported_model():
    def only_minilm(entry) -> bool:
        return entry.name == "all-minilm-l6-v2"

    p = plan(
        CATALOG,
        24,
        only_minilm,
        with_embeddings=True,
        include_absent=False,
        supported_embeddings=SUPPORTED,
    )
    assert p.embeddings is not None and p.embeddings.model.name == "all-minilm-l6-v2"
    assert p.embeddings.port == 8003 and p.tiers == ()


def test_unsupported_architecture_is_never_chosen():
    p = plan(
        CATALOG,
        24,
        everything,
        with_embeddings=True,
        include_absent=False,
        supported_embeddings={"bert"},
    )
    assert p.embeddings is not None and p.embeddings.model.architecture == "bert"
    assert p.embeddings.model.name != "nomic-embed-text-v1.5"
