"""From the stack file to the services to run: command line, environment, port, probe.

The one plan builder: `up`, `status`, `doctor` and the supervisor all call :func:`load_plan`
(or :func:`build_plan` on a stack already read), so they agree on what a stack runs. Pure
apart from looking up where weights are on disk, so what `up` would run can be shown and
tested without starting anything.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlx_stack.backendkey import KEY_ENV as BACKEND_KEY_ENV
from mlx_stack.config.catalog import CatalogEntry, load_catalog
from mlx_stack.config.external import ExternalTier
from mlx_stack.config.modelfolder import weights_size
from mlx_stack.config.proxykey import ENV_VAR, KeyFileError, read_key, read_key_file
from mlx_stack.config.remotes import Remote, read_remote_key
from mlx_stack.config.settings import WatchSettings
from mlx_stack.config.sources import describe_missing, locate_first
from mlx_stack.config.stackfile import (
    EMBEDDINGS_MODEL_NAME,
    RERANK_MODEL_NAME,
    ChatTier,
    EmbeddingsTier,
    RerankTier,
    Stack,
    load_stack,
)
from mlx_stack.contract.addressing import aliases_of, groups_of
from mlx_stack.errors import ConfigError, ServiceStartError
from mlx_stack.litellm.config import (
    MLX_LM_DEFAULT_MODEL,
    PROXY_ENV,
    PROXY_UNSET_ENV,
    build_config,
    render_config,
    routes,
    shared_names,
)
from mlx_stack.litellm.gate import ROUTES_ENV, STATE_ENV, routes_to_env
from mlx_stack.litellm.identity import SOURCES_ENV, sources_to_env
from mlx_stack.litellm.remotes import REMOTES_FILE_ENV
from mlx_stack.litellm.webguard import ACCESS_ENV, WebAccess
from mlx_stack.paths import StatePaths
from mlx_stack.ports import connect_host


class ServiceKind(str, enum.Enum):
    CHAT = "chat"
    EMBEDDINGS = "embeddings"
    RERANK = "rerank"
    PROXY = "proxy"


class ProbeKind(str, enum.Enum):
    CHAT = "chat"  # a one-token chat completion
    EMBEDDING = "embedding"  # a one-text embedding
    RERANK = "rerank"  # a one-document rerank
    PROXY = "proxy"  # the proxy's readiness route (no upstream call)


@dataclass(frozen=True)
class Probe:
    """The real request that proves a service works (run by ``supervisor/probes.py``)."""

    kind: ProbeKind
    url: str  # base URL, e.g. http://127.0.0.1:8000
    model: str = MLX_LM_DEFAULT_MODEL
    #: The backend key to send (``Authorization: Bearer``); never shown, never compared.
    key: str | None = field(default=None, compare=False, repr=False)
    #: The liveness route, when not the kind's own (an external server's ``health:``).
    health: str = ""


@dataclass(frozen=True)
class ServiceSpec:
    """Everything needed to run one service; built by keyword (see the builders below)."""

    name: str
    kind: ServiceKind
    argv: tuple[str, ...]
    port: int
    host: str
    probe: Probe
    model: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: A file the service reads, written before it starts (the proxy's config): (path, text).
    config_file: tuple[Path, str] | None = None
    #: Environment that must never be logged or fingerprinted in clear (the proxy key).
    secret_env: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    #: Environment fixed for the supervisor's lifetime (the backend key): never logged, and not
    #: fingerprinted, so the CLI (which plans without it) computes the same fingerprints.
    session_env: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    #: Inherited variables the child must not see (they change its behaviour in harmful ways).
    unset_env: frozenset[str] = frozenset()
    #: Size of the weight files it loads: what `up` measures loading progress against.
    weights_bytes: int | None = None
    #: Seconds it may take to become ready, instead of the watchdog's start timeouts (an
    #: external server's ``ready_timeout_s``).
    ready_timeout_s: float | None = None
    #: The tier this service serves ("embeddings" for every embeddings replica; "" for a
    #: service that is its own tier): what `restart embeddings` replaces one at a time.
    group: str = ""

    @property
    def tier(self) -> str:
        return self.group or self.name

    @property
    def fingerprint(self) -> str:
        """Changes exactly when a restart is needed to apply a new definition.

        The Python that runs a child is the supervisor's, not the stack file's: a CLI started
        through another name of it (``python`` vs ``python3``) must not see a change."""
        h = hashlib.sha256()
        argv = ["<python>" if arg == sys.executable else arg for arg in self.argv]
        h.update(json.dumps([argv, sorted(self.env.items()), self.port, self.host]).encode())
        if self.config_file is not None:
            h.update(self.config_file[1].encode())
        if self.probe.health:  # an external server: its served name, health route and
            # deadline are not in its command line, and a new probe needs a new start
            h.update(json.dumps([self.probe.model, self.probe.health,
                                 self.ready_timeout_s]).encode())
        h.update(hashlib.sha256("".join(sorted(self.secret_env.values())).encode()).digest())
        return h.hexdigest()[:16]

    def full_env(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if k not in self.unset_env}
        return {**inherited, **self.env, **self.secret_env, **self.session_env}


@dataclass(frozen=True)
class Endpoint:
    """A ``url:`` tier: a server the stack only probes (no process); ``status`` asks it."""

    name: str
    kind: ServiceKind
    probe: Probe


@dataclass(frozen=True)
class RemoteTarget:
    """A remote proxy to probe (``supervisor/remotes.py``), with its key (never shown)."""

    remote: Remote
    key: str = field(compare=False, repr=False)


@dataclass(frozen=True)
class Plan:
    """Every service of a stack, in start order (model servers first, the proxy last).

    ``missing`` names the model servers that cannot start because their weights are not on
    this machine, with the command that fetches them.
    """

    model_servers: tuple[ServiceSpec, ...]
    proxy: ServiceSpec
    missing: dict[str, str] = field(default_factory=dict)
    #: ``url:`` tiers: routed by the proxy, probed by ``status``, run by nobody here.
    endpoints: tuple[Endpoint, ...] = ()
    #: Other machines' proxies whose models join this one (``config/remotes.py``).
    remotes: tuple[RemoteTarget, ...] = ()

    @property
    def all(self) -> tuple[ServiceSpec, ...]:
        return (*self.model_servers, self.proxy)

    @property
    def names(self) -> tuple[str, ...]:
        """Every service name, the missing ones included, and each replica alias (what
        commands may target)."""
        return (*(s.name for s in self.model_servers), *self.missing, self.proxy.name,
                *self.aliases)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Each tier with replicas: its services, in order (``embeddings``, ``embeddings-2``)."""
        return groups_of((s.name, s.group) for s in self.model_servers)

    @property
    def aliases(self) -> dict[str, str]:
        """``embeddings-1`` -> ``embeddings``: the first replica alone, where the tier's own
        name means every replica (``contract/addressing.py``)."""
        return aliases_of(self.groups)

    def require_complete(self) -> Plan:
        """Raise, before anything starts, if any service lacks its weights."""
        if self.missing:
            lines = "\n".join(f"  - {m}" for m in self.missing.values())
            raise ServiceStartError(f"nothing was started:\n{lines}")
        return self


