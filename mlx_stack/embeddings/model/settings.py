"""Resolve how a model folder is served, before any MLX import.

Caller choices win; otherwise defaults come from the folder's sentence-transformers files
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``,
``config_sentence_transformers.json``), then from the architecture. Every mistake a user can
make with a folder is found here, so the CLI can refuse it in one line before binding a port.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlx_stack.errors import MlxStackError

from .architectures import (
    CROSS_ENCODER_ARCHITECTURES,
    HIDDEN_SIZE_KEYS,
    POOLINGS,
    POSITIONS_KEYS,
    YES_NO_ARCHITECTURES,
    Architecture,
    Pooling,
    UnsupportedArchitectureError,
    architecture_for,
    read_model_type,
)

_ST_POOLING_FLAGS: dict[str, Pooling | None] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": None,
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
}
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
_DENSE_MODULE = "sentence_transformers.models.Dense"


Task = Literal["embed", "rerank"]
TASKS: tuple[Task, ...] = ("embed", "rerank")
Scorer = Literal["cross_encoder", "yes_no"]
"""How a reranker scores a pair: a classifier head's logit, or an LLM's "yes" against "no"."""
YES_NO_TOKENS = ("yes", "no", "<|im_start|>", "<|im_end|>")
"""Tokens a yes/no reranker's vocabulary must have: the answers and its chat template's."""


class ModelFolderError(MlxStackError):
    """A model folder cannot be served as asked (missing, unsupported, contradictory options)."""

    exit_code = 2


@dataclass(frozen=True)
class Overrides:
    """What the operator asked for on the command line; ``None`` means "use the folder's"."""

    pooling: Pooling | None = None
    normalize: bool | None = None
    max_seq_len: int | None = None
    dimensions: tuple[int, ...] = ()
    query_prefix: str | None = None
    document_prefix: str | None = None
    task: Task | None = None


@dataclass(frozen=True)
class ModelSettings:
    """Everything needed to load and serve one folder; built only by :func:`resolve`."""

    path: Path
    architecture: Architecture
    dimension: int
    pooling: Pooling
    normalize: bool
    max_seq_len: int
    matryoshka_dimensions: tuple[int, ...]
    query_prefix: str
    document_prefix: str
    task: Task = "embed"
    """``rerank``: a cross-encoder scoring (query, document) pairs; pooling and the options
    after it do not apply."""
    scorer: Scorer = "cross_encoder"
    """For ``rerank``: read from config.json's ``architectures`` (see :func:`_check_reranker`)."""


def resolve(path: Path, overrides: Overrides | None = None) -> ModelSettings:
    """Check the folder and merge the operator's choices over its defaults."""
    over = overrides or Overrides()
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist or is not a folder")
    try:
        architecture = architecture_for(read_model_type(path))
    except UnsupportedArchitectureError as exc:
        raise ModelFolderError(f"{path}: {exc}") from None
    except ValueError as exc:
        raise ModelFolderError(str(exc)) from None
    for required in ("tokenizer.json",):
        if not (path / required).is_file():
            raise ModelFolderError(
                f"{path / required} not found: the server tokenises with the `tokenizers` "
                "library and needs the fast tokenizer file"
            )
    config = _read_json(path / "config.json", default={})
    task = over.task or _task(config)
    scorer: Scorer = "cross_encoder"
    if task == "rerank":
        scorer = _check_reranker(path, config, architecture)
        modules: Any = []  # a cross-encoder's folder may carry a bi-encoder's files too
    else:
        modules = _read_json(path / "modules.json", default=[])
    st_pooling, st_normalize = _sentence_transformers_pipeline(path, modules, architecture)
    pooling = over.pooling or st_pooling or architecture.default_pooling
    if pooling not in POOLINGS:
        raise ModelFolderError(f"pooling {pooling!r} unknown; use one of {', '.join(POOLINGS)}")
    normalize = over.normalize if over.normalize is not None else st_normalize
    dimension = _first_int(config, HIDDEN_SIZE_KEYS)
    if dimension is None:
        raise ModelFolderError(f"{path}/config.json has no positive integer hidden_size")
    limit = _max_positions(config, architecture)
    max_seq_len = _max_seq_len(path, limit, over.max_seq_len)
    prompts = _read_json(path / "config_sentence_transformers.json", default={}).get("prompts")
    prompts = prompts if isinstance(prompts, dict) else {}
    return ModelSettings(
        path=path,
        architecture=architecture,
        dimension=dimension,
        pooling=pooling,
        normalize=normalize,
        max_seq_len=max_seq_len,
        matryoshka_dimensions=_dimensions(over.dimensions, dimension),
        query_prefix=_prefix(over.query_prefix, prompts.get("query")),
        document_prefix=_prefix(over.document_prefix, prompts.get("document")),
        task=task,
        scorer=scorer,
    )


def _task(config: Any) -> Task:
    """A sequence classifier (``*ForSequenceClassification``) is a reranker; else an embedder."""
    names = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(names, list) and any(
        isinstance(n, str) and n.endswith("ForSequenceClassification") for n in names
    ):
        return "rerank"
    return "embed"


