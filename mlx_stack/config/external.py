"""External servers as tiers: an OpenAI-compatible server the stack does not build itself.

Two forms, for a chat tier (``tiers.NAME``) or the embeddings tier (``embeddings:``):

- ``command:`` + ``port:``: a program the supervisor runs, probes through its OpenAI API,
  restarts and stops with the stack (llama.cpp's server, ``ollama serve``, vllm-mlx, ...);
- ``url:``: a server the stack only probes (no process): ``status`` shows it reachable or not.

``backend: ollama`` (the embeddings tier, or a chat tier) is an Ollama server: ``model:`` is
then the Ollama model name (not a catalog id), ``url`` defaults to Ollama's own address, and a
``command`` gets ``OLLAMA_HOST`` for its port. Parsed here, from the mapping the stack file's
schema already checked (``stackfile.py``), so the stack file keeps one reader per section.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlx_stack.config.schema import Field, Problems

#: An OpenAI-compatible server of any make, and Ollama (whose OpenAI face has quirks).
OPENAI = "openai"
OLLAMA = "ollama"
EXTERNAL_BACKENDS = (OPENAI, OLLAMA)
OLLAMA_URL = "http://127.0.0.1:11434"
OLLAMA_PORT = 11434
#: A route every OpenAI-compatible server answers without running a model.
DEFAULT_HEALTH = "/v1/models"
#: Ollama's cheapest route (it answers before any model is loaded).
OLLAMA_HEALTH = "/api/version"
#: What the proxy sends as the bearer key to a server that needs none (LiteLLM's OpenAI
#: client requires one); never the stack's own backend key, which stays with its own servers.
NO_KEY = "no-key"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

EXTERNAL_FIELDS = [
    Field("command", (list, str, type(None)),
          "an external server to run: its argv as a list, or one string split like a shell "
          "(no model: then; needs port:)", None),
    Field("url", (str, type(None)),
          "an external server the stack only probes: its http(s) base URL, with or without "
          "/v1 (no model:, command: or port:)", None),
    Field("served_model", (str, type(None)),
          "the model name the external server serves; default: the tier name", None),
    Field("health", (str, type(None)),
          f"path of the external server's cheap health route; default {DEFAULT_HEALTH} "
          f"({OLLAMA_HEALTH} for Ollama)", None),
    Field("ready_timeout_s", (float, type(None)),
          "seconds a command: server may take to answer its first real request (a fixed "
          "deadline); default: the watchdog's start_timeout_s", None),
    Field("env", (dict, type(None)), "environment variables for a command: server", None),
    Field("key_file", (str, type(None)),
          "file holding the external server's bearer key, relative to the state folder "
          "(never shown or logged)", None),
]
EXTERNAL_KEYS = frozenset(f.name for f in EXTERNAL_FIELDS)


@dataclass(frozen=True)
class ExternalTier:
    """A chat tier or the embeddings tier served by a program the stack does not build."""

    name: str
    kind: str  # "chat" or "embeddings"
    backend: str  # OPENAI or OLLAMA
    served_model: str
    command: tuple[str, ...] = ()
    #: The server's root (no trailing ``/v1``), for ``url:`` tiers and command tiers alike.
    url: str = ""
    port: int | None = None
    health: str = DEFAULT_HEALTH
    ready_timeout_s: float | None = None
    env: dict[str, str] = field(default_factory=dict, hash=False)
    key_file: str | None = None

    @property
    def supervised(self) -> bool:
        """A ``command:`` tier: the supervisor runs it. Else a ``url:`` tier, only probed."""
        return bool(self.command)

    @property
    def api_base(self) -> str:
        return self.url + "/v1"

    @property
    def key_env(self) -> str:
        """The proxy's variable that carries this tier's key (the config names it, never the
        key itself)."""
        return KEY_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", self.name.upper())

    @property
    def litellm_api_key(self) -> str:
        """What the generated LiteLLM config says as this tier's ``api_key``."""
        return f"os.environ/{self.key_env}" if self.key_file else NO_KEY


