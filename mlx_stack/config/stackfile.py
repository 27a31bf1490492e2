"""The stack file (``stack.yaml``): what to run. Parsed and validated once, into frozen objects.

Validation happens before anything starts: a bad stack file starts nothing and changes nothing.
Every problem is reported at once with ``file:line`` and the field path.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlx_stack.config import external as _external
from mlx_stack.config.catalog import Catalog, ChatModel, EmbeddingModel, RerankModel
from mlx_stack.config.external import (
    EXTERNAL_BACKENDS,
    ExternalTier,
    forms_problem,
    is_external,
    read_external,
    render_external,
)

# REMOTE_FIELDS is re-exported: the reference (gen_docs.py) documents each section from here.
from mlx_stack.config.remotes import REMOTE_FIELDS as REMOTE_FIELDS
from mlx_stack.config.remotes import Remote, read_remotes, self_reference_problem
from mlx_stack.config.schema import Field, Problems, close_matches, fields_of, read_mapping
from mlx_stack.config.settings import ProxySettings, WatchSettings
from mlx_stack.config.yamlfile import YamlDoc, load_yaml, parse_yaml
from mlx_stack.errors import CatalogError, ConfigError
from mlx_stack.loopback import normal_origin

CHAT_BACKENDS = ("mlx-lm", "vllm-mlx")
EMBED_BACKENDS = ("mlx-embed",)
RESERVED_NAMES = ("embeddings", "rerank", "proxy", "local-embed", "local-rerank")
EMBEDDINGS_MODEL_NAME = "local-embed"
#: The rerank tier's model name at the proxy (and an alias on its own port).
RERANK_MODEL_NAME = "local-rerank"
RERANK_PORT = 8004
_TIER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
#: Service names of replicas (``embeddings-2``, ``rerank-3``...): no chat tier may take one.
_REPLICA_NAME = re.compile(r"^(embeddings|rerank)-[0-9]+$")
MAX_REPLICAS = 16
REPLICAS_FIELD = Field(
    "replicas", (int,), f"identical servers on consecutive ports from `port` (1-{MAX_REPLICAS}), "
    "one model name at the proxy, balanced, replaced one at a time", 1)

TIER_FIELDS = [
    Field("model", (str,), "catalog name of a chat model (`mlx-stack models --type chat`)"),
    Field("quant", (str, type(None)), "quantisation id; default: the model's first", None),
    Field("port", (int,), "port on 127.0.0.1 the model server listens on"),
    Field("backend", (str,), "mlx-lm (macOS and Linux) or vllm-mlx (macOS)", "mlx-lm"),
]
EMBEDDINGS_FIELDS = [
    Field(
        "model", (str,), "catalog name of an embedding model (`mlx-stack models --type embedding`)"
    ),
    Field("quant", (str, type(None)), "quantisation id; default: the model's first", None),
    Field("port", (int,), "port on 127.0.0.1 the embeddings server listens on", 8003),
    Field("backend", (str,), "mlx-embed (the project's own embeddings server)", "mlx-embed"),
    REPLICAS_FIELD,
]
RERANK_FIELDS = [
    Field("model", (str,), "catalog name of a reranker (`mlx-stack models --type rerank`)"),
    Field("quant", (str, type(None)), "quantisation id; default: the model's first", None),
    Field("port", (int,), "port on 127.0.0.1 the rerank server listens on", RERANK_PORT),
    REPLICAS_FIELD,
]
#: A chat tier or the embeddings tier served by an external server (``config/external.py``).
EXTERNAL_TIER_FIELDS = [
    Field("model", (str, type(None)), "with backend: ollama, the Ollama model name", None),
    Field("quant", (str, type(None)), "not for external servers", None),
    Field("port", (int, type(None)), "port on 127.0.0.1 a command: server listens on", None),
    Field("backend", (str,), f"{' or '.join(EXTERNAL_BACKENDS)}", "openai"),
    *_external.EXTERNAL_FIELDS,
]
AUTH_FIELDS = fields_of(ProxySettings, ["key_file"])
PROXY_FIELDS = [
    *fields_of(ProxySettings, ["host", "port"]),
    Field("auth", (dict,), "how clients authenticate: a master key in key_file", {}),
    *fields_of(ProxySettings, ["timeout_s", "num_retries", "cors_origins"]),
    Field("tls", (dict, type(None)), "serve HTTPS: {cert_file, key_file} (PEM; relative to the "
          "state folder); see docs/security.md", None),
]
TLS_FIELDS = [
    Field("cert_file", (str,), "the certificate (PEM), chain included"),
    Field("key_file", (str,), "its private key (PEM, mode 0600)"),
]
WATCHDOG_FIELDS = fields_of(WatchSettings)
STACK_FIELDS = [
    Field("version", (int,), "stack file format version", 1),
    Field("tiers", (dict, type(None)), "chat tiers by name (standard, fast, ...)", {}),
    Field("embeddings", (dict, type(None)), "the optional embeddings tier", None),
    Field("rerank", (dict, type(None)), "the optional rerank tier (a cross-encoder)", None),
    Field("proxy", (dict, type(None)), "the LiteLLM proxy in front of all tiers", {}),
    Field("watchdog", (dict, type(None)), "health probes, restarts and log rotation", {}),
    Field("remotes", (dict, type(None)), "other machines' mlx-stack proxies whose models join "
          "this proxy (docs/scale-out.md)", None),
]


@dataclass(frozen=True)
class ChatTier:
    name: str
    model: ChatModel
    quant: str
    port: int
    backend: str

    @property
    def replica_names(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,)


class _Replicated:
    """A tier of N identical servers on consecutive ports (``replicas``)."""

    name: str
    port: int
    replicas: int

    @property
    def replica_names(self) -> tuple[str, ...]:
        return replica_names(self.name, self.replicas)

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(range(self.port, self.port + self.replicas))


@dataclass(frozen=True)
class EmbeddingsTier(_Replicated):
    model: EmbeddingModel
    quant: str
    port: int
    backend: str
    name: str = "embeddings"
    replicas: int = 1


@dataclass(frozen=True)
class RerankTier(_Replicated):
    """The rerank server: the embeddings server's program in rerank mode, on its own port."""

    model: RerankModel
    quant: str
    port: int
    name: str = "rerank"
    replicas: int = 1


