"""Tiny random-weight rerankers of the newer families, drawn through transformers' classes.

Why: no reranker weights reach this machine, and these families' checkpoint names are best
taken from transformers itself. Two builders, each a folder the reference loads as it would
the real model:

- :func:`modernbert_reranker`: ``ModernBertForSequenceClassification`` (gte-reranker-modernbert),
  one label, local-attention windows shorter than the test pairs, with the MiniLM WordPiece
  tokenizer and ModernBERT's inputs (no token types). ``pooling`` is ``classifier_pooling``.
- :func:`qwen3_reranker`: ``Qwen3ForCausalLM`` (Qwen3-Reranker) with tied embeddings and a
  byte-level BPE built here with Qwen's pre-tokeniser, its chat tokens, ``<think>`` and
  single-token "yes" and "no".

Built with torch (through :func:`tinyembed.write_random_model`): import in the pytest process
or a fresh interpreter without MLX.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinyembed import _CORPUS, SEED, WIDTH, copy_minilm_tokenizer, write_random_model

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
"""Qwen2/3's pre-tokeniser split (from its tokenizer.json): punctuation keeps a following
newline (``?\\n`` is one piece), which a GPT-2 split would not."""
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_PROMPT_TEXT = [
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".',
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query",
    "<Query>: <Document>: system user assistant yes no yes no yes no",
]


def modernbert_reranker(folder: Path, pooling: str = "mean", seed: int = SEED) -> Path:
    """A ModernBERT cross-encoder: 3 layers (global, local, local; window 8)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = copy_minilm_tokenizer(folder)
    _plain_tokenizer(folder, model_input_names=["input_ids", "attention_mask"])
    write_random_model(folder, {
        "architectures": ["ModernBertForSequenceClassification"],
        "model_type": "modernbert",
        "vocab_size": vocab,
        "hidden_size": WIDTH,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "hidden_activation": "gelu",
        "max_position_embeddings": 512,
        "global_attn_every_n_layers": 3,
        "local_attention": 8,
        "global_rope_theta": 160000.0,
        "local_rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "norm_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "pad_token_id": 0,
        "bos_token_id": 101,
        "eos_token_id": 102,
        "cls_token_id": 101,
        "sep_token_id": 102,
        "classifier_pooling": pooling,
        "classifier_activation": "gelu",
        "classifier_bias": pooling == "cls",  # both forms of the head's dense layer
        "classifier_dropout": 0.0,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "tie_word_embeddings": True,
    }, seed=seed, auto="AutoModelForSequenceClassification")  # fmt: skip
    return folder


def qwen3_reranker(folder: Path, seed: int = SEED) -> Path:
    """A Qwen3 causal LM in Qwen3-Reranker's folder form (tied embeddings, no lm_head.weight)."""
    from safetensors.numpy import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _qwen_tokenizer(folder)
    write_random_model(folder, {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab,
        "hidden_size": WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 2,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }, seed=seed, auto="AutoModelForCausalLM")  # fmt: skip
    weights = load_file(str(folder / "model.safetensors"))
    weights.pop("lm_head.weight", None)  # tied: the hub's checkpoint has none either
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def qwen3_reranker_tokenizer(folder: Path) -> Path:
    """Only the tokenizer and config.json of :func:`qwen3_reranker` (no torch, no weights):
    enough for settings and tokenizer tests."""
    folder.mkdir(parents=True, exist_ok=True)
    _qwen_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": WIDTH,
        "max_position_embeddings": 40960}))  # fmt: skip
    return folder


def _plain_tokenizer(folder: Path, **config: Any) -> None:
    """No fixed padding or truncation in tokenizer.json (MiniLM's pads to 128)."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["padding"] = None
    tokenizer["truncation"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update({"model_max_length": 512, **config})
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def _qwen_tokenizer(folder: Path) -> int:
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=list(QWEN_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator([*_CORPUS, *_PROMPT_TEXT] * 3, trainer=trainer)
    for answer in ("yes", "no"):
        assert tokenizer.token_to_id(answer) is not None, f"no single {answer!r} token"
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "padding_side": "left",
        "model_max_length": 512,
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
    }, indent=1))  # fmt: skip
    return int(tokenizer.get_vocab_size())


if __name__ == "__main__":
    import sys

    builders = {"modernbert": modernbert_reranker, "qwen3": qwen3_reranker}
    print(builders[sys.argv[2]](Path(sys.argv[1])))