@dataclass(frozen=True)
class LoadedPlan:
    """What the supervisor needs from the stack file: the plan and the watchdog settings."""

    plan: Plan
    settings: WatchSettings


def _script(name: str) -> tuple[str, ...]:
    """Run a console script of this Python's environment through this Python.

    Spelling the interpreter out makes the child's command line equal to what we record, which
    is how a later `down` recognises the process (a shebang script's cmdline starts with the
    interpreter).
    """
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return (sys.executable, str(candidate))
    return (name,)


def _mlx_child_env() -> dict[str, str]:
    """Environment for MLX children: offline hub. No ``LD_PRELOAD``: the chat wrapper and the
    embeddings server each measure and load their own BLAS before MLX (``cpu/blas.py``); a
    preloaded library would override that choice."""
    return {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def weights_path(entry: CatalogEntry, quant: str) -> Path | None:
    return locate_first(entry.quant(quant).sources)


def missing_weights_message(name: str, entry: CatalogEntry, quant: str) -> str:
    q = entry.quant(quant)
    how = (
        [f"mlx-stack pull {entry.name} --quant {quant}"]
        if any(s.kind == "hf" for s in q.sources)
        else []
    )
    extra = describe_missing(q.sources)
    if extra:
        how.append(extra)
    return (
        f"{name}: weights of {entry.name} ({quant}) are not on this machine; "
        f"get them with: {' or: '.join(how) or 'see its catalog entry'}"
    )


def _session(backend_key: str | None) -> dict[str, str]:
    return {BACKEND_KEY_ENV: backend_key} if backend_key else {}


def chat_service(tier: ChatTier, model_path: Path, backend_key: str | None = None) -> ServiceSpec:
    address = ("--host", "127.0.0.1", "--port", str(tier.port))
    if tier.backend == "vllm-mlx":
        argv = (*_script("vllm-mlx"), "serve", str(model_path), *address)
        probe_model = str(model_path)
    else:
        argv = (sys.executable, "-m", "mlx_stack.chat", "--model", str(model_path), *address)
        probe_model = MLX_LM_DEFAULT_MODEL
    return ServiceSpec(
        name=tier.name,
        kind=ServiceKind.CHAT,
        argv=argv,
        env=_mlx_child_env(),
        port=tier.port,
        host="127.0.0.1",
        model=tier.model.name,
        probe=Probe(ProbeKind.CHAT, f"http://127.0.0.1:{tier.port}", probe_model, backend_key),
        session_env=_session(backend_key),
        weights_bytes=weights_size(model_path),
    )


def embeddings_service(
    emb: EmbeddingsTier, model_path: Path, backend_key: str | None = None, replica: int = 1
) -> ServiceSpec:
    """Replica ``replica`` (1-based) of the embeddings tier: its own name and port."""
    m = emb.model
    name, port = emb.replica_names[replica - 1], emb.ports[replica - 1]
    argv = [
        sys.executable, "-m", "mlx_stack.embeddings",
        "--model-path", str(model_path),
        "--served-name", m.name,
        # The proxy's name too: a client that moves between :4000 and this port keeps its name.
        "--alias", EMBEDDINGS_MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--pooling", m.pooling,
        "--normalize" if m.normalize else "--no-normalize",
        "--max-seq-len", str(m.max_sequence_length),
    ]  # fmt: skip
    if m.matryoshka_dimensions:
        argv += ["--dimensions", ",".join(str(d) for d in m.matryoshka_dimensions)]
    if m.query_prefix:
        argv += ["--query-prefix", m.query_prefix]
    if m.document_prefix:
        argv += ["--document-prefix", m.document_prefix]
    return ServiceSpec(
        name=name,
        kind=ServiceKind.EMBEDDINGS,
        argv=tuple(argv),
        env=_mlx_child_env(),
        port=port,
        host="127.0.0.1",
        model=m.name,
        probe=Probe(ProbeKind.EMBEDDING, f"http://127.0.0.1:{port}", m.name, backend_key),
        session_env=_session(backend_key),
        weights_bytes=weights_size(model_path),
        group=emb.name,
    )


def rerank_service(
    rerank: RerankTier, model_path: Path, backend_key: str | None = None, replica: int = 1
) -> ServiceSpec:
    """The embeddings server's program in rerank mode: same child environment, backend key and
    weights accounting as the embeddings tier, none of its pooling or prefix flags."""
    m = rerank.model
    name, port = rerank.replica_names[replica - 1], rerank.ports[replica - 1]
    argv = (
        sys.executable, "-m", "mlx_stack.embeddings",
        "--task", "rerank",
        "--model-path", str(model_path),
        "--served-name", m.name,
        "--alias", RERANK_MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-seq-len", str(m.max_sequence_length),
    )  # fmt: skip
    return ServiceSpec(
        name=name,
        kind=ServiceKind.RERANK,
        argv=argv,
        env=_mlx_child_env(),
        port=port,
        host="127.0.0.1",
        model=m.name,
        probe=Probe(ProbeKind.RERANK, f"http://127.0.0.1:{port}", m.name, backend_key),
        session_env=_session(backend_key),
        weights_bytes=weights_size(model_path),
        group=rerank.name,
    )


def external_probe(t: ExternalTier, key: str | None) -> Probe:
    """The real request for an external server: a one-token chat completion or a one-text
    embedding through its OpenAI API, as for the stack's own tiers, with its own key."""
    kind = ProbeKind.EMBEDDING if t.kind == "embeddings" else ProbeKind.CHAT
    return Probe(kind, t.url, t.served_model, key, health=t.health)


def external_service(t: ExternalTier, key: str | None = None,
                     default_ready_s: float = WatchSettings().start_timeout_s) -> ServiceSpec:
    """A ``command:`` tier: the user's program, its environment, its port; no backend key (a
    program the stack does not build never sees the stack's own secrets).

    Its start has a fixed deadline (``ready_timeout_s``, else ``default_ready_s``): the
    watchdog's progress-based one reads a growing log as loading, and a server that logs each
    request (Ollama, llama.cpp) would then log the failing probes of an unpulled model or a
    wrong ``served_model`` as "progress" for ``start_timeout_max_s`` (30 minutes)."""
    assert t.port is not None
    return ServiceSpec(
        name=t.name,
        kind=ServiceKind.EMBEDDINGS if t.kind == "embeddings" else ServiceKind.CHAT,
        argv=t.command,
        env=dict(t.env),
        port=t.port,
        host="127.0.0.1",
        model=t.served_model,
        probe=external_probe(t, key),
        ready_timeout_s=t.ready_timeout_s or default_ready_s,
    )


def read_tier_key(stack: Stack, paths: StatePaths, t: ExternalTier) -> str | None:
    """An external tier's bearer key from its ``key_file`` (None without one)."""
    if t.key_file is None:
        return None
    where = f"tiers.{t.name}" if t.kind == "chat" else "embeddings"
    path = paths.key_file(t.key_file)
    try:
        key = read_key_file(path)
    except KeyFileError as exc:
        raise ConfigError(stack.path or "stack",
                          [f"{where}.key_file: cannot read {path}: {exc.reason}"]) from None
    if not key or not key.isprintable():
        raise ConfigError(stack.path or "stack", [
            f"{where}.key_file: {path} must hold the key on one line"])
    return key


def _missing_program(t: ExternalTier) -> str | None:
    if shutil.which(t.command[0]) is not None:
        return None
    where = f"tiers.{t.name}" if t.kind == "chat" else "embeddings"
    return (f"{t.name}: the program {t.command[0]!r} is not installed here (not on PATH); "
            f"install it, or give its full path in {where}.command")


def proxy_service(
    stack: Stack, paths: StatePaths, key: str, served_paths: dict[str, str],
    backend_key: str | None = None, tier_keys: dict[str, str] | None = None,
) -> ServiceSpec:
    p = stack.proxy
    cfg = paths.litellm_config
    argv = (
        sys.executable, "-m", "mlx_stack.litellm.launch",
        "--config", str(cfg),
        "--host", p.host,
        "--port", str(p.port),
        "--num_workers", "1",
    )  # fmt: skip
    if p.tls_cert_file:  # LiteLLM's own options (uvicorn's ssl_certfile / ssl_keyfile)
        argv += ("--ssl_certfile_path", str(paths.key_file(p.tls_cert_file)),
                 "--ssl_keyfile_path", str(paths.key_file(p.tls_key_file)))
    # A name shared with a remote is balanced by LiteLLM's router, not held by the gate (which
    # sees only this machine's services).
    shared = shared_names(stack)
    gated = {n: r for n, r in routes(stack).items() if n not in shared}
    env = {**PROXY_ENV, ROUTES_ENV: routes_to_env(gated),
           STATE_ENV: str(paths.state_file),
           ACCESS_ENV: WebAccess.for_bind(p.host, p.cors_origins).to_env(),
           SOURCES_ENV: sources_to_env(identity_sources(stack))}
    if stack.remotes:
        env[REMOTES_FILE_ENV] = str(paths.run / "remotes.json")
    remote_keys = {t.remote.key_env: t.key for t in remote_targets(stack, paths)}
    return ServiceSpec(
        name="proxy",
        kind=ServiceKind.PROXY,
        argv=argv,
        env=env,
        port=p.port,
        host=p.host,
        probe=Probe(ProbeKind.PROXY, f"{p.scheme}://{connect_host(p.host)}:{p.port}"),
        config_file=(cfg, render_config(build_config(stack, served_paths))),
        secret_env={ENV_VAR: key, **remote_keys, **(tier_keys or {})},
        session_env=_session(backend_key),
        unset_env=PROXY_UNSET_ENV,
    )


def remote_targets(stack: Stack, paths: StatePaths) -> tuple[RemoteTarget, ...]:
    """Each remote with its key, read from its 0600 file (a missing key file stops `up`)."""
    return tuple(RemoteTarget(r, read_remote_key(paths.key_file(r.key_file), r.name))
                 for r in stack.remotes)


def identity_sources(stack: Stack) -> dict[str, dict[str, str]]:
    """What the proxy's identity route (``litellm/identity.py``) lists: every local name,
    and where the vector servers' model cards are (the first replica's). No model name: the
    cards say it, and a model change must not change the proxy's definition (it would restart
    the proxy, which a rolling model change of replicas avoids)."""
    out = {name: {"mode": "chat"} for name in stack.chat_names}
    if stack.external_embeddings is not None:  # an external server reports no identity:
        out[EMBEDDINGS_MODEL_NAME] = {"mode": "embedding", "external": "yes"}  # never mixed
    if stack.embeddings is not None:
        out[EMBEDDINGS_MODEL_NAME] = {"mode": "embedding",
                                      "url": f"http://127.0.0.1:{stack.embeddings.port}"}
    if stack.rerank is not None:
        out[RERANK_MODEL_NAME] = {"mode": "rerank",
                                  "url": f"http://127.0.0.1:{stack.rerank.port}"}
    return out


def build_plan(
    stack: Stack, paths: StatePaths, key: str | None = None, backend_key: str | None = None
) -> Plan:
    """Resolve weights and build every spec a stack needs; no process is touched.

    A stack with no chat, embeddings or rerank tier has nothing to run: refused here, so `up`
    and a reload of a running supervisor refuse it alike. ``key`` defaults to the one in the
    stack's key file. ``backend_key``: the supervisor's (see ``backendkey.py``); the
    CLI plans without it, with the same fingerprints.
    """
    if (not stack.tiers and stack.embeddings is None and stack.rerank is None
            and not stack.external):
        raise ConfigError(
            stack.path or "stack",
            ["the stack has no chat tier, no embeddings tier and no rerank tier: nothing to run; "
             "add a tier, or run `mlx-stack init --add-embeddings MODEL`"],
        )
    if key is None:
        key = read_key(paths.key_file(stack.proxy.key_file))
    servers: list[ServiceSpec] = []
    missing: dict[str, str] = {}
    served_paths: dict[str, str] = {}
    for t in stack.tiers:
        path = weights_path(t.model, t.quant)
        if path is None:
            missing[t.name] = missing_weights_message(t.name, t.model, t.quant)
            continue
        servers.append(chat_service(t, path, backend_key))
        served_paths[t.name] = str(path)
    if stack.embeddings is not None:
        e = stack.embeddings
        path = weights_path(e.model, e.quant)
        for i, name in enumerate(e.replica_names, start=1):
            if path is None:
                missing[name] = missing_weights_message(name, e.model, e.quant)
            else:
                servers.append(embeddings_service(e, path, backend_key, replica=i))
    if stack.rerank is not None:
        r = stack.rerank
        path = weights_path(r.model, r.quant)
        for i, name in enumerate(r.replica_names, start=1):
            if path is None:
                missing[name] = missing_weights_message(name, r.model, r.quant)
            else:
                servers.append(rerank_service(r, path, backend_key, replica=i))
    endpoints: list[Endpoint] = []
    tier_keys: dict[str, str] = {}
    for x in stack.external:
        tier_key = read_tier_key(stack, paths, x)
        if tier_key is not None:
            tier_keys[x.key_env] = tier_key
        if not x.supervised:
            endpoints.append(Endpoint(x.name, ServiceKind.EMBEDDINGS if x.kind == "embeddings"
                                      else ServiceKind.CHAT, external_probe(x, tier_key)))
        elif (gone := _missing_program(x)) is not None:
            missing[x.name] = gone
        else:
            servers.append(external_service(x, tier_key, stack.watchdog.start_timeout_s))
    proxy = proxy_service(stack, paths, key, served_paths, backend_key, tier_keys)
    return Plan(tuple(servers), proxy, missing, endpoints=tuple(endpoints),
                remotes=remote_targets(stack, paths))


def load_stack_file(paths: StatePaths) -> Stack:
    """The stack file, validated against the shipped catalog and the user's."""
    return load_stack(paths.stack_file, load_catalog(paths.user_catalog), platform.system())


def load_plan(paths: StatePaths, backend_key: str | None = None) -> LoadedPlan:
    """Read the stack file, the catalog and the key, and plan the services."""
    stack = load_stack_file(paths)
    return LoadedPlan(build_plan(stack, paths, backend_key=backend_key), stack.watchdog)