@dataclass(frozen=True)
class Stack:
    tiers: tuple[ChatTier, ...]
    embeddings: EmbeddingsTier | None
    proxy: ProxySettings = field(default_factory=ProxySettings)
    path: Path | None = None
    watchdog: WatchSettings = field(default_factory=WatchSettings)
    rerank: RerankTier | None = None
    remotes: tuple[Remote, ...] = ()
    #: Chat tiers and the embeddings tier served by external servers (``external.py``).
    external: tuple[ExternalTier, ...] = ()

    @property
    def chat_names(self) -> tuple[str, ...]:
        """Every chat tier's name: the model tiers, then the external ones."""
        return (*(t.name for t in self.tiers),
                *(t.name for t in self.external if t.kind == "chat"))

    @property
    def external_embeddings(self) -> ExternalTier | None:
        return next((t for t in self.external if t.kind == "embeddings"), None)

    def tier(self, name: str) -> ChatTier:
        for t in self.tiers:
            if t.name == name:
                return t
        names = [t.name for t in self.tiers]
        raise ConfigError(
            self.path or "stack",
            [
                f"no tier named {name!r}{close_matches(name, names)}; "
                f"tiers: {', '.join(names) or 'none'}"
            ],
        )

    @property
    def model_servers(self) -> tuple[ChatTier | EmbeddingsTier | RerankTier, ...]:
        """Every model server the file names, in start order: chat tiers, embeddings, rerank."""
        extra = tuple(t for t in (self.embeddings, self.rerank) if t is not None)
        return (*self.tiers, *extra)

    def with_embeddings(self, emb: EmbeddingsTier | None) -> Stack:
        return replace(self, embeddings=emb)

    def with_rerank(self, rerank: RerankTier | None) -> Stack:
        return replace(self, rerank=rerank)


