"""From a validated stack to the services to run: command line, environment, port, probe.

Pure apart from looking up where weights are on disk, so what `up` would run can be shown and
tested without starting anything.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlx_stack.catalog import CatalogEntry
from mlx_stack.errors import ServiceStartError
from mlx_stack.litellm_config import (
    MLX_LM_DEFAULT_MODEL,
    PROXY_ENV,
    PROXY_UNSET_ENV,
    build_config,
    render_config,
)
from mlx_stack.paths import StatePaths
from mlx_stack.probes import Probe, ProbeKind
from mlx_stack.proxykey import ENV_VAR
from mlx_stack.sources import describe_missing, locate_first
from mlx_stack.stackfile import ChatTier, EmbeddingsTier, Stack


class ServiceKind(str, enum.Enum):
    CHAT = "chat"
    EMBEDDINGS = "embeddings"
    PROXY = "proxy"


#: How long a start may take before it is declared failed, by kind. Model loads are slow on
#: first use (weights read from disk, kernels compiled).
READY_TIMEOUT_S = {ServiceKind.CHAT: 600.0, ServiceKind.EMBEDDINGS: 300.0, ServiceKind.PROXY: 120.0}


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    kind: ServiceKind
    argv: tuple[str, ...]
    env: dict[str, str]
    port: int
    host: str
    model: str | None
    probe: Probe
    ready_timeout_s: float
    #: A file the service reads, written before it starts (the proxy's config): (path, text).
    config_file: tuple[Path, str] | None = None
    #: Environment that must never be logged or fingerprinted in clear (the proxy key).
    secret_env: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    #: Inherited variables the child must not see (they change its behaviour in harmful ways).
    unset_env: frozenset[str] = frozenset()
    #: Size of the weight files it loads: what `up` measures loading progress against.
    weights_bytes: int | None = None

    @property
    def fingerprint(self) -> str:
        """Changes exactly when a restart is needed to apply a new definition."""
        h = hashlib.sha256()
        h.update(json.dumps([self.argv, sorted(self.env.items()), self.port, self.host]).encode())
        if self.config_file is not None:
            h.update(self.config_file[1].encode())
        h.update(hashlib.sha256("".join(sorted(self.secret_env.values())).encode()).digest())
        return h.hexdigest()[:16]

    def full_env(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if k not in self.unset_env}
        return {**inherited, **self.env, **self.secret_env}


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
    """Environment for MLX children: offline hub, and the fast BLAS on Linux CPUs."""
    from mlx_stack.embeddings.blas import child_env

    return {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **child_env({})}


def weights_path(entry: CatalogEntry, quant: str) -> Path | None:
    return locate_first(entry.quant(quant).sources)


WEIGHT_SUFFIXES = (".safetensors", ".npz", ".bin", ".gguf")


def weights_size(model_path: Path) -> int | None:
    """Bytes of the weight files in a model folder (symlinks into the hub cache followed)."""
    try:
        files = [p for p in model_path.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES)]
        return sum(p.stat().st_size for p in files) or None
    except OSError:
        return None


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


def chat_service(tier: ChatTier, model_path: Path) -> ServiceSpec:
    if tier.backend == "vllm-mlx":
        argv = (
            *_script("vllm-mlx"),
            "serve",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(tier.port),
        )
        probe_model = str(model_path)
    else:
        argv = (
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(tier.port),
        )
        probe_model = MLX_LM_DEFAULT_MODEL
    url = f"http://127.0.0.1:{tier.port}"
    return ServiceSpec(
        tier.name,
        ServiceKind.CHAT,
        argv,
        _mlx_child_env(),
        tier.port,
        "127.0.0.1",
        tier.model.name,
        Probe(ProbeKind.CHAT, url, probe_model),
        READY_TIMEOUT_S[ServiceKind.CHAT],
        weights_bytes=weights_size(model_path),
    )


def embeddings_service(emb: EmbeddingsTier, model_path: Path) -> ServiceSpec:
    m = emb.model
    argv = [
        sys.executable,
        "-m",
        "mlx_stack.embeddings",
        "--model-path",
        str(model_path),
        "--served-name",
        m.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(emb.port),
        "--pooling",
        m.pooling,
        "--normalize" if m.normalize else "--no-normalize",
        "--max-seq-len",
        str(m.max_sequence_length),
    ]
    if m.matryoshka_dimensions:
        argv += ["--dimensions", ",".join(str(d) for d in m.matryoshka_dimensions)]
    if m.query_prefix:
        argv += ["--query-prefix", m.query_prefix]
    if m.document_prefix:
        argv += ["--document-prefix", m.document_prefix]
    url = f"http://127.0.0.1:{emb.port}"
    return ServiceSpec(
        emb.name,
        ServiceKind.EMBEDDINGS,
        tuple(argv),
        _mlx_child_env(),
        emb.port,
        "127.0.0.1",
        m.name,
        Probe(ProbeKind.EMBEDDING, url, m.name),
        READY_TIMEOUT_S[ServiceKind.EMBEDDINGS],
        weights_bytes=weights_size(model_path),
    )


def proxy_service(
    stack: Stack, paths: StatePaths, key: str, served_paths: dict[str, str]
) -> ServiceSpec:
    p = stack.proxy
    cfg = paths.litellm_config
    text = render_config(build_config(stack, served_paths))
    argv = (
        sys.executable,
        "-m",
        "mlx_stack.litellm_launch",
        "--config",
        str(cfg),
        "--host",
        p.host,
        "--port",
        str(p.port),
        "--num_workers",
        "1",
    )
    host = "127.0.0.1" if p.host in ("0.0.0.0", "::") else p.host
    return ServiceSpec(
        "proxy",
        ServiceKind.PROXY,
        argv,
        dict(PROXY_ENV),
        p.port,
        p.host,
        None,
        Probe(ProbeKind.PROXY, f"http://{host}:{p.port}"),
        READY_TIMEOUT_S[ServiceKind.PROXY],
        config_file=(cfg, text),
        secret_env={ENV_VAR: key},
        unset_env=PROXY_UNSET_ENV,
    )


@dataclass(frozen=True)
class Plan:
    """Every service of a stack, in start order (model servers first, the proxy last).

    ``missing`` names the model servers that cannot start because their weights are not on
    this machine, with the command that fetches them.
    """

    model_servers: tuple[ServiceSpec, ...]
    proxy: ServiceSpec
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def all(self) -> tuple[ServiceSpec, ...]:
        return (*self.model_servers, self.proxy)

    def require_complete(self) -> Plan:
        """Raise, before anything starts, if any service lacks its weights."""
        if self.missing:
            lines = "\n".join(f"  - {m}" for m in self.missing.values())
            raise ServiceStartError(f"nothing was started:\n{lines}")
        return self


def plan_services(stack: Stack, paths: StatePaths, key: str) -> Plan:
    """Resolve weights and build every spec a stack needs; no process is touched."""
    servers: list[ServiceSpec] = []
    missing: dict[str, str] = {}
    served_paths: dict[str, str] = {}
    for t in stack.tiers:
        path = weights_path(t.model, t.quant)
        if path is None:
            missing[t.name] = missing_weights_message(t.name, t.model, t.quant)
            continue
        servers.append(chat_service(t, path))
        served_paths[t.name] = str(path)
    if stack.embeddings is not None:
        e = stack.embeddings
        path = weights_path(e.model, e.quant)
        if path is None:
            missing[e.name] = missing_weights_message(e.name, e.model, e.quant)
        else:
            servers.append(embeddings_service(e, path))
    return Plan(tuple(servers), proxy_service(stack, paths, key, served_paths), missing)
