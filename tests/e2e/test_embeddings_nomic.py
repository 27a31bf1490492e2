"""Our MLX ``nomic_bert`` against an independent implementation, on tiny random weights.

No hub here, so no real nomic-embed-text weights: a 2-layer, 64-wide NomicBERT is built with
random weights saved under nomic's own checkpoint names and config keys (``n_embd``, ...,
``encoder.layers.N.attn.Wqkv``), next to MiniLM's tokenizer (the same bert-base-uncased
vocabulary nomic uses). The reference is transformers' native ``NomicBertModel`` (torch, CPU),
loading the *same* safetensors file through transformers' own conversion of nomic's names,
so weight naming, rotary embeddings, SwiGLU, post-norm and pooling are all checked by code
we did not write. Served through the real server, with our fast CPU kernels and without.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
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

WIDTH, LAYERS, HEADS, INNER, VOCAB = 64, 2, 4, 256, 30528
TRAINED = 16
"""``max_trained_positions`` of the dynamic-NTK variant: texts longer than this rescale."""


def nomic_config(**extra: object) -> dict[str, object]:
    """nomic-embed-text-v1.5's config.json, shrunk (same keys, same flags)."""
    return {
        "model_type": "nomic_bert",
        "architectures": ["NomicBertModel"],
        "activation_function": "swiglu",
        "n_embd": WIDTH,
        "n_head": HEADS,
        "n_layer": LAYERS,
        "n_inner": INNER,
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


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Large enough values that every component (norms, rotary, gating) matters."""
    rng = np.random.default_rng(seed)
    weights = {
        "embeddings.word_embeddings.weight": rng.normal(0, 0.5, (VOCAB, WIDTH)),
        "embeddings.token_type_embeddings.weight": rng.normal(0, 0.5, (2, WIDTH)),
        "emb_ln.weight": 1 + rng.normal(0, 0.1, WIDTH),
        "emb_ln.bias": rng.normal(0, 0.1, WIDTH),
    }
    for layer in range(LAYERS):
        p = f"encoder.layers.{layer}."
        weights[p + "attn.Wqkv.weight"] = rng.normal(0, 0.2, (3 * WIDTH, WIDTH))
        weights[p + "attn.out_proj.weight"] = rng.normal(0, 0.2, (WIDTH, WIDTH))
        weights[p + "mlp.fc11.weight"] = rng.normal(0, 0.2, (INNER, WIDTH))
        weights[p + "mlp.fc12.weight"] = rng.normal(0, 0.2, (INNER, WIDTH))
        weights[p + "mlp.fc2.weight"] = rng.normal(0, 0.1, (WIDTH, INNER))
        for norm in ("norm1", "norm2"):
            weights[p + norm + ".weight"] = 1 + rng.normal(0, 0.1, WIDTH)
            weights[p + norm + ".bias"] = rng.normal(0, 0.1, WIDTH)
    return {key: value.astype(np.float32) for key, value in weights.items()}


def write_folders(root: Path, scaling: float | None) -> tuple[Path, Path]:
    """(our folder in nomic's format, transformers' folder sharing the weights file)."""
    from safetensors.numpy import save_file

    ours, theirs = root / "nomic", root / "transformers"
    ours.mkdir()
    theirs.mkdir()
    save_file(random_weights(), str(ours / "model.safetensors"))
    extra = {"rotary_scaling_factor": scaling, "max_trained_positions": TRAINED} if scaling else {}
    (ours / "config.json").write_text(json.dumps(nomic_config(**extra)))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, ours / name)
    (ours / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (ours / "1_Pooling").mkdir()
    (ours / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": WIDTH, "pooling_mode_mean_tokens": True})
    )
    (ours / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "search_query: ", "document": "search_document: "}})
    )
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": 1000.0}
    if scaling:  # transformers takes max_position_embeddings as the trained length
        rope = {"rope_type": "dynamic", "rope_theta": 1000.0, "factor": scaling}
    (theirs / "config.json").write_text(
        json.dumps(
            {
                "model_type": "nomic_bert",
                "architectures": ["NomicBertModel"],
                "vocab_size": VOCAB,
                "hidden_size": WIDTH,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS,
                "intermediate_size": INNER,
                "hidden_act": "silu",
                "max_position_embeddings": TRAINED if scaling else 2048,
                "layer_norm_eps": 1e-12,
                "type_vocab_size": 2,
                "rope_parameters": rope,
            }
        )
    )
    (theirs / "model.safetensors").symlink_to(ours / "model.safetensors")
    return ours, theirs


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


@pytest.fixture(scope="module", params=["fast-kernels", "exact-kernels"])
def nomic_server(
    request: pytest.FixtureRequest,
    folders: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    extra = ["--exact-kernels"] if request.param == "exact-kernels" else []
    log = tmp_path_factory.mktemp("nomic-server") / "server.log"
    with running_server(log, *extra, model=folders[0], name="nomic") as server:
        yield server


TEXTS = [t for t in MIXED_TEXTS if len(t) < 1000]  # keep it under the tiny model's positions


def test_nomic_matches_transformers_alone_and_batched(
    nomic_server: Server, reference: Reference
) -> None:
    expected = reference(TEXTS)
    with nomic_server.client() as http:
        batched = embed(http, TEXTS, model="nomic")
        alone = np.concatenate([embed(http, text, model="nomic") for text in TEXTS])
        card = http.get("/v1/models").json()["data"][0]
    assert card["architecture"] == "nomic_bert" and card["dimensions"] == WIDTH
    assert card["pooling"] == "mean" and card["normalize"] is True
    assert float(cosines(batched, expected).min()) >= 0.9999
    assert float(cosines(alone, expected).min()) >= 0.9999
    assert float(np.abs(batched - expected).max()) < 1e-4
    # random weights give far-apart vectors, so agreement above is not an accident
    assert float(cosines(expected[:1].repeat(len(TEXTS) - 1, 0), expected[1:]).max()) < 0.99


def test_nomic_prompts_come_from_the_folder(nomic_server: Server, reference: Reference) -> None:
    with nomic_server.client() as http:
        query = embed(http, "what is rotary embedding", model="nomic", input_type="query")
        document = embed(http, "rotary embedding", model="nomic", input_type="document")
    expected = reference(
        ["search_query: what is rotary embedding", "search_document: rotary embedding"]
    )
    assert float(cosines(np.concatenate([query, document]), expected).min()) >= 0.9999


def test_nomic_dynamic_ntk_rotary_scaling(tmp_path: Path) -> None:
    """rotary_scaling_factor grows the rotary base beyond max_trained_positions, as nomic's."""
    ours, theirs = write_folders(tmp_path, scaling=2.0)
    reference = Reference(theirs)
    texts = sorted(
        ["short text", " ".join(f"tok{i}" for i in range(12)), "word " * 40, "more words " * 30],
        key=len,
    )  # ascending: transformers' dynamic rotary cache only grows
    expected = reference(texts)
    log = tmp_path / "server.log"
    with running_server(log, model=ours, name="nomic") as server, server.client() as http:
        alone = np.concatenate([embed(http, text, model="nomic") for text in texts])
    assert float(cosines(alone, expected).min()) >= 0.9999
