"""Shared fixtures: a tiny chat model built once per session, and real stacks in temp folders.

The tests come in three tiers, one folder each (docs/architecture.md, "Tests"):

- ``unit/``: pure logic and the supervisor on a fake runtime; no subprocess, no sleep.
- ``integration/``: real child processes (a small fake model server, the CLI) in temp folders.
- ``e2e/``: the real servers (mlx_lm.server, the embeddings server, LiteLLM) on real weights.

Each test gets its tier as a marker, so ``pytest -m unit`` runs the fast tier alone.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

from stackenv import StackEnv, write_stack
from tinymodel import build_tiny_chat_model

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = next((t for t in TIERS if f"/tests/{t}/" in str(item.path)), None)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[StackEnv]:
    """A whole stack (two chat tiers, embeddings, proxy) brought up once for a test module."""
    env = write_stack(tmp_path_factory.mktemp("stack"), tiny_model)
    # A hostile but common environment: the proxy must ignore all of these (a DATABASE_URL makes
    # LiteLLM fetch prisma binaries and exit; HTTP_PROXY would swallow loopback calls).
    env.extra_env = {
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
        "OPENAI_API_KEY": "sk-users-real-openai-key-must-not-leak",
    }
    try:
        env.cli("up", check=True, timeout=900)
        yield env
    finally:
        env.cli("down", timeout=120)
        env.kill_everything()
