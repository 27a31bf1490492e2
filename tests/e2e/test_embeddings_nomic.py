"""Our MLX ``nomic_bert`` against an independent implementation, on tiny random weights.

No hub here, so no real nomic-embed-text weights: a 2-layer, 64-wide NomicBERT is built with
random weights saved under nomic's own checkpoint names and config keys (``n_embd``, ...,
``encoder.layers.N.attn.Wqkv``), next to MiniLM's tokenizer (the same bert-base-uncased
vocabulary nomic uses). The reference is transformers' native ``NomicBertModel`` (torch, CPU),
loading the *same* safetensors file through transformers' own conversion of nomic's names,
so weight naming, rotary embeddings, SwiGLU, post-norm and pooling are all checked by code
we did not write. Served through the real server on the MLX engine (with our fast CPU kernels
and without) and on the ONNX Runtime engine (``engine/onnxnomic.py``): alone, in a
mixed-length batch, from token ids, with ``dimensions`` and with nomic's prompts; the two
engines also against each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tinyembed
from embedserver import (
    MIXED_TEXTS,
    Server,
    cosines,
    embed,
    minilm_path,
    require,
    running_server,
)

pytestmark = pytest.mark.e2e

WIDTH = tinyembed.WIDTH
TRAINED = 16
"""``max_trained_positions`` of the dynamic-NTK variant: texts longer than this rescale."""


def write_folders(root: Path, scaling: float | None) -> tuple[Path, Path]:
    """(our folder in nomic's format, transformers' folder sharing the weights file)."""
    return tinyembed.nomic_bert(root, scaling=scaling, trained=TRAINED)


class Reference:
    """transformers' NomicBertModel + mask-aware mean pooling + L2, one text at a time."""

    def __init__(self, folder: Path) -> None:
        require("torch")
        transformers = require("transformers")
        from tokenizers import Tokenizer

        if not hasattr(transformers, "NomicBertModel"):
            pytest.fail(
                f"transformers {transformers.__version__} has no NomicBertModel (the native port "
                "is in 5.x; tested with 5.23): pip install -U transformers",
                pytrace=False,
            )
        model, info = transformers.NomicBertModel.from_pretrained(
            str(folder), output_loading_info=True
        )
        problems = {k: v for k, v in info.items() if v}
        assert not problems, f"transformers did not load every nomic weight: {problems}"
        self.model = model.eval()
        self.tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        rows = []
        with torch.inference_mode():
            for text in texts:
                ids = torch.tensor([self.tokenizer.encode(text).ids])
                hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
                pooled = hidden.last_hidden_state[0].mean(dim=0)
                rows.append((pooled / pooled.norm()).numpy())
        return np.stack(rows)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_folders(tmp_path_factory.mktemp("nomic"), scaling=None)


@pytest.fixture(scope="module")
def reference(folders: tuple[Path, Path]) -> Reference:
    return Reference(folders[1])


SERVERS = {
    "fast-kernels": ["--engine", "mlx"],
    "exact-kernels": ["--engine", "mlx", "--exact-kernels"],
    "onnx": ["--engine", "onnx"],
}
DIMENSIONS = (16, 32)
"""Matryoshka sizes the servers are started with (``--dimensions``)."""


@dataclass
class Served:
    server: Server
    engine: str


