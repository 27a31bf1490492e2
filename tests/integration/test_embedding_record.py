"""Switching the embeddings model is never silent: init, up and status warn (real CLI runs)."""

from __future__ import annotations

import json

from stackenv import StackEnv

from mlx_stack.cli.embedding_record import EmbeddingIdentity, record
from mlx_stack.paths import StatePaths


def test_status_and_init_warn_after_a_model_switch(tmp_path):
    env = StackEnv(tmp_path / "home", {})
    env.cli("init", "--with-embeddings", check=True)
    assert env.status()["warnings"] == []
    # As if an earlier `up` had served another model.
    record(StatePaths(env.home), EmbeddingIdentity("bge-small-en-v1.5", "fp32", "abc123"))
    warnings = env.status()["warnings"]
    assert len(warnings) == 1
    assert "from bge-small-en-v1.5 (fp32" in warnings[0] and "to all-minilm-l6-v2" in warnings[0]
    assert "incompatible" in warnings[0]
    res = env.cli("init", "--with-embeddings", "--force", check=True)
    assert "vectors stored with the old model are incompatible" in res.stderr


def test_same_model_other_weights_is_a_switch_too(tmp_path):
    paths = StatePaths(tmp_path)
    a = EmbeddingIdentity("m", "fp32", "w1")
    record(paths, a)
    record(paths, EmbeddingIdentity("m", "fp32", "w2"))
    data = json.loads((tmp_path / "embeddings-model.json").read_text())
    assert data["previous"]["weights"] == "w1" and data["current"]["weights"] == "w2"


def test_a_record_from_before_the_identity_change_is_no_false_alarm(tmp_path):
    """Records written before the identity became the served content_sha256 (no "scheme")
    compare by model and quantisation, so upgrading mlx-stack warns of nothing."""
    from mlx_stack.cli.embedding_record import mismatch, recorded

    (tmp_path / "embeddings-model.json").write_text(json.dumps(
        {"current": {"model": "m", "quant": "fp32", "weights": "old-style-hash"}}))
    old = recorded(StatePaths(tmp_path))
    assert old is not None and old.scheme == 1
    assert mismatch(StatePaths(tmp_path), EmbeddingIdentity("m", "fp32", "new" * 20)) is None
    switched = mismatch(StatePaths(tmp_path), EmbeddingIdentity("other", "fp32", "new"))
    assert switched is not None and "from m (fp32" in switched
