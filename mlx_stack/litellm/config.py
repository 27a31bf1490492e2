"""The LiteLLM proxy's generated config: one route per chat tier, ``local-embed`` for embeddings,
``local-rerank`` for the reranker (one deployment per replica, under one name).

Generated from the stack file on every `up` (never edited by hand). Facts it relies on, measured
on litellm 1.106 (see ../shared/NOTES.md): embedding deployments need ``model_info.mode:
embedding`` or /health probes them with chat calls; ``fallbacks`` belong under
``router_settings``; the master key is read from the environment (``os.environ/VAR``).
Measured on litellm 1.108 (docs/rerank.md): a ``cohere/NAME`` deployment with ``api_base`` at
the server's root posts to ``{api_base}/v2/rerank`` for :4000's /rerank, /v1/rerank and
/v2/rerank alike, forwards ``top_n``, ``return_documents`` and ``max_tokens_per_doc``, sends
``api_key`` as a bearer token, and health-checks ``mode: rerank`` with a rerank call.
"""

from __future__ import annotations

from typing import Any

import yaml

from mlx_stack.backendkey import LITELLM_API_KEY
from mlx_stack.config.external import ExternalTier
from mlx_stack.config.proxykey import ENV_VAR
from mlx_stack.config.remotes import Remote, RemoteModel
from mlx_stack.config.stackfile import EMBEDDINGS_MODEL_NAME, RERANK_MODEL_NAME, Stack
from mlx_stack.litellm.gate import Route

#: The model name mlx_lm.server maps to the model given on its command line (no hub lookup).
MLX_LM_DEFAULT_MODEL = "default_model"

#: Environment of the proxy child: offline, no .env discovery, one retry layer only. Logging at
#: WARNING: at INFO, LiteLLM writes two lines and uvicorn an access line for every request,
#: ~12% of the proxy's CPU per embedding request measured here (py-spy); errors still log.
PROXY_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_MODE": "PRODUCTION",
    "DEFAULT_MAX_RETRIES": "0",
    "LITELLM_LOG": "WARNING",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
}


#: Inherited variables that would break or leak through the proxy: a DATABASE_URL makes it
#: fetch prisma binaries and exit; HTTP(S)_PROXY sends loopback calls to the proxy server;
#: OPENAI_API_KEY could be forwarded upstream; LITELLM_MASTER_KEY would compete with ours.
PROXY_UNSET_ENV = frozenset({
    "DATABASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
    "all_proxy", "OPENAI_API_KEY", "OPENAI_BASE_URL", "LITELLM_MASTER_KEY", "LITELLM_CONFIG",
})


def upstream_model(backend: str, served_name: str) -> str:
    """The model name to send upstream for a tier."""
    return MLX_LM_DEFAULT_MODEL if backend == "mlx-lm" else served_name


def routes(stack: Stack) -> dict[str, Route]:
    """Each model name of the proxy: its service, and the tiers a chat request falls back to.

    The same table feeds LiteLLM's ``fallbacks`` and the gate that routes around a tier the
    supervisor sees down (``gate.py``). The embeddings tier has no fallback: vectors from
    another model live in another space; nor has the rerank tier: scores of another model are
    on another scale. Their routes list every replica with its port: the gate holds a request
    only when none is ready, and the fast lane knows which servers are the stack's own.
    """
    names = list(stack.chat_names)
    out = {n: Route(n, tuple(m for m in names if m != n)) for n in names}
    for model_name, tier in ((EMBEDDINGS_MODEL_NAME, stack.embeddings),
                             (RERANK_MODEL_NAME, stack.rerank)):
        if tier is not None:
            out[model_name] = Route(
                tier.name, replicas=tuple(zip(tier.replica_names, tier.ports, strict=True)))
    if stack.external_embeddings is not None:  # an external server: one, no replicas
        out[EMBEDDINGS_MODEL_NAME] = Route(stack.external_embeddings.name)
    return out


def rerank_deployments(stack: Stack) -> list[dict[str, Any]]:
    """``local-rerank``, one deployment per replica: Cohere's provider at the server's root
    (it appends ``/v2/rerank``).

    Not ``/v1`` in ``api_base``: the provider would call ``/v1/v2/rerank``. Not ``infinity/``
    (fails on ``document`` objects in answers, drops ``max_tokens_per_doc``), ``jina_ai/``
    (drops ``max_tokens_per_doc``) or ``hosted_vllm/`` (replaces ``meta.billed_units``).
    The upstream model is the server's alias, so a model change leaves this config, and the
    proxy, as they are (the replicas are then replaced one at a time behind it).
    """
    r = stack.rerank
    if r is None:
        return []
    return [{
        "model_name": RERANK_MODEL_NAME,
        "litellm_params": {
            "model": f"cohere/{RERANK_MODEL_NAME}",
            "api_base": f"http://127.0.0.1:{port}",
            "api_key": LITELLM_API_KEY,
            "timeout": min(stack.proxy.timeout_s, 120.0),
        },
        "model_info": {"mode": "rerank"},
    } for port in r.ports]


def external_deployment(stack: Stack, t: ExternalTier) -> dict[str, Any]:
    """An external server as a deployment: OpenAI's provider at its ``/v1``, its own key by
    variable name (``os.environ/...``: the key is in the proxy's environment only), never the
    stack's backend key. Its embeddings go through ``normalize.py`` (not the fast lane, which
    serves only deployments that take the backend key)."""
    p = stack.proxy
    params: dict[str, Any] = {
        "model": f"openai/{t.served_model}",
        "api_base": t.api_base,
        "api_key": t.litellm_api_key,
    }
    if t.kind == "embeddings":
        params["timeout"] = min(p.timeout_s, 120.0)
        name, mode = EMBEDDINGS_MODEL_NAME, "embedding"
    else:
        params["timeout"] = params["stream_timeout"] = p.timeout_s
        name, mode = t.name, "chat"
    return {"model_name": name, "litellm_params": params, "model_info": {"mode": mode}}