def replica_names(tier: str, replicas: int) -> tuple[str, ...]:
    """The supervised services of a tier with replicas: the first keeps the tier's own name (so
    commands, logs and scripts written for one server still work), then ``tier-2``, ..."""
    return (tier, *(f"{tier}-{i}" for i in range(2, replicas + 1)))


def _read_replicas(d: dict, path: str, problems: Problems) -> int:
    """``replicas``: 1-16, and the last replica's port still a port."""
    n = d["replicas"]
    if not 1 <= n <= MAX_REPLICAS:
        problems.add(f"{path}.replicas", f"must be between 1 and {MAX_REPLICAS}, got {n}")
        return 1
    if d["port"] + n - 1 > 65535:
        problems.add(f"{path}.replicas", f"{n} replicas from port {d['port']} need ports up to "
                     f"{d['port'] + n - 1}, beyond 65535: lower the port")
        return 1
    return int(n)


def _check_port(value: int, path: str, problems: Problems) -> None:
    if not 1024 <= value <= 65535:
        problems.add(path, f"port {value} is out of range: use 1024-65535")


def _resolve_quant(
    model_name: str, quant: str | None, catalog: Catalog, path: str, problems: Problems
) -> str | None:
    try:
        return catalog.get(model_name).quant(quant).id
    except CatalogError as exc:
        problems.add(path, str(exc))
        return None


def _read_external(body: dict, name: str, kind: str, path: str,
                   problems: Problems) -> ExternalTier | None:
    """A ``command:``/``url:`` (or ``backend: ollama``) tier, checked against its own fields."""
    d = read_mapping(body, path, EXTERNAL_TIER_FIELDS, problems)
    if d is None:
        return None
    if d["port"] is not None:
        _check_port(d["port"], f"{path}.port", problems)
    problem = forms_problem(body)
    if problem:
        problems.add(path, problem)
        return None
    return read_external(d, body, name, kind, path, problems)


def _read_tiers(raw: dict, catalog: Catalog, system: str, problems: Problems,
                external: list[ExternalTier] | None = None) -> list[ChatTier]:
    tiers: list[ChatTier] = []
    for name, body in raw.items():
        path = f"tiers.{name}"
        if not isinstance(name, str) or not _TIER_NAME.match(name):
            problems.add(path, f"tier name {name!r} must be lower case letters, digits, - or _")
            continue
        if name in RESERVED_NAMES or _REPLICA_NAME.match(name):
            problems.add(path, f"{name!r} is reserved; choose another tier name")
            continue
        if is_external(body):
            ext = _read_external(body, name, "chat", path, problems)
            if ext is not None and external is not None:
                external.append(ext)
            continue
        d = read_mapping(body, path, TIER_FIELDS, problems)
        if d is None:
            continue
        _check_port(d["port"], f"{path}.port", problems)
        if d["backend"] not in CHAT_BACKENDS:
            problems.add(
                f"{path}.backend",
                f"unknown backend {d['backend']!r}"
                f"{close_matches(d['backend'], CHAT_BACKENDS)}; use {' or '.join(CHAT_BACKENDS)}",
            )
            continue
        if d["backend"] == "vllm-mlx" and system != "Darwin":
            problems.add(f"{path}.backend", "vllm-mlx runs on macOS only; use backend: mlx-lm here")
            continue
        try:
            model = catalog.chat(d["model"])
        except CatalogError as exc:
            problems.add(f"{path}.model", str(exc))
            continue
        quant = _resolve_quant(model.name, d["quant"], catalog, f"{path}.quant", problems)
        if quant is not None:
            tiers.append(ChatTier(name, model, quant, d["port"], d["backend"]))
    return tiers


def _read_embeddings(raw: dict, catalog: Catalog, problems: Problems,
                     external: list[ExternalTier] | None = None) -> EmbeddingsTier | None:
    if is_external(raw):
        ext = _read_external(raw, "embeddings", "embeddings", "embeddings", problems)
        if ext is not None and external is not None:
            external.append(ext)
        return None
    d = read_mapping(raw, "embeddings", EMBEDDINGS_FIELDS, problems)
    if d is None:
        return None
    _check_port(d["port"], "embeddings.port", problems)
    if d["backend"] not in EMBED_BACKENDS:
        problems.add("embeddings.backend", f"unknown backend {d['backend']!r}; use mlx-embed")
        return None
    try:
        model = catalog.embedding(d["model"])
    except CatalogError as exc:
        problems.add("embeddings.model", str(exc))
        return None
    quant = _resolve_quant(model.name, d["quant"], catalog, "embeddings.quant", problems)
    if quant is None:
        return None
    replicas = _read_replicas(d, "embeddings", problems)
    return EmbeddingsTier(model, quant, d["port"], d["backend"], replicas=replicas)