def _check_reranker(path: Path, config: Any, architecture: Architecture) -> Scorer:
    """The head named in config.json decides how pairs are scored: ``*ForSequenceClassification``
    is a cross-encoder (one label); ``*ForCausalLM`` can only score by its next token, so it is
    a yes/no reranker (Qwen3-Reranker), whose vocabulary must hold the answers and template."""
    names = config.get("architectures") if isinstance(config, dict) else None
    names = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    if any(n.endswith("ForCausalLM") for n in names):
        if architecture.model_type not in YES_NO_ARCHITECTURES:
            raise ModelFolderError(
                f"{path}: {architecture.model_type} causal LMs are not supported as yes/no "
                f"rerankers (supported: {', '.join(YES_NO_ARCHITECTURES)}); pick another model")
        _check_yes_no_tokens(path)
        return "yes_no"
    if architecture.model_type not in CROSS_ENCODER_ARCHITECTURES:
        raise ModelFolderError(
            f"{path}: {architecture.model_type} cross-encoders are not supported by the rerank "
            f"server (supported: {', '.join(CROSS_ENCODER_ARCHITECTURES)}; yes/no rerankers: "
            f"{', '.join(YES_NO_ARCHITECTURES)} *ForCausalLM); pick another model"
        )
    labels = config.get("id2label") if isinstance(config, dict) else None
    count = len(labels) if isinstance(labels, dict) else config.get("num_labels", 1)
    if count != 1:
        raise ModelFolderError(
            f"{path}/config.json: the classifier has {count} labels; a reranker gives one "
            "relevance score per pair (num_labels 1): this is not a reranker"
        )
    return "cross_encoder"


def _check_yes_no_tokens(path: Path) -> None:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # the library raises bare Exception subclasses for bad files
        raise ModelFolderError(f"{path}/tokenizer.json is unreadable: {exc}") from None
    missing = [t for t in YES_NO_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ModelFolderError(
            f"{path}/tokenizer.json has no token {', '.join(map(repr, missing))}: a yes/no "
            "reranker answers with single 'yes'/'no' tokens under a <|im_start|> chat template "
            "(Qwen3-Reranker's); this folder is not one"
        )


def _sentence_transformers_pipeline(
    path: Path, modules: Any, architecture: Architecture
) -> tuple[Pooling | None, bool]:
    """Pooling and normalisation declared by ``modules.json``; (None, True) when absent.

    Unit vectors are the default without that file because OpenAI's embeddings are unit-norm
    and cosine-similarity clients expect it.
    """
    if not isinstance(modules, list) or not modules:
        return None, True
    types = [m.get("type", "") for m in modules if isinstance(m, dict)]
    if any(t == _DENSE_MODULE for t in types) and not architecture.dense_after_pooling:
        raise ModelFolderError(
            f"{path}/modules.json has a Dense layer after pooling, which the embeddings server "
            f"cannot apply to a {architecture.model_type} model; pick another model"
        )
    pooling: Pooling | None = None
    for module in modules:
        if isinstance(module, dict) and module.get("type", "").endswith(".Pooling"):
            config = _read_json(path / str(module.get("path", "")) / "config.json", default={})
            pooling = _st_pooling(path, config)
    return pooling, _NORMALIZE_MODULE in types


def _st_pooling(path: Path, config: Any) -> Pooling | None:
    if not isinstance(config, dict):
        return None
    chosen = [flag for flag in _ST_POOLING_FLAGS if config.get(flag)]
    if not chosen:
        return None
    ours = _ST_POOLING_FLAGS[chosen[0]]
    if len(chosen) > 1 or ours is None:
        raise ModelFolderError(
            f"{path}: sentence-transformers pooling {', '.join(chosen)} is not supported; "
            f"pass --pooling {'|'.join(POOLINGS)} to choose one explicitly"
        )
    return ours


def _max_positions(config: dict[str, Any], architecture: Architecture) -> int | None:
    positions = _first_int(config, POSITIONS_KEYS)
    if positions is None:
        return None
    if architecture.model_type == "xlm_roberta":
        return positions - 2  # RoBERTa positions start after the padding index
    return positions


def _max_seq_len(path: Path, limit: int | None, requested: int | None) -> int:
    if requested is not None:
        if requested <= 0:
            raise ModelFolderError(f"--max-seq-len must be positive, got {requested}")
        if limit is not None and requested > limit:
            raise ModelFolderError(
                f"--max-seq-len {requested} exceeds the model's {limit} positions "
                f"({path}/config.json); use at most {limit}"
            )
        return requested
    candidates = [
        _read_json(path / "sentence_bert_config.json", default={}).get("max_seq_length"),
        _read_json(path / "tokenizer_config.json", default={}).get("model_max_length"),
    ]
    for value in candidates:
        if isinstance(value, int) and 0 < value < 1_000_000:  # HF uses 1e30 for "no limit"
            return min(value, limit) if limit else value
    return limit or 512


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _dimensions(values: tuple[int, ...], dimension: int) -> tuple[int, ...]:
    """Matryoshka sizes a request may ask for; the model's full size is always allowed."""
    bad = [v for v in values if not 0 < v <= dimension]
    if bad:
        raise ModelFolderError(
            f"--dimensions {','.join(map(str, bad))} outside 1..{dimension} (the model's size)"
        )
    return tuple(sorted(set(values), reverse=True))


def _prefix(chosen: str | None, from_folder: Any) -> str:
    if chosen is not None:
        return chosen
    return from_folder if isinstance(from_folder, str) else ""


def _read_json(file: Path, default: Any) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{file} is unreadable: {exc}") from None
