"""ModernBERT cross-encoders and the Qwen3 yes/no reranker, served, against their references.

Tiny random-weight folders from ``tests/support/tinyrerank_hf.py``. References (torch, CPU):
ModernBERT through sentence-transformers' ``CrossEncoder`` on the same folder; Qwen3-Reranker
through transformers' ``Qwen3ForCausalLM`` with the model card's own recipe (prompt, left
padding, truncation of the user turn's end, ``softmax([no, yes])[yes]``), written out below.
Bar: probabilities within 1e-4 and the same order, alone, in one large request of mixed
lengths, and across concurrent requests; long pairs lose document tokens first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from embedserver import MIXED_TEXTS, Server, require, running_server
from tinyrerank_hf import modernbert_reranker, qwen3_reranker

pytestmark = pytest.mark.e2e

QUERY = "what is the capital of france?"
DOCUMENTS = ["Paris is the capital of France.", "Berlin is in Germany.", "france", "",
             "yes\nno?\n", *MIXED_TEXTS]  # fmt: skip
TOLERANCE = 1e-4
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the "
          "Query and the Instruct provided. Note that the answer can only be \"yes\" or "
          "\"no\".<|im_end|>\n<|im_start|>user\n")  # fmt: skip
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

Reference = Callable[[str, list[str]], np.ndarray]


def qwen3_card_reference(folder: Path, max_length: int = 8192) -> Reference:
    """The Qwen3-Reranker model card's scoring, on transformers."""
    torch, transformers = require("torch"), require("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    no, yes = (tokenizer.convert_tokens_to_ids(t) for t in ("no", "yes"))
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)

    def score(query: str, documents: list[str]) -> np.ndarray:
        texts = [f"<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {d}"
                 for d in documents]  # fmt: skip
        inputs = tokenizer(texts, padding=False, truncation="longest_first",
                           return_attention_mask=False,
                           max_length=max_length - len(prefix) - len(suffix))  # fmt: skip
        inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
        inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
        with torch.no_grad():
            last = model(**inputs).logits[:, -1, :]
        pair = torch.log_softmax(torch.stack([last[:, no], last[:, yes]], dim=1), dim=1)
        return pair[:, 1].exp().numpy().astype(np.float64)

    return score


def cross_encoder_reference(folder: Path) -> Reference:
    st = require("sentence_transformers")
    model = st.CrossEncoder(str(folder), device="cpu", max_length=512)
    return lambda query, documents: np.asarray(
        model.predict([(query, d) for d in documents]), dtype=np.float64)


BUILDERS = {
    "modernbert-mean": lambda dest: modernbert_reranker(dest, "mean"),
    "modernbert-cls": lambda dest: modernbert_reranker(dest, "cls"),
    "qwen3-yes-no": qwen3_reranker,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def served(request, tmp_path_factory) -> Iterator[tuple[Server, Reference]]:
    folder = BUILDERS[request.param](tmp_path_factory.mktemp("rerank") / request.param)
    qwen = request.param.startswith("qwen3")
    reference = qwen3_card_reference(folder) if qwen else cross_encoder_reference(folder)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(log, "--task", "rerank", model=folder, name="tiny-rerank") as server:
        yield server, reference


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


def test_scores_and_order_match_the_reference_alone_and_batched(served):
    server, reference = served
    expected = reference(QUERY, DOCUMENTS)
    answer = rerank(server, DOCUMENTS)
    got = scores_in_order(answer, len(DOCUMENTS))
    print(f"max abs diff batched {np.max(np.abs(got - expected)):.2e}")
    assert np.max(np.abs(got - expected)) <= TOLERANCE, (got, expected)
    assert [r["index"] for r in answer["results"]] == list(np.argsort(-expected, kind="stable"))
    assert np.ptp(expected) > 0.05  # a spread, so the order is a real check
    alone = np.array([rerank(server, [d])["results"][0]["relevance_score"] for d in DOCUMENTS])
    print(f"max abs diff alone {np.max(np.abs(alone - expected)):.2e}")
    assert np.max(np.abs(alone - expected)) <= TOLERANCE


def test_concurrent_requests_get_their_own_scores(served):
    server, reference = served
    sets = [DOCUMENTS[i:i + 5] for i in range(0, len(DOCUMENTS) - 5, 2)]
    with ThreadPoolExecutor(len(sets)) as pool:
        answers = list(pool.map(lambda docs: rerank(server, docs), sets))
    for docs, answer in zip(sets, answers, strict=True):
        expected = reference(QUERY, docs)
        assert np.max(np.abs(scores_in_order(answer, len(docs)) - expected)) <= TOLERANCE
        assert [r["index"] for r in answer["results"]] == list(np.argsort(-expected, kind="stable"))


def test_raw_scores_are_log_odds(served):
    server, _ = served
    probabilities = scores_in_order(rerank(server, DOCUMENTS[:5]), 5)
    logits = scores_in_order(rerank(server, DOCUMENTS[:5], raw_scores=True), 5)
    assert np.max(np.abs(1 / (1 + np.exp(-logits)) - probabilities)) <= 1e-6


def test_qwen3_long_documents_are_cut_keeping_the_template(tmp_path):
    folder = qwen3_reranker(tmp_path / "qwen3")
    reference = qwen3_card_reference(folder, max_length=160)
    long_document = " ".join(f"word{i}" for i in range(300))
    documents = [long_document, "short", "Paris"]
    with running_server(tmp_path / "cut.log", "--task", "rerank", "--max-seq-len", "160",
                        model=folder, name="tiny-rerank") as server:  # fmt: skip
        answer = httpx.post(f"{server.url}/v1/rerank", timeout=60, json={
            "model": "tiny-rerank", "query": QUERY, "documents": documents})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-mlx-stack-truncated-inputs"] == "1"
        got = scores_in_order(answer.json(), 3)
    expected = reference(QUERY, documents)
    assert np.max(np.abs(got - expected)) <= TOLERANCE, (got, expected)


def test_modernbert_long_pairs_lose_document_tokens_first(tmp_path):
    st, torch = require("sentence_transformers"), require("torch")
    folder = modernbert_reranker(tmp_path / "mb")
    long_document = " ".join(["word"] * 100)
    with running_server(tmp_path / "cut.log", "--max-seq-len", "32", model=folder,
                        name="tiny-rerank") as server:  # fmt: skip
        answer = httpx.post(f"{server.url}/v1/rerank", timeout=60, json={
            "model": "tiny-rerank", "query": QUERY, "documents": [long_document, "short"]})
        assert answer.status_code == 200 and answer.headers["x-mlx-stack-truncated-inputs"] == "1"
        got = next(r for r in answer.json()["results"] if r["index"] == 0)["relevance_score"]
    model = st.CrossEncoder(str(folder), device="cpu")
    tokens = model.tokenizer(QUERY, long_document, truncation="only_second", max_length=32,
                             return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        expected = torch.sigmoid(model.model(**tokens).logits).item()
    assert abs(got - expected) <= TOLERANCE