KEY_ENV_PREFIX = "MLX_STACK_TIER_KEY_"


def is_external_deployment(api_key: object) -> bool:
    """Whether a generated deployment's ``api_key`` is an external tier's (see
    ``litellm_api_key``): how the proxy's middlewares tell them from the stack's own servers
    (backend key) and other deployments."""
    return isinstance(api_key, str) and (
        api_key == NO_KEY or api_key.startswith(f"os.environ/{KEY_ENV_PREFIX}"))


def is_external(body: Any) -> bool:
    """Whether a tier's mapping asks for an external server (``command``, ``url`` or an
    external ``backend``)."""
    return isinstance(body, dict) and (
        body.get("command") is not None or body.get("url") is not None
        or body.get("backend") in EXTERNAL_BACKENDS)


def forms_problem(body: dict) -> str | None:
    """Exactly one of model / command / url (for Ollama: model plus at most one of the two)."""
    given = [k for k in ("model", "command", "url") if body.get(k) is not None]
    if body.get("backend") == OLLAMA:
        if "model" not in given:
            return "backend: ollama needs model: (the Ollama model name, e.g. nomic-embed-text)"
        if "command" in given and "url" in given:
            return "give command: (run `ollama serve`) or url: (an Ollama already running), " \
                   "not both"
        return None
    what = ("model: (a catalog model the stack serves), command: (a program the stack runs) "
            "or url: (a server it only probes)")
    if len(given) > 1:
        return f"give exactly one of {what}; found {' and '.join(given)}"
    if given in ([], ["model"]):
        return (f"an external server (backend: {body.get('backend')}) needs command: (a program "
                "the stack runs) or url: (a server it only probes); the name it serves is "
                "served_model:")
    return None


def read_external(d: dict[str, Any], raw: dict, name: str, kind: str, path: str,
                  problems: Problems) -> ExternalTier | None:
    """An external tier from its checked mapping ``d`` (``raw``: the keys as written)."""
    ok = True

    def bad(key: str, message: str) -> None:
        nonlocal ok
        problems.add(f"{path}.{key}" if key else path, message)
        ok = False

    backend = raw.get("backend", OPENAI)
    if backend not in EXTERNAL_BACKENDS:
        bad("backend", f"backend {backend!r} runs a catalog model; a command:/url: tier is "
            f"backend: {OPENAI} (any OpenAI-compatible server, the default) or {OLLAMA}")
        return None
    ollama = backend == OLLAMA
    if d.get("quant") is not None:
        bad("quant", "quant: is for catalog models; an external server chooses its own")
    served = d["model"] if ollama else (name if d["served_model"] is None else d["served_model"])
    if ollama and d["served_model"] is not None:
        bad("served_model", "with backend: ollama, model: is the served model; drop "
            "served_model:")
    command = _command(d["command"], bad)
    url = d["url"]
    port = d.get("port")
    if command:
        if port is None:
            port = OLLAMA_PORT if ollama else None
        if port is None:
            bad("", "missing required key 'port' (the port the command's server listens on; "
                "the stack probes and routes to 127.0.0.1:PORT)")
        root = f"http://127.0.0.1:{port}"
    else:
        for key in ("port", "env", "ready_timeout_s"):
            if d.get(key) is not None:
                bad(key, f"{key}: is for command: servers; a url: server is only probed")
        root = _url(url if url is not None else OLLAMA_URL, bad)
    health = d["health"] or (OLLAMA_HEALTH if ollama else DEFAULT_HEALTH)
    if not health.startswith("/") or any(c.isspace() for c in health):
        bad("health", f"{health!r} is not a path; e.g. {DEFAULT_HEALTH}")
    timeout = d["ready_timeout_s"]
    if timeout is not None and timeout <= 0:
        bad("ready_timeout_s", "must be > 0")
    env = _env(d["env"] or {}, bad)
    if command and ollama and "OLLAMA_HOST" not in env:
        env["OLLAMA_HOST"] = f"127.0.0.1:{port}"
    key_file = d["key_file"]
    if key_file is not None and (not key_file.strip() or "\0" in key_file):
        bad("key_file", f"{key_file!r} is not a file name; e.g. {name}.key")
    elif key_file is not None:
        try:
            Path(key_file).expanduser()
        except RuntimeError:
            bad("key_file", f"{key_file!r}: no such user's home folder on this machine")
    if not served.strip() or not served.isprintable():
        bad("model" if ollama else "served_model", f"{served!r} is not a model name")
    if not ok:
        return None
    return ExternalTier(name, kind, backend, served, command, root, port if command else None,
                        health, None if timeout is None else float(timeout), env, key_file)


