"""`mlx-stack init` on this machine: offline, only what is present goes in the stack file."""

from __future__ import annotations

import yaml
from stackenv import StackEnv

ODD_EMBEDDING = """\
models:
  - name: odd-embed
    type: embedding
    source: owner/odd
    architecture: odd_arch
    params_m: 1
    dimensions: 8
    max_sequence_length: 16
    pooling: mean
    normalize: true
    mteb_score: 0
    memory_mb: 10
    quantizations:
      - {id: fp32, source: owner/odd, memory_mb: 10}
"""


def test_init_with_embeddings_offline(tmp_path):
    env = StackEnv(tmp_path / "home", {})
    res = env.cli("init", "--with-embeddings", check=True)
    data = yaml.safe_load((env.home / "stack.yaml").read_text())
    assert data["embeddings"]["model"] == "all-minilm-l6-v2"
    assert data["embeddings"]["port"] == 8003
    assert data["proxy"]["port"] == 4000 and data["proxy"]["host"] == "127.0.0.1"
    assert data["tiers"] == {}  # no chat weights on this machine: named, not written
    assert "not downloaded" in res.stdout and "mlx-stack pull" in res.stdout
    key = env.home / "proxy.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.read_text().strip() not in res.stdout + res.stderr


def test_init_never_overwrites_without_force(tmp_path):
    env = StackEnv(tmp_path / "home", {})
    env.cli("init", "--with-embeddings", check=True)
    stack = env.home / "stack.yaml"
    stack.write_text(stack.read_text() + "# my edit\n")
    key_before = (env.home / "proxy.key").read_text()
    res = env.cli("init", "--with-embeddings")
    assert res.returncode == 2 and "--force" in res.stderr
    assert "# my edit" in stack.read_text()
    assert env.cli("init", "--with-embeddings", "--exist-ok", check=True).returncode == 0
    assert "# my edit" in stack.read_text()
    env.cli("init", "--with-embeddings", "--force", check=True)
    assert "# my edit" not in stack.read_text()
    assert (env.home / "proxy.key").read_text() == key_before  # the key survives a re-init


def test_add_embeddings_keeps_the_users_text(tmp_path):
    env = StackEnv(tmp_path / "home", {})
    env.home.mkdir(parents=True)
    (env.home / "catalog").mkdir()
    stack = env.home / "stack.yaml"
    stack.write_text("# my stack\nversion: 1\nproxy:\n  port: 4100\n")
    res = env.cli("init", "--add-embeddings", "all-minilm-l6-v2")
    assert res.returncode == 0, res.stderr
    text = stack.read_text()
    assert text.startswith("# my stack") and "port: 4100" in text
    assert yaml.safe_load(text)["embeddings"]["model"] == "all-minilm-l6-v2"
    again = env.cli("init", "--add-embeddings", "bge-small-en-v1.5")
    assert again.returncode == 2 and "already has an embeddings tier" in again.stderr
    assert yaml.safe_load(stack.read_text())["embeddings"]["model"] == "all-minilm-l6-v2"


def test_add_embeddings_refuses_unknown_and_unsupported_models(tmp_path):
    env = StackEnv(tmp_path / "home", {})
    env.cli("init", "--with-embeddings", check=True)
    res = env.cli("init", "--add-embeddings", "qwen3-8b", "--force")
    assert res.returncode == 2 and "is a chat model" in res.stderr
    (env.home / "catalog").mkdir()
    (env.home / "catalog" / "odd.yaml").write_text(ODD_EMBEDDING)
    res = env.cli("init", "--add-embeddings", "odd-embed", "--force")
    assert res.returncode == 2 and "(odd_arch) cannot be served" in res.stderr


def test_exist_ok_recreates_a_missing_key(tmp_path):
    env = StackEnv(tmp_path / "home", {})
    env.cli("init", "--with-embeddings", check=True)
    (env.home / "proxy.key").unlink()
    res = env.cli("init", "--with-embeddings", "--exist-ok", check=True)
    assert "created the missing proxy key" in res.stdout
    assert (env.home / "proxy.key").stat().st_mode & 0o777 == 0o600
