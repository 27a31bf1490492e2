"""Rerank requests, answers and pair truncation as pure functions (the served model is in
tests/e2e/test_rerank_server.py)."""

from __future__ import annotations

import numpy as np
import pytest
from tinyrerank import build_tiny_reranker

from mlx_stack.embeddings.api.apierror import ApiError
from mlx_stack.embeddings.api.rerank import parse_rerank_request, rerank_response
from mlx_stack.embeddings.model.crossencoder import relevance
from mlx_stack.embeddings.model.settings import ModelFolderError, resolve
from mlx_stack.embeddings.model.tokenizer import PairTokenizer


def test_a_request_with_every_field():
    parsed = parse_rerank_request({
        "model": "m", "query": "q", "documents": ["a", {"text": "b"}], "top_n": 1.0,
        "return_documents": True, "max_tokens_per_doc": 7, "raw_scores": False, "x": 1})
    assert parsed.documents == ("a", "b") and parsed.top_n == 1
    assert parsed.return_documents and parsed.max_tokens_per_doc == 7


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"query": "q", "documents": ["a"]}, "model"),
        ({"model": "m", "query": "", "documents": ["a"]}, "query"),
        ({"model": "m", "query": "\ud800", "documents": ["a"]}, "query"),
        ({"model": "m", "query": "q", "documents": ["a", "\udfff"]}, "documents"),
        ({"model": "m", "query": "q", "documents": [{"txt": "a"}]}, "documents"),
        ({"model": "m", "query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
        ({"model": "m", "query": "q", "documents": ["a"], "top_n": True}, "top_n"),
        ({"model": "m", "query": "q", "documents": ["a"], "max_tokens_per_doc": 1.5},
         "max_tokens_per_doc"),
        ({"model": "m", "query": "q", "documents": ["a"], "raw_scores": "yes"}, "raw_scores"),
    ],
)  # fmt: skip
def test_bad_requests(body, param):
    with pytest.raises(ApiError) as refused:
        parse_rerank_request(body)
    assert refused.value.kind.status == 400 and refused.value.param == param


def test_the_answer_is_best_first_and_cut_to_top_n():
    request = parse_rerank_request({"model": "m", "query": "q", "documents": ["a", "b", "c"],
                                    "top_n": 2, "return_documents": True})  # fmt: skip
    body = rerank_response(request, np.array([0.2, 0.9, 0.2]), 12)
    assert [(r["index"], r["document"]["text"]) for r in body["results"]] == [(1, "b"), (0, "a")]
    assert body["usage"]["total_tokens"] == body["meta"]["tokens"]["input_tokens"] == 12


def test_relevance_is_a_stable_sigmoid():
    got = relevance(np.array([-1000.0, 0.0, 2.0, 1000.0]))
    assert got[0] == 0.0 and got[1] == 0.5 and got[3] == 1.0
    assert abs(got[2] - 1 / (1 + np.exp(-2))) < 1e-15


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_reranker(tmp_path_factory.mktemp("rr") / "bert")


def test_documents_are_cut_first_then_a_long_query_to_half(folder):
    tokenizer = PairTokenizer(folder, 16)  # 3 special tokens: 13 for query + document
    short, long_doc = tokenizer.encode_pairs("one two", ["a b c", " ".join("x" * 30)])
    assert len(short) == 2 + 3 + 3 and not short.truncated
    assert len(long_doc) == 16 and long_doc.truncated and long_doc.full_length == 35
    assert long_doc.type_ids.count(0) == 4  # [CLS] one two [SEP]: the query is whole
    long_query = " ".join("q" * 30)
    (pair,) = tokenizer.encode_pairs(long_query, ["a b c d e f g h i j"])
    assert len(pair) == 16 and pair.type_ids.count(0) == 2 + 13 // 2  # the query got half
    (capped,) = tokenizer.encode_pairs("one two", ["a b c d e f"], max_document_tokens=2)
    assert len(capped) == 2 + 3 + 2 and capped.truncated


def test_a_classifier_with_several_labels_is_not_a_reranker(folder, tmp_path):
    import json
    import shutil

    other = tmp_path / "nli"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="3 labels"):
        resolve(other)
    assert resolve(folder).task == "rerank"


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    from tinyrerank_hf import qwen3_reranker_tokenizer

    return qwen3_reranker_tokenizer(tmp_path_factory.mktemp("rr") / "qwen3")


@pytest.mark.parametrize("document", ["Paris is the capital.", "", "!! odd", " lead", "1990",
                                      "\nnew line?\n", "yes no"])  # fmt: skip
@pytest.mark.parametrize("query", ["capital of france?", "q ", "what\n"])
def test_the_yes_no_prompt_is_the_cards_whole_string_tokenised(qwen3_folder, query, document):
    from tokenizers import Tokenizer

    from mlx_stack.embeddings.model import yesnoprompt as p

    (pair,) = p.PromptTokenizer(qwen3_folder, 4096).encode_pairs(query, [document])
    whole = Tokenizer.from_file(str(qwen3_folder / "tokenizer.json"))
    text = (f"{p.PREFIX}<Instruct>: {p.DEFAULT_INSTRUCTION}\n<Query>: {query}\n"
            f"<Document>: {document}{p.SUFFIX}")  # fmt: skip
    assert list(pair) == whole.encode(text, add_special_tokens=False).ids
    assert not pair.truncated


def test_the_yes_no_prompt_cuts_the_document_then_the_query_keeping_the_template(qwen3_folder):
    from tokenizers import Tokenizer

    from mlx_stack.embeddings.model.yesnoprompt import SUFFIX, PromptTokenizer

    tokenizer = PromptTokenizer(qwen3_folder, 160)
    decode = Tokenizer.from_file(str(qwen3_folder / "tokenizer.json")).decode
    long_doc, long_query = " ".join(["word"] * 300), " ".join(["query"] * 300)
    (cut,) = tokenizer.encode_pairs("capital of france?", [long_doc])
    assert len(cut) == 160 and cut.truncated and cut.full_length > 300
    text = decode(cut, skip_special_tokens=False)
    assert "<Query>: capital of france?\n<Document>: word word" in text
    assert text.endswith(SUFFIX)
    (both,) = tokenizer.encode_pairs(long_query, [long_doc])
    text = decode(both, skip_special_tokens=False)
    assert len(both) == 160 and "query\n<Document>: word" in text and text.endswith(SUFFIX)
    (capped,) = tokenizer.encode_pairs("q", ["a b c d e f"], max_document_tokens=2)
    assert capped.truncated and "<Document>: a b<|im_end|>" in decode(capped, False)


def test_a_causal_lm_is_a_yes_no_reranker_only_when_asked(qwen3_folder, tmp_path):
    import json
    import shutil

    from mlx_stack.embeddings.model.settings import Overrides

    assert resolve(qwen3_folder).task == "embed"  # Qwen3-Embedding folders look the same
    settings = resolve(qwen3_folder, Overrides(task="rerank"))
    assert (settings.task, settings.scorer) == ("rerank", "yes_no")
    other = tmp_path / "no-answers"
    shutil.copytree(qwen3_folder, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = {k: v for k, v in tokenizer["model"]["vocab"].items()
                                   if k not in ("yes", "no")}  # fmt: skip
    tokenizer["model"]["merges"] = []
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ModelFolderError, match="no token 'yes', 'no'"):
        resolve(other, Overrides(task="rerank"))