def _read_rerank(raw: dict, catalog: Catalog, problems: Problems) -> RerankTier | None:
    d = read_mapping(raw, "rerank", RERANK_FIELDS, problems)
    if d is None:
        return None
    _check_port(d["port"], "rerank.port", problems)
    replicas = _read_replicas(d, "rerank", problems)
    try:
        model = catalog.rerank(d["model"])
    except CatalogError as exc:
        problems.add("rerank.model", str(exc))
        return None
    quant = _resolve_quant(model.name, d["quant"], catalog, "rerank.quant", problems)
    return None if quant is None else RerankTier(model, quant, d["port"], replicas=replicas)


def _read_proxy(raw: dict, problems: Problems) -> ProxySettings:
    d = read_mapping(raw, "proxy", PROXY_FIELDS, problems)
    if d is None:
        return ProxySettings()
    auth = read_mapping(d["auth"], "proxy.auth", AUTH_FIELDS, problems) or {
        "key_file": ProxySettings().key_file}
    _check_port(d["port"], "proxy.port", problems)
    key_problem = _key_file_problem(auth["key_file"])
    if key_problem:
        problems.add("proxy.auth.key_file", key_problem)
    try:
        ipaddress.ip_address(d["host"])
    except ValueError:
        problems.add("proxy.host", f"{d['host']!r} is not an IP address (e.g. 127.0.0.1)")
    if d["timeout_s"] <= 0:
        problems.add("proxy.timeout_s", "must be > 0")
    if not 0 <= d["num_retries"] <= 10:
        problems.add("proxy.num_retries", "must be between 0 and 10")
    origins = _read_origins(d["cors_origins"], problems)
    tls = read_mapping(d["tls"], "proxy.tls", TLS_FIELDS, problems) if d["tls"] else None
    for key in ("cert_file", "key_file") if tls else ():
        problem = _key_file_problem(tls[key])  # type: ignore[index]
        if problem:
            problems.add(f"proxy.tls.{key}", problem)
    return ProxySettings(host=d["host"], port=d["port"], key_file=auth["key_file"],
                         timeout_s=float(d["timeout_s"]), num_retries=d["num_retries"],
                         cors_origins=origins,
                         tls_cert_file=tls["cert_file"] if tls else "",
                         tls_key_file=tls["key_file"] if tls else "")


def _key_file_problem(name: str) -> str | None:
    """What makes ``proxy.auth.key_file`` unusable as a path, or None: caught here, with its
    line, rather than as a crash when the plan opens the key."""
    if not name.strip() or "\0" in name:
        return f"{name!r} is not a file name; e.g. proxy.key"
    try:
        Path(name).expanduser()
    except RuntimeError:
        return f"{name!r}: no such user's home folder on this machine"
    return None


def _read_origins(raw: list, problems: Problems) -> tuple[str, ...]:
    """``proxy.cors_origins``: each a browser origin; ``*`` and ``null`` are refused."""
    out: list[str] = []
    for i, entry in enumerate(raw):
        where = f"proxy.cors_origins[{i}]"
        origin = normal_origin(entry.strip().rstrip("/")) if isinstance(entry, str) else None
        if isinstance(entry, str) and entry.strip() in ("*", "null"):
            problems.add(where, f"{entry.strip()!r} would let any web page you open use the "
                         "proxy; list the origins you trust, e.g. http://localhost:3000")
        elif origin is None:
            problems.add(where, f"{entry!r} is not an origin (scheme://host[:port], no path), "
                         "e.g. http://localhost:3000")
        else:
            out.append(origin)
    return tuple(out)