def build_config(stack: Stack, served_paths: dict[str, str]) -> dict[str, Any]:
    """The config as data. ``served_paths`` maps vllm-mlx tiers to the model path they serve."""
    p = stack.proxy
    model_list: list[dict[str, Any]] = []
    for t in stack.tiers:
        model_list.append(
            {
                "model_name": t.name,
                "litellm_params": {
                    "model": "openai/"
                    + upstream_model(t.backend, served_paths.get(t.name, t.model.name)),
                    "api_base": f"http://127.0.0.1:{t.port}/v1",
                    "api_key": LITELLM_API_KEY,
                    "timeout": p.timeout_s,
                    "stream_timeout": p.timeout_s,
                },
                "model_info": {"mode": "chat"},
            }
        )
    if stack.embeddings is not None:
        # One deployment per replica under one name: LiteLLM's router balances them (the fast
        # lane, which answers keyed requests first, balances by the supervisor's view). The
        # upstream model is the server's alias: a model change does not touch this config.
        for port in stack.embeddings.ports:
            model_list.append(
                {
                    "model_name": EMBEDDINGS_MODEL_NAME,
                    "litellm_params": {
                        "model": f"openai/{EMBEDDINGS_MODEL_NAME}",
                        "api_base": f"http://127.0.0.1:{port}/v1",
                        "api_key": LITELLM_API_KEY,
                        "timeout": min(p.timeout_s, 120.0),
                        # drop_params would silently remove `dimensions`; our server honours
                        # it (Matryoshka models) or refuses it with a 400 that says why.
                        "allowed_openai_params": ["dimensions"],
                    },
                    "model_info": {"mode": "embedding"},
                }
            )
    model_list += [external_deployment(stack, t) for t in stack.external]
    model_list += rerank_deployments(stack)
    model_list += [remote_deployment(r, m, p.timeout_s) for r in stack.remotes for m in r.models]
    fallbacks = [{n: list(r.fallbacks)} for n, r in routes(stack).items() if r.fallbacks]
    router: dict[str, Any] = {
        "num_retries": p.num_retries,
        "timeout": p.timeout_s,
        "retry_after": 0,
    }
    if fallbacks:
        router["fallbacks"] = fallbacks
    general: dict[str, Any] = {"master_key": f"os.environ/{ENV_VAR}"}
    shared = shared_names(stack)
    if shared:
        _share(model_list, shared)
        general.update({
            "background_health_checks": True,
            "health_check_interval": HEALTH_CHECK_INTERVAL_S,
            "enable_health_check_routing": True,
            "background_health_check_model_groups": sorted(shared),
        })
    return {
        "model_list": model_list,
        "router_settings": router,
        "litellm_settings": {
            "drop_params": True,
            "telemetry": False,
            "request_timeout": p.timeout_s,
        },
        "general_settings": general,
    }


#: LiteLLM's background health check of every deployment of a name served by several hosts:
#: a dead host is marked unhealthy and routed around before clients hit it (health-check
#: routing); one failed request also cools it down (``COOLDOWN_S``), and it comes back after.
HEALTH_CHECK_INTERVAL_S = 10
COOLDOWN_S = 5


def shared_names(stack: Stack) -> frozenset[str]:
    """Proxy names with a remote deployment: LiteLLM's router balances them, not the gate."""
    return frozenset(m.joined for r in stack.remotes for m in r.models)


def _share(model_list: list[dict[str, Any]], shared: frozenset[str]) -> None:
    """Deployments of a shared name cool down on their first failure (the retry then goes to
    another deployment), for ``COOLDOWN_S``; a chat one's health check generates one token
    (LiteLLM's default is 16, every ``HEALTH_CHECK_INTERVAL_S``, on each host)."""
    for d in model_list:
        if d["model_name"] in shared:
            d["model_info"].update({"allowed_fails": 0, "cooldown_time": COOLDOWN_S})
            if d["model_info"].get("mode") == "chat":
                d["model_info"]["health_check_max_tokens"] = 1


def remote_deployment(remote: Remote, model: RemoteModel, timeout_s: float) -> dict[str, Any]:
    """One model of a remote mlx-stack proxy, with its key from the proxy's environment.

    ``mlx_stack_remote`` / ``mlx_stack_identity`` mark it for the launcher
    (``litellm/remotes.py``), which leaves out vector models whose identity is not accepted."""
    if model.mode == "rerank":
        params: dict[str, Any] = {"model": f"cohere/{model.name}", "api_base": remote.url}
    else:
        params = {"model": f"openai/{model.name}", "api_base": f"{remote.url}/v1"}
    params.update({"api_key": f"os.environ/{remote.key_env}",
                   "timeout": min(timeout_s, 120.0) if model.mode != "chat" else timeout_s})
    if model.mode == "chat":
        params["stream_timeout"] = timeout_s
    if model.mode == "embedding":
        params["allowed_openai_params"] = ["dimensions"]
    return {
        "model_name": model.joined,
        "litellm_params": params,
        "model_info": {"mode": model.mode, "mlx_stack_remote": remote.name,
                       "mlx_stack_model": model.name,
                       "mlx_stack_identity": model.needs_identity},
    }


def render_config(config: dict[str, Any]) -> str:
    return (
        "# Generated by mlx-stack from the stack file on every `up`; edits are overwritten.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