@pytest.fixture(scope="module", params=list(SERVERS))
def nomic_server(
    request: pytest.FixtureRequest,
    folders: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    extra = [*SERVERS[request.param], "--dimensions", ",".join(map(str, DIMENSIONS))]
    log = tmp_path_factory.mktemp("nomic-server") / "server.log"
    with running_server(log, *extra, model=folders[0], name="nomic") as server:
        yield Served(server, "onnx" if request.param == "onnx" else "mlx")


TEXTS = [t for t in MIXED_TEXTS if len(t) < 1000]  # keep it under the tiny model's positions


def test_nomic_matches_transformers_alone_and_batched(
    nomic_server: Served, reference: Reference
) -> None:
    expected = reference(TEXTS)
    with nomic_server.server.client() as http:
        batched = embed(http, TEXTS, model="nomic")
        alone = np.concatenate([embed(http, text, model="nomic") for text in TEXTS])
        card = http.get("/v1/models").json()["data"][0]
    assert card["architecture"] == "nomic_bert" and card["dimensions"] == WIDTH
    assert card["pooling"] == "mean" and card["normalize"] is True
    assert card["engine"] == nomic_server.engine
    assert float(cosines(batched, expected).min()) >= 0.9999
    assert float(cosines(alone, expected).min()) >= 0.9999
    assert float(np.abs(batched - expected).max()) < 1e-4
    # random weights give far-apart vectors, so agreement above is not an accident
    assert float(cosines(expected[:1].repeat(len(TEXTS) - 1, 0), expected[1:]).max()) < 0.99


def test_nomic_token_ids(nomic_server: Served, reference: Reference) -> None:
    """Token ids as sent (the tokenizer's own, with [CLS]/[SEP]) give the texts' vectors."""
    tokenizer = reference.tokenizer
    ids = [e.ids for e in tokenizer.encode_batch(TEXTS)]
    with nomic_server.server.client() as http:
        served = embed(http, ids, model="nomic")
        single = embed(http, ids[1], model="nomic")
    expected = reference(TEXTS)
    assert float(cosines(served, expected).min()) >= 0.9999
    assert float(cosines(single, expected[1:2]).min()) >= 0.9999


def test_nomic_dimensions(nomic_server: Served, reference: Reference) -> None:
    """Matryoshka: the first n values of the full vector, then unit length."""
    expected = reference(TEXTS)
    with nomic_server.server.client() as http:
        for size in DIMENSIONS:
            served = embed(http, TEXTS, model="nomic", dimensions=size)
            assert served.shape == (len(TEXTS), size)
            np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
            assert float(cosines(served, expected[:, :size]).min()) >= 0.9999


def test_nomic_prompts_come_from_the_folder(nomic_server: Served, reference: Reference) -> None:
    with nomic_server.server.client() as http:
        query = embed(http, "what is rotary embedding", model="nomic", input_type="query")
        document = embed(http, "rotary embedding", model="nomic", input_type="document")
    expected = reference(
        ["search_query: what is rotary embedding", "search_document: rotary embedding"]
    )
    assert float(cosines(np.concatenate([query, document]), expected).min()) >= 0.9999


def test_nomic_engines_agree(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """The ONNX Runtime engine's vectors against the MLX engine's, both served."""
    vectors = {}
    for engine in ("mlx", "onnx"):
        log = tmp_path / f"{engine}.log"
        args = ("--engine", engine)
        with running_server(log, *args, model=folders[0], name="nomic") as server, \
                server.client() as http:  # fmt: skip
            vectors[engine] = embed(http, TEXTS, model="nomic")
            vectors[f"{engine}-alone"] = embed(http, TEXTS[-1], model="nomic")
    assert float(cosines(vectors["onnx"], vectors["mlx"]).min()) >= 0.9999
    assert float(cosines(vectors["onnx-alone"], vectors["mlx-alone"]).min()) >= 0.9999


@pytest.mark.parametrize("engine", ["mlx", "onnx"])
def test_nomic_dynamic_ntk_rotary_scaling(tmp_path: Path, engine: str) -> None:
    """rotary_scaling_factor grows the rotary base beyond max_trained_positions, as nomic's."""
    ours, theirs = write_folders(tmp_path, scaling=2.0)
    reference = Reference(theirs)
    texts = sorted(
        ["short text", " ".join(f"tok{i}" for i in range(12)), "word " * 40, "more words " * 30],
        key=len,
    )  # ascending: transformers' dynamic rotary cache only grows
    expected = reference(texts)
    log = tmp_path / "server.log"
    with running_server(log, "--engine", engine, model=ours, name="nomic") as server, \
            server.client() as http:  # fmt: skip
        alone = np.concatenate([embed(http, text, model="nomic") for text in texts])
    assert float(cosines(alone, expected).min()) >= 0.9999
