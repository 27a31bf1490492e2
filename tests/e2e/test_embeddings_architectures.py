"""Every architecture the server runs gives sentence-transformers' vectors, on tiny models.

No hub here, so no real weights but MiniLM's: for each architecture of the catalog and of
``model/architectures.py`` (bert with mean and with CLS pooling, xlm_roberta, modernbert,
qwen3 with last-token pooling, gemma3_text with its Dense layers and prompts) a tiny
random-weight folder is built in the hub's layout (``tests/support/tinyembed.py``), served by
the real server in its own process, and compared with sentence-transformers (torch, CPU)
loading the same folder with its own modules. nomic_bert has its own test
(``test_embeddings_nomic.py``). Cases: each text alone, one mixed-length batch (against the
reference padded on the left and on the right), token ids, ``dimensions`` (Matryoshka cut,
then unit length), and the query/document prompts. Bar: cosine >= 0.9999 per vector.
Every architecture runs on the MLX engine (``--engine mlx``); those the ONNX Runtime engine
builds (bert with mean and CLS pooling, xlm_roberta, qwen3, gemma3_text) run on it too
(``--engine onnx``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from embedserver import MIXED_TEXTS, Server, cosines, embed, require, running_server
from tinyembed import (
    BUILDERS,
    MAX_SEQ,
    LlamaBidirectionalReference,
    TinyModel,
    build,
    quantize,
)

pytestmark = pytest.mark.e2e

BAR = 0.9999
NAME = "tiny"
TEXTS = MIXED_TEXTS  # 1 to 300+ tokens: the longest is cut at MAX_SEQ by both sides
QUERIES = ["what is a tiny model?", "Wie spät ist es?"]


ONNX_KINDS = ("bert-mean", "bert-cls", "xlm_roberta", "qwen3", "gemma3_text")
"""The kinds the ONNX Runtime engine builds (``engine/onnxgraph.py``, ``engine/onnxdecoder.py``)."""
PARAMS = [(kind, "mlx") for kind in BUILDERS] + [(kind, "onnx") for kind in ONNX_KINDS]


@dataclass
class Case:
    model: TinyModel
    reference: Any  # sentence_transformers.SentenceTransformer
    server: Server
    engine: str = "mlx"

    def expected(self, texts: list[str], **options: Any) -> np.ndarray:
        """The reference, one text per call (no padding at all on its side)."""
        return np.concatenate(
            [self.reference.encode([t], convert_to_numpy=True, **options) for t in texts]
        )

    def batched(self, texts: list[str], padding_side: str) -> np.ndarray:
        tokenizer = self.reference.tokenizer
        saved, tokenizer.padding_side = tokenizer.padding_side, padding_side
        try:
            return self.reference.encode(texts, batch_size=len(texts), convert_to_numpy=True)
        finally:
            tokenizer.padding_side = saved

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.model.folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(MAX_SEQ)
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=True)]


def check(case: Case, label: str, served: np.ndarray, expected: np.ndarray) -> float:
    """Assert the bar per vector; print the minimum for the record (``pytest -s``)."""
    assert served.shape == expected.shape, (served.shape, expected.shape)
    values = cosines(served, expected)
    low = float(values.min())
    print(f"\nPARITY {case.model.kind:12s} {case.engine:4s} {label:22s} min cosine {low:.7f}")
    assert low >= BAR, f"{case.model.kind} {label}: cosines {np.round(values, 6).tolist()}"
    return low


@pytest.fixture(scope="module", params=PARAMS,
                ids=[kind if engine == "mlx" else f"{kind}-{engine}" for kind, engine in PARAMS])
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Case]:
    require("torch")
    st = require("sentence_transformers")
    kind, engine = request.param
    root = tmp_path_factory.mktemp(f"{kind}-{engine}")
    model = build(kind, root / "model")
    if model.architecture == "llama_bidirec":  # its hub code is its own: transformers + recipe
        reference: Any = LlamaBidirectionalReference(model.folder)
    else:
        reference = st.SentenceTransformer(str(model.folder), device="cpu")  # type: ignore[attr-defined]
    with running_server(
        root / "server.log", *model.server_args, "--engine", engine, model=model.folder,
        name=NAME,
    ) as server:
        yield Case(model, reference, server, engine)


def test_model_card(case: Case) -> None:
    with case.server.client() as http:
        card = http.get("/v1/models").json()["data"][0]
    pooling = {"mean_tokens": "mean", "cls_token": "cls", "lasttoken": "last"}[case.model.pooling]
    assert card["architecture"] == case.model.architecture
    assert card["pooling"] == pooling and card["normalize"] is True
    assert card["max_seq_length"] == MAX_SEQ
    assert card["engine"] == case.engine


def test_each_text_alone(case: Case) -> None:
    with case.server.client() as http:
        served = np.concatenate([embed(http, t, model=NAME) for t in TEXTS])
    expected = case.expected(TEXTS)
    check(case, "alone", served, expected)
    # random weights give far-apart vectors, so the agreement above is no accident
    pairs = expected @ expected.T
    np.fill_diagonal(pairs, -1.0)
    assert float(pairs.max()) < 0.99


def test_mixed_length_batch(case: Case) -> None:
    """One request of all lengths (padded on the right here) against each text alone and
    against the reference's own batches, padded on the left and on the right.

    Left padding is what Qwen3-Embedding's tokenizer does, and where last-token pooling goes
    wrong if the last position is read blindly. BERT is compared right-padded only: its
    absolute positions make a left-padded batch a different input (cosine ~0.999 in the
    reference itself), which is why BERT tokenizers pad on the right.
    """
    with case.server.client() as http:
        served = embed(http, TEXTS, model=NAME)
    check(case, "batch vs alone", served, case.expected(TEXTS))
    sides = ("right",) if case.model.architecture == "bert" else ("left", "right")
    for side in sides:
        check(case, f"batch vs {side}-padded", served, case.batched(TEXTS, side))


def test_token_ids(case: Case) -> None:
    ids = case.token_ids(TEXTS)
    with case.server.client() as http:
        served = embed(http, ids, model=NAME)
        single = embed(http, ids[1], model=NAME)
    expected = case.expected(TEXTS)
    check(case, "token ids", served, expected)
    check(case, "token ids, one", single, expected[1:2])


def test_dimensions(case: Case) -> None:
    """Matryoshka sizes where the catalog declares them; otherwise only the full size."""
    full = case.expected(TEXTS[:1]).shape[1]
    with case.server.client() as http:
        if not case.model.dimensions:
            whole = embed(http, TEXTS[:3], model=NAME, dimensions=full)
            check(case, f"dimensions={full}", whole, case.expected(TEXTS[:3]))
            refused = http.post(
                "/v1/embeddings", json={"model": NAME, "input": "x", "dimensions": full // 2}
            )
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions"
            return
        for size in case.model.dimensions:
            served = embed(http, TEXTS, model=NAME, dimensions=size)
            assert served.shape[1] == size
            np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
            check(case, f"dimensions={size}", served, case.expected(TEXTS, truncate_dim=size))


def test_prompts(case: Case) -> None:
    """``input_type`` adds the folder's prompts, as sentence-transformers' ``prompt_name``."""
    if not case.model.prompts:
        with case.server.client() as http:
            plain = embed(http, QUERIES, model=NAME)
            query = embed(http, QUERIES, model=NAME, input_type="query")
        np.testing.assert_allclose(plain, query, atol=1e-6)  # no prompt: the text as sent
        return
    with case.server.client() as http:
        for role in ("query", "document"):
            served = embed(http, QUERIES, model=NAME, input_type=role)
            check(case, f"prompt {role}", served, case.expected(QUERIES, prompt_name=role))


# ---------------------------------------------------------------------------------- quantised

QUANTISED = [
    ("bert-mean", 8),
    ("bert-mean", 4),
    ("qwen3", 8),
    ("qwen3", 4),
    ("gemma3_text", 8),
    ("gemma3_text", 4),
]
"""The catalog's MLX conversions: all-MiniLM-L6-v2-4bit, Qwen3-Embedding-0.6B-4bit-DWQ,
embeddinggemma-300m-8bit (and the other width of each)."""
QUANTISED_BOUND = {8: 0.9999, 4: 0.975}
"""Minimum cosine to the unquantised model, per vector, over TEXTS (group size 64)."""


@dataclass
class Quantised:
    kind: str
    bits: int
    layers: int
    reference: Any
    server: Server


@pytest.fixture(scope="module", params=QUANTISED, ids=lambda p: f"{p[0]}-{p[1]}bit")
def quantised(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Quantised]:
    require("torch")
    st = require("sentence_transformers")
    kind, bits = request.param
    root = tmp_path_factory.mktemp(f"{kind}-{bits}bit")
    model = build(kind, root / "model")
    layers = quantize(model, root / "quantised", bits)
    reference = st.SentenceTransformer(str(model.folder), device="cpu")  # type: ignore[attr-defined]
    with running_server(root / "server.log", model=root / "quantised", name=NAME) as server:
        yield Quantised(kind, bits, layers, reference, server)


def test_quantised_model_close_to_unquantised(quantised: Quantised) -> None:
    """The server loads mlx-community's quantised layout and its vectors stay close.

    Measured on these tiny random models (group size 64, min cosine over TEXTS, per vector,
    against sentence-transformers on the unquantised folder, which the tests above show the
    server matches to 1e-7): 8-bit: bert 0.99993, qwen3 0.99992, gemma3_text 0.99994
    (bound 0.9999); 4-bit: bert 0.9779, qwen3 0.9772, gemma3_text 0.9771 (bound 0.975).
    The 8-bit bound caught a real bug (gemma's embedding scale rounded to an integer:
    0.99985). Random weights quantise worse
    than trained ones (no structure, 64-wide groups), so real conversions should do better.
    """
    expected = np.concatenate(
        [quantised.reference.encode([t], convert_to_numpy=True) for t in TEXTS]
    )
    with quantised.server.client() as http:
        served = embed(http, TEXTS, model=NAME)
        alone = np.concatenate([embed(http, t, model=NAME) for t in TEXTS[:3]])
    values = cosines(served, expected)
    low = float(values.min())
    print(
        f"\nQUANTISED {quantised.kind:12s} {quantised.bits}-bit ({quantised.layers} layers) "
        f"min cosine {low:.7f} mean {float(values.mean()):.7f}"
    )
    assert quantised.layers >= 10  # every projection and the embedding table
    assert low >= QUANTISED_BOUND[quantised.bits], np.round(values, 5).tolist()
    assert float(values.max()) < 0.999999  # really quantised, not float weights read back
    assert float(cosines(alone, served[:3]).min()) >= BAR  # batching changes nothing