def _read_watchdog(raw: dict, problems: Problems) -> WatchSettings:
    d = read_mapping(raw, "watchdog", WATCHDOG_FIELDS, problems)
    if d is None:
        return WatchSettings()
    for key, value in d.items():
        if value <= 0 and key != "log_backups":
            problems.add(f"watchdog.{key}", f"must be > 0, got {value}")
    if d["log_backups"] < 0:
        problems.add("watchdog.log_backups", "must be >= 0")
    return WatchSettings(**{k: float(v) if isinstance(v, int) and k.endswith(("_s", "_mb"))
                            else v for k, v in d.items()})


def parse_stack(doc: YamlDoc, catalog: Catalog, system: str) -> Stack:
    """Validate a parsed stack file against the catalog; raise ConfigError with every problem."""
    problems = Problems(doc)
    data = {} if doc.data is None else doc.data
    top = read_mapping(data, "", STACK_FIELDS, problems)
    if top is None:
        raise ConfigError(doc.path, problems.items)
    if top["version"] != 1:
        problems.add("version", f"unsupported version {top['version']}; this mlx-stack reads 1")
    external: list[ExternalTier] = []
    tiers = _read_tiers(top["tiers"] or {}, catalog, system, problems, external)
    emb = (_read_embeddings(top["embeddings"], catalog, problems, external)
           if top["embeddings"] else None)
    rerank = _read_rerank(top["rerank"], catalog, problems) if top["rerank"] else None
    proxy = _read_proxy(top["proxy"] or {}, problems)
    watchdog = _read_watchdog(top["watchdog"] or {}, problems)
    local_kinds = {**{t.name: "chat" for t in tiers},
                   **{t.name: "chat" for t in external if t.kind == "chat"},
                   **({EMBEDDINGS_MODEL_NAME: "embedding"}
                      if emb or any(t.kind == "embeddings" for t in external) else {}),
                   **({RERANK_MODEL_NAME: "rerank"} if rerank else {})}
    remotes = read_remotes(top["remotes"], problems, local_kinds)
    for r in remotes:
        loop = self_reference_problem(r, proxy.host, proxy.port)
        if loop:
            problems.add(f"remotes.{r.name}.url", loop)
    ports: dict[int, str] = {}
    for name, port, path in [
        *((t.name, t.port, f"tiers.{t.name}.port") for t in tiers),
        *_replica_ports(emb, "embeddings"),
        *_replica_ports(rerank, "rerank"),
        *((t.name, t.port, f"tiers.{t.name}.port" if t.kind == "chat" else "embeddings.port")
          for t in external if t.port is not None),
        ("proxy", proxy.port, "proxy.port"),
    ]:
        if port in ports:
            note = (" (replicas take consecutive ports from their section's port)"
                    if any(_REPLICA_NAME.match(n) for n in (name, ports[port])) else "")
            problems.add(path, f"port {port} is used by both {ports[port]!r} and {name!r}{note}")
        ports.setdefault(port, name)
    if problems:
        raise ConfigError(doc.path, problems.items)
    return Stack(tuple(tiers), emb, proxy, doc.path, watchdog, rerank, remotes=remotes,
                 external=tuple(external))


def _replica_ports(tier: EmbeddingsTier | RerankTier | None,
                   section: str) -> list[tuple[str, int, str]]:
    """(service, port, field) of each replica, for the port overlap check."""
    if tier is None:
        return []
    where = f"{section}.port" if tier.replicas == 1 else f"{section}.replicas"
    return [(name, port, where) for name, port in zip(tier.replica_names, tier.ports, strict=True)]


def load_stack(path: Path, catalog: Catalog, system: str) -> Stack:
    if not path.exists():
        raise ConfigError(path, [f"{path}: no stack file; run `mlx-stack init` to create one"])
    return parse_stack(load_yaml(path), catalog, system)


def parse_stack_text(text: str, path: Path, catalog: Catalog, system: str) -> Stack:
    return parse_stack(parse_yaml(text, path), catalog, system)


def _q(text: str) -> str:
    """A YAML scalar that stays a string."""
    return (
        text
        if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", text)
        and text not in ("yes", "no", "true", "false", "null", "on", "off")
        else f'"{text}"'
    )


