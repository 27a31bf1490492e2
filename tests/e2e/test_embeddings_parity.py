"""The server's MiniLM vectors against sentence-transformers on the same weights.

sentence-transformers (torch, CPU) is the reference implementation of this model; it must be
installed (the ``test`` extra): a missing reference fails these tests with the install
command, it never skips them. Texts of mixed lengths sent one by one and in one request (also
through MLX's exact kernels, ``--exact-kernels``, what runs where the fast CPU path does not),
through ``dimensions`` and through token ids; and the batching guarantee: a text's vector
does not depend on what it is batched with. Each test runs once per engine (``--engine mlx``
and ``--engine onnx``, the ONNX Runtime graph built from the same weights), and the two
engines' vectors are compared with each other.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from embedserver import (
    MINILM_DIM,
    MIXED_TEXTS,
    Server,
    cosines,
    embed,
    minilm_path,
    require,
    running_server,
)

pytestmark = pytest.mark.e2e

PARITY = 0.9999
BATCH_INVARIANCE = 0.99999


@pytest.fixture(scope="module")
def reference() -> Any:
    require("torch")
    sentence_transformers = require("sentence_transformers")
    return sentence_transformers.SentenceTransformer(
        str(minilm_path()), device="cpu", local_files_only=True
    )


@pytest.fixture(scope="module")
def expected(reference: Any) -> np.ndarray:
    return reference.encode(MIXED_TEXTS, convert_to_numpy=True, normalize_embeddings=True)


ENGINES = ("mlx", "onnx")


@pytest.fixture(scope="module")
def mlx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("parity-mlx") / "server.log"
    with running_server(log, "--dimensions", "256,128", "--engine", "mlx") as running:
        yield running


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("parity-onnx") / "server.log"
    with running_server(log, "--dimensions", "256,128", "--engine", "onnx") as running:
        yield running


@pytest.fixture(scope="module", params=ENGINES)
def server(request: pytest.FixtureRequest) -> Server:
    """The server on each engine in turn (``dimensions`` enabled too)."""
    running: Server = request.getfixturevalue(f"{request.param}_server")
    with running.client() as http:
        card = http.get("/v1/models").json()["data"][0]
    assert card["engine"] == request.param and card["engine_choice"]["reason"].startswith("forced")
    return running


@pytest.fixture(scope="module")
def exact_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """MLX's own kernels: what runs where the fast CPU path does not (macOS, no compiler)."""
    log = tmp_path_factory.mktemp("parity-exact") / "server.log"
    with running_server(log, "--exact-kernels", "--engine", "mlx") as running:
        yield running


def sixty_four_texts() -> list[str]:
    """64 texts from 1 to ~300 words (some truncated at 256 tokens), deterministic."""
    rng = random.Random(1234)
    words = ["alpha", "beta", "gamma", "delta", "vector", "search", "query", "index", "model"]
    texts = list(MIXED_TEXTS)
    while len(texts) < 64:
        count = rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 300])
        texts.append(" ".join(rng.choice(words) for _ in range(count)))
    return texts


@pytest.mark.parametrize("which", ["mlx_server", "onnx_server", "exact_server"])
def test_vectors_match_sentence_transformers(
    which: str, expected: np.ndarray, request: pytest.FixtureRequest
) -> None:
    server: Server = request.getfixturevalue(which)
    with server.client() as http:
        batched = embed(http, MIXED_TEXTS)
        alone = np.concatenate([embed(http, text) for text in MIXED_TEXTS])
    assert batched.shape == (len(MIXED_TEXTS), MINILM_DIM)
    batched_min = float(cosines(batched, expected).min())
    alone_min = float(cosines(alone, expected).min())
    print(f"{which}: parity min cosine: batched {batched_min:.7f}, alone {alone_min:.7f}")
    assert batched_min >= PARITY
    assert alone_min >= PARITY
    assert float(np.abs(batched - expected).max()) < 1e-3
    # the texts differ, so agreement is not an accident of near-identical vectors
    assert float(cosines(expected[:-1], expected[1:]).max()) < 0.99


def test_dimensions_match_truncated_sentence_transformers(server: Server, reference: Any) -> None:
    for size in (256, 128):
        expected = reference.encode(
            MIXED_TEXTS, convert_to_numpy=True, truncate_dim=size, normalize_embeddings=True
        )
        with server.client() as http:
            got = embed(http, MIXED_TEXTS, dimensions=size)
        assert got.shape == (len(MIXED_TEXTS), size)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert float(cosines(got, expected).min()) >= PARITY


def test_token_ids_and_usage_match_the_real_tokenizer(
    server: Server, reference: Any, expected: np.ndarray
) -> None:
    tokenizer = reference.tokenizer
    encoded = tokenizer(MIXED_TEXTS, truncation=True, max_length=256)["input_ids"]
    too_long = sum(len(ids) > 256 for ids in tokenizer(MIXED_TEXTS)["input_ids"])
    with server.client() as http:
        response = http.post("/v1/embeddings", json={"model": "minilm", "input": MIXED_TEXTS})
        from_ids = embed(http, encoded)
    assert response.json()["usage"]["prompt_tokens"] == sum(len(ids) for ids in encoded)
    assert too_long >= 1
    assert response.headers["x-mlx-stack-truncated-inputs"] == str(too_long)
    assert float(cosines(from_ids, expected).min()) >= PARITY


def test_batching_does_not_change_vectors(server: Server) -> None:
    texts = sixty_four_texts()
    with server.client() as http:
        batched = embed(http, texts)
        for index in (0, 6, 7, 8, 30, 63):  # short, long, truncated, random ones
            alone = embed(http, texts[index])[0]
            assert float(alone @ batched[index]) >= BATCH_INVARIANCE, index


def test_the_two_engines_agree(mlx_server: Server, onnx_server: Server) -> None:
    """Same texts, same batches: MLX's and ONNX Runtime's vectors, element by element."""
    texts = sixty_four_texts()
    with mlx_server.client() as a, onnx_server.client() as b:
        cards = [http.get("/v1/models").json()["data"][0] for http in (a, b)]
        assert cards[0]["content_sha256"] == cards[1]["content_sha256"]  # one vector space
        assert [c["engine"] for c in cards] == ["mlx", "onnx"]
        for chunk in (texts[:1], texts[:16], texts):
            got_mlx, got_onnx = embed(a, chunk), embed(b, chunk)
            low = float(cosines(got_mlx, got_onnx).min())
            print(f"engines agree on {len(chunk)} texts: min cosine {low:.7f}, max abs diff "
                  f"{float(np.abs(got_mlx - got_onnx).max()):.2e}")
            assert low >= PARITY
            assert float(np.abs(got_mlx - got_onnx).max()) < 1e-3
