"""The rerank mode of the embeddings server against sentence-transformers' ``CrossEncoder``.

No reranker weights reach this machine, so tiny random-weight cross-encoders are built by
``tests/support/tinyrerank.py`` in Hugging Face's layout (BERT as ms-marco-MiniLM, XLM-RoBERTa
as bge-reranker): the reference (torch, CPU) loads the same folder with its own code. Served
by the real server process (``--task`` found from the folder), over HTTP: scores within 1e-4
of the reference's probabilities, the same order, alone, in one large request and across
concurrent requests that share passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from embedserver import MIXED_TEXTS, Server, require, running_server
from tinyrerank import build_tiny_reranker

pytestmark = pytest.mark.e2e

QUERY = "what is the capital of france"
DOCUMENTS = [
    "Paris is the capital of France.",
    "Berlin is in Germany.",
    "france",
    *MIXED_TEXTS,
]
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["bert", "xlm_roberta"])
def reranker(request, tmp_path_factory) -> Iterator[tuple[Server, Path]]:
    folder = build_tiny_reranker(tmp_path_factory.mktemp("rerank") / request.param,
                                 request.param)  # fmt: skip
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(log, model=folder, name="tiny-rerank") as server:
        yield server, folder


@pytest.fixture(scope="module")
def reference(reranker) -> object:
    st = require("sentence_transformers")
    return st.CrossEncoder(str(reranker[1]), device="cpu", max_length=512)


def rerank(server: Server, documents: list, **extra: object) -> dict:
    body = {"model": "tiny-rerank", "query": QUERY, "documents": documents, **extra}
    answer = httpx.post(f"{server.url}/v1/rerank", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def scores_in_order(answer: dict, count: int) -> np.ndarray:
    scores = np.full(count, np.nan)
    for result in answer["results"]:
        scores[result["index"]] = result["relevance_score"]
    return scores


def test_scores_and_order_match_the_reference(reranker, reference):
    server, _ = reranker
    expected = np.asarray(reference.predict([(QUERY, d) for d in DOCUMENTS]), dtype=np.float64)
    answer = rerank(server, DOCUMENTS)
    got = scores_in_order(answer, len(DOCUMENTS))
    assert np.max(np.abs(got - expected)) <= TOLERANCE, (got, expected)
    assert [r["index"] for r in answer["results"]] == list(np.argsort(-expected, kind="stable"))
    alone = [rerank(server, [d])["results"][0]["relevance_score"] for d in DOCUMENTS[:4]]
    assert np.max(np.abs(np.array(alone) - expected[:4])) <= TOLERANCE
    assert answer["meta"]["tokens"]["input_tokens"] == answer["usage"]["total_tokens"] > 0


def test_raw_scores_are_the_logits(reranker, reference):
    torch = require("torch")
    server, _ = reranker
    expected = reference.predict([(QUERY, d) for d in DOCUMENTS[:5]],
                                 activation_fn=torch.nn.Identity())  # fmt: skip
    got = scores_in_order(rerank(server, DOCUMENTS[:5], raw_scores=True), 5)
    assert np.max(np.abs(got - expected)) <= TOLERANCE * 10  # logits are unbounded
    assert np.ptp(got) > 0.05  # a spread: the ranking test above can fail


def test_concurrent_requests_share_passes_and_get_their_own_scores(reranker, reference):
    server, _ = reranker
    sets = [DOCUMENTS[i:i + 5] for i in range(0, len(DOCUMENTS) - 5, 2)]
    with ThreadPoolExecutor(len(sets)) as pool:
        answers = list(pool.map(lambda docs: rerank(server, docs), sets))
    for docs, answer in zip(sets, answers, strict=True):
        expected = reference.predict([(QUERY, d) for d in docs])
        assert np.max(np.abs(scores_in_order(answer, len(docs)) - expected)) <= TOLERANCE


def test_top_n_documents_and_objects(reranker):
    server, _ = reranker
    full = rerank(server, DOCUMENTS[:6])
    top = rerank(server, [{"text": d} for d in DOCUMENTS[:6]], top_n=2, return_documents=True)
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    for result in top["results"]:
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert "document" not in full["results"][0]
    many = rerank(server, DOCUMENTS[:3], top_n=50)
    assert len(many["results"]) == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": QUERY, "documents": ["a"]}, "model"),
        ({"model": "tiny-rerank", "documents": ["a"]}, "query"),
        ({"model": "tiny-rerank", "query": QUERY, "documents": []}, "documents"),
        ({"model": "tiny-rerank", "query": QUERY, "documents": "a"}, "documents"),
        ({"model": "tiny-rerank", "query": QUERY, "documents": [1]}, "documents"),
        ({"model": "tiny-rerank", "query": QUERY, "documents": ["a"] * 1001}, "documents"),
        ({"model": "tiny-rerank", "query": QUERY, "documents": ["a"], "top_n": 0}, "top_n"),
        ({"model": "tiny-rerank", "query": QUERY, "documents": ["a"], "return_documents": 1},
         "return_documents"),
        ({"model": "other", "query": QUERY, "documents": ["a"]}, "model"),
    ],
)  # fmt: skip
def test_bad_requests_are_4xx_naming_the_field(reranker, body, param):
    server, _ = reranker
    answer = httpx.post(f"{server.url}/v1/rerank", json=body, timeout=30)
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["error"]["param"] == param


def test_a_reranker_serves_no_embeddings_and_says_what_it_is(reranker):
    server, _ = reranker
    wrong = httpx.post(f"{server.url}/v1/embeddings", timeout=30,
                       json={"model": "tiny-rerank", "input": "x"})  # fmt: skip
    assert wrong.status_code == 404
    card = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]
    assert card["task"] == "rerank"
    paths = httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]
    assert "/v1/rerank" in paths and "/v1/embeddings" not in paths


def test_long_pairs_lose_document_tokens_first(tmp_path):
    folder = build_tiny_reranker(tmp_path / "bert")
    long_document = " ".join(["word"] * 100)
    with running_server(tmp_path / "cut.log", "--max-seq-len", "32", model=folder,
                        name="tiny-rerank") as server:  # fmt: skip
        answer = httpx.post(f"{server.url}/v1/rerank", timeout=60, json={
            "model": "tiny-rerank", "query": QUERY, "documents": [long_document, "short"]})
        assert answer.status_code == 200
        assert answer.headers["x-mlx-stack-truncated-inputs"] == "1"
        short_pair = 10  # [CLS] + 6 query tokens + [SEP] + "short" + [SEP]
        assert answer.json()["meta"]["tokens"]["input_tokens"] == 32 + short_pair
        # the query is whole and the document cut: transformers' "only_second" truncation
        st, torch = require("sentence_transformers"), require("torch")
        model = st.CrossEncoder(str(folder), device="cpu")
        tokens = model.tokenizer(QUERY, long_document, truncation="only_second", max_length=32,
                                 return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            expected = torch.sigmoid(model.model(**tokens).logits).item()
        got = answer.json()["results"]
        assert abs(next(r for r in got if r["index"] == 0)["relevance_score"] - expected) <= 1e-4
    with running_server(tmp_path / "refuse.log", "--max-seq-len", "32", "--no-truncate",
                        model=folder, name="tiny-rerank") as server:  # fmt: skip
        refused = httpx.post(f"{server.url}/v1/rerank", timeout=60, json={
            "model": "tiny-rerank", "query": QUERY, "documents": ["short", long_document]})
        assert refused.status_code == 400 and "documents[1]" in refused.json()["error"]["message"]