def render_embeddings(emb: EmbeddingsTier) -> str:
    return (
        "# The embeddings tier: the project's own OpenAI-compatible server, served through the\n"
        "# proxy as model 'local-embed'.\n"
        "embeddings:\n"
        f"  model: {_q(emb.model.name)}  # {emb.model.dimensions} dimensions\n"
        f"  quant: {_q(emb.quant)}\n"
        f"  port: {emb.port}\n"
        f"  backend: {emb.backend}\n"
        + (f"  replicas: {emb.replicas}\n" if emb.replicas != 1 else "")
    )


def render_rerank(rerank: RerankTier) -> str:
    return (
        "# The rerank tier: a cross-encoder on the project's server in rerank mode, served\n"
        f"# through the proxy as model '{RERANK_MODEL_NAME}' (POST /v1/rerank, Cohere's API).\n"
        "rerank:\n"
        f"  model: {_q(rerank.model.name)}  # up to {rerank.model.max_sequence_length} tokens\n"
        f"  quant: {_q(rerank.quant)}\n"
        f"  port: {rerank.port}\n"
        + (f"  replicas: {rerank.replicas}\n" if rerank.replicas != 1 else "")
    )


def render_watchdog(w: WatchSettings) -> str:
    """The ``watchdog:`` section with the settings that differ from the defaults ('' if none)."""
    default = WatchSettings()
    lines = []
    for f in WATCHDOG_FIELDS:
        value, base = getattr(w, f.name), getattr(default, f.name)
        if value != base:
            lines.append(f"  {f.name}: {value:g}\n")
    return "watchdog:\n" + "".join(lines) if lines else ""


def render_stack(stack: Stack, header: str = "", hints: list[str] | None = None) -> str:
    """The stack file as YAML text with comments, as ``init`` writes it."""
    out = ["# mlx-stack stack file: see stack.example.yaml for every key.\n"]
    if header:
        out.append(f"# {header}\n")
    out.append(
        "version: 1\n\n# Chat tiers: each is a model server on 127.0.0.1, a model in the proxy.\n"
    )
    if stack.tiers:
        out.append("tiers:\n")
        for t in stack.tiers:
            out.append(
                f"  {t.name}:\n    model: {_q(t.model.name)}\n    quant: {_q(t.quant)}\n"
                f"    port: {t.port}\n    backend: {t.backend}\n"
            )
    external_chat = [t for t in stack.external if t.kind == "chat"]
    if external_chat and not stack.tiers:
        out.append("tiers:\n")
    for x in external_chat:
        out.append(f"  {x.name}:\n" + render_external(x, "    "))
    if not stack.tiers and not external_chat:
        out.append("tiers: {}\n")
    for hint in hints or []:
        out.append(f"# {hint}\n")
    out.append("\n")
    if stack.embeddings is not None:
        out.append(render_embeddings(stack.embeddings) + "\n")
    elif stack.external_embeddings is not None:
        out.append("# The embeddings tier: an external server, served through the proxy as "
                   "'local-embed'.\nembeddings:\n"
                   + render_external(stack.external_embeddings, "  ") + "\n")
    if stack.rerank is not None:
        out.append(render_rerank(stack.rerank) + "\n")
    p = stack.proxy
    out.append(
        "# The LiteLLM proxy: one OpenAI-compatible endpoint for every tier.\n"
        "proxy:\n"
        f"  host: {p.host}\n"
        f"  port: {p.port}\n"
        "  auth:\n"
        f"    key_file: {_q(p.key_file)}  # `mlx-stack key` shows the key\n"
        f"  timeout_s: {p.timeout_s:g}\n"
        f"  num_retries: {p.num_retries}\n"
    )
    if p.cors_origins:
        out.append(f"  cors_origins: {json.dumps(list(p.cors_origins))}\n")
    watchdog = render_watchdog(stack.watchdog)
    if watchdog:
        out.append("\n# The watchdog: probes, restarts, log rotation (see stack.example.yaml).\n")
        out.append(watchdog)
    return "".join(out)
