"""One model-folder identity: the weight files, their size, and the content hash that the
embeddings server reports and `up` records (config/modelfolder.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_stack.config.modelfolder import fingerprint, weight_files, weights_size


def folder(tmp_path: Path) -> Path:
    f = tmp_path / "model"
    (f / "2_Dense").mkdir(parents=True)
    (f / "model.safetensors").write_bytes(b"w" * 1000)
    (f / "2_Dense" / "model.safetensors").write_bytes(b"d" * 24)
    (f / "pytorch_model.bin").write_bytes(b"b" * 5000)  # present in hub snapshots, not served
    (f / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (f / "tokenizer.json").write_text(json.dumps({"added_tokens": [1, 2]}))
    return f


def test_weight_files_are_what_mlx_loads(tmp_path):
    f = folder(tmp_path)
    assert [p.relative_to(f).as_posix() for p in weight_files(f)] == [
        "2_Dense/model.safetensors", "model.safetensors"]
    assert weights_size(f) == 1024
    assert weights_size(tmp_path / "absent") is None


def test_identity_covers_weights_config_and_tokenizer(tmp_path):
    f = folder(tmp_path)
    base = fingerprint(f)
    assert base.files == ("2_Dense/model.safetensors", "config.json", "model.safetensors",
                          "tokenizer.json")
    (f / "pytorch_model.bin").write_bytes(b"x")  # not served: no change
    assert fingerprint(f).content_sha256 == base.content_sha256
    tok = json.loads((f / "tokenizer.json").read_text())
    tok["added_tokens"] = tok["added_tokens"][:-1]  # any byte difference counts
    (f / "tokenizer.json").write_text(json.dumps(tok))
    assert fingerprint(f).content_sha256 != base.content_sha256


def test_a_renamed_weight_file_changes_the_identity(tmp_path):
    f = folder(tmp_path)
    base = fingerprint(f).content_sha256
    (f / "2_Dense" / "model.safetensors").rename(f / "2_Dense" / "other.safetensors")
    assert fingerprint(f).content_sha256 != base


def test_the_cache_reuses_hashes_until_a_file_changes(tmp_path):
    f = folder(tmp_path)
    cache = tmp_path / "cache" / "fp.json"
    first = fingerprint(f, cache)
    assert first == fingerprint(f)  # the cache never changes the answer
    memo = json.loads(cache.read_text())
    assert len(memo) == 4
    # A stale entry is not used once the file's size or mtime changes.
    (f / "model.safetensors").write_bytes(b"v" * 1001)
    assert fingerprint(f, cache).content_sha256 == fingerprint(f).content_sha256
    assert fingerprint(f, cache).content_sha256 != first.content_sha256


def test_a_hub_snapshot_names_its_revision(tmp_path):
    rev = "a" * 40
    snap = tmp_path / "models--x--y" / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"w")
    assert fingerprint(snap).revision == rev
    assert fingerprint(folder(tmp_path)).revision is None