def _command(value: list | str | None, bad: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            bad("command", f"cannot split {value!r} like a shell: {exc}")
            return ()
    else:  # `--port, 8010` unquoted is a number in YAML: meant as the text
        argv = [str(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a
                for a in value]
    if not argv or not all(isinstance(a, str) and a and "\0" not in a for a in argv):
        bad("command", "must be a program and its arguments: a non-empty list of non-empty "
            "strings, e.g. [ollama, serve], or one string")
        return ()
    return tuple(argv)


def _url(value: str, bad: Any) -> str:
    """The server's root: scheme://host[:port][/prefix], without a trailing ``/`` or ``/v1``."""
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        bad("url", f"{value!r} is not a URL ({exc}); e.g. http://127.0.0.1:8080")
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        bad("url", f"{value!r} is not an http(s) URL with a host; e.g. http://127.0.0.1:8080")
        return ""
    if parts.query or parts.fragment or parts.username or parts.password:
        bad("url", f"{value!r}: no query, fragment or user:password in the URL (a key goes "
            "in key_file:)")
        return ""
    path = parts.path.rstrip("/")
    path = path[:-3] if path.endswith("/v1") else path
    return f"{parts.scheme}://{parts.netloc}{path}"


def _env(value: dict, bad: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            bad(f"env.{key}", f"{key!r} is not an environment variable name")
        elif isinstance(item, bool) or not isinstance(item, (str, int, float)):
            bad(f"env.{key}", f"expected a string or a number, got {type(item).__name__}")
        elif "\0" in str(item):
            bad(f"env.{key}", "a value cannot hold a NUL character")
        else:
            out[key] = str(item)
    return out


def render_external(t: ExternalTier, indent: str) -> str:
    """The tier's keys as YAML lines (``init --force`` rewrites a stack file from its parsed
    form: an external tier must survive that). Strings as JSON, which YAML reads back as is."""
    q = json.dumps
    lines: list[str] = []
    if t.backend == OLLAMA:
        lines += [f"backend: {OLLAMA}", f"model: {q(t.served_model)}"]
    elif t.served_model != t.name:
        lines.append(f"served_model: {q(t.served_model)}")
    if t.supervised:
        lines += [f"command: {q(list(t.command))}", f"port: {t.port}"]
    else:
        lines.append(f"url: {q(t.url)}")
    if t.health != (OLLAMA_HEALTH if t.backend == OLLAMA else DEFAULT_HEALTH):
        lines.append(f"health: {q(t.health)}")
    if t.ready_timeout_s is not None:
        lines.append(f"ready_timeout_s: {t.ready_timeout_s:g}")
    env = {k: v for k, v in t.env.items()
           if not (t.backend == OLLAMA and k == "OLLAMA_HOST" and v == f"127.0.0.1:{t.port}")}
    if env:
        lines.append(f"env: {q(env)}")
    if t.key_file is not None:
        lines.append(f"key_file: {q(t.key_file)}")
    return "".join(f"{indent}{line}\n" for line in lines)
