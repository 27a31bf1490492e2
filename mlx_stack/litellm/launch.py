"""Run the LiteLLM proxy, with one compatibility shim: JSON bodies sent as form data.

(And the stack's middlewares in front of LiteLLM: ``webguard.py``, ``bodycheck.py``, ``gate.py``,
``normalize.py`` (vectors of external embeddings servers), then ``fastlane.py``, which answers
embedding requests without LiteLLM.)

``curl -d '{"model": ...}'`` without ``-H 'Content-Type: application/json'`` sends a JSON body
labelled ``application/x-www-form-urlencoded``; LiteLLM then parses it as a form and answers
"Missing required parameter". Agents' quick checks do exactly this, so POST bodies that are a
JSON object are relabelled ``application/json`` before LiteLLM sees them. Everything else is
LiteLLM's own command line (``litellm --config ... --host ... --port ...``), unchanged.

Started as ``python -m mlx_stack.litellm.launch <litellm arguments>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from mlx_stack.litellm.gate import read_body, replay

Scope = dict[str, Any]
Message = dict[str, Any]
_FORM = b"application/x-www-form-urlencoded"


class JsonBodyShim:
    """ASGI middleware: relabel a form-typed POST body that is really a JSON object."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        ctype = next((v for k, v in headers if k == b"content-type"), b"")
        if ctype.split(b";")[0].strip().lower() not in (_FORM, b""):
            await self.app(scope, receive, send)
            return
        body, more = await read_body(receive)
        if not more and body.lstrip()[:1] == b"{" and _is_json(body):
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in headers if k != b"content-type"] + [
                (b"content-type", b"application/json")
            ]
        await self.app(scope, replay(body, more, receive), send)


def _is_json(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):  # deep nesting: not ours to answer, LiteLLM's
        return False


def _config_path(argv: list[str]) -> Path | None:
    """The ``--config FILE`` of LiteLLM's command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def _use_effective_config(argv: list[str], remotes_file: str | None) -> None:
    """With remotes, LiteLLM loads the config without the vector models not accepted
    (``remotes.py``): ``--config`` in ``argv`` is pointed at that file."""
    from mlx_stack.litellm import remotes

    config = _config_path(argv[1:])
    if not remotes_file or config is None or not config.is_file():
        return
    effective = str(remotes.effective_config(config, Path(remotes_file)))
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = effective
        elif arg.startswith("--config="):
            argv[i] = f"--config={effective}"


def main() -> None:
    from litellm.proxy import proxy_server
    from litellm.proxy.proxy_cli import run_server

    from mlx_stack.config.proxykey import ENV_VAR
    from mlx_stack.litellm import (
        bodycheck,
        fastlane,
        gate,
        identity,
        normalize,
        remotes,
        webguard,
    )

    _use_effective_config(sys.argv, os.environ.get(remotes.REMOTES_FILE_ENV))

    # The CLI serves "litellm.proxy.proxy_server:app" by import path; with one worker that is
    # this very module object, so the middleware added here is the one that serves. The last
    # one added runs first: the web guard (Host, Origin, CORS), the body check, the gate,
    # then the content-type shim, the vector normaliser of external embeddings servers, the
    # embeddings fast lane, then LiteLLM.
    lane = fastlane.options_from_env(_config_path(sys.argv[1:]), os.environ)
    if lane is not None:
        proxy_server.app.add_middleware(fastlane.FastLane, **lane)
    norm = normalize.options_from_env(_config_path(sys.argv[1:]), os.environ)
    if norm is not None:
        proxy_server.app.add_middleware(normalize.Normalize, **norm)
    proxy_server.app.add_middleware(JsonBodyShim)
    options = gate.options_from_env()
    if options is not None:
        proxy_server.app.add_middleware(gate.TierGate, **options)
    proxy_server.app.add_middleware(bodycheck.BodyCheck, key=os.environ.get(ENV_VAR, ""))
    ident = identity.options_from_env()
    if ident is not None:
        proxy_server.app.add_middleware(identity.IdentityRoute, **ident)
    proxy_server.app.add_middleware(webguard.WebGuard, access=webguard.WebAccess.from_env())
    run_server(prog_name="litellm")


if __name__ == "__main__":
    main()
