"""What a chat tier refuses before mlx_lm.server sees a request: pure decisions, no I/O.

mlx_lm.server trusts its caller completely: it answers every web origin
(``Access-Control-Allow-Origin: *``), checks no ``Host`` (a DNS-rebinding page reaches it), and
loads whatever ``model``, ``adapters`` or ``draft_model`` a request names (unloading the tier's
model for any local path or cached repo). A tier of the stack serves one model to programs on
this machine, so this module decides, from the headers and then the body:

- a ``Host`` that is not loopback: 403 (a rebinding page);
- any ``Origin``, or ``Sec-Fetch-Site: cross-site``: 403 (a web page; programs send neither);
- a POST body typed ``text/plain`` or ``multipart/form-data``: 415. A web page can send those
  to any port without a CORS preflight, and no JSON client uses them. (The third "simple"
  type, ``application/x-www-form-urlencoded``, is what ``curl -d`` sends without ``-H``: it
  stays accepted, as in mlx_lm; a browser sending it carries an ``Origin``, refused above.)
- no or a wrong backend key (when the stack set one): 401;
- a body that is not a JSON object, a ``model`` other than the tier's, any ``adapters`` or
  ``draft_model``: 400.

Every refusal has OpenAI's error shape, so SDKs and LiteLLM show its message.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..backendkey import bearer_matches
from ..loopback import is_loopback_host_header

#: The name mlx_lm.server maps to the model given on its command line.
DEFAULT_MODEL = "default_model"
#: Request fields that make mlx_lm.server load other weights than the tier's.
LOADING_FIELDS = ("adapters", "draft_model")
#: The OpenAI paths mlx_lm serves, by the body they take.
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
COMPLETION_PATHS = frozenset({"/v1/completions", "/completions"})
#: Content types a web page may POST cross-site with no preflight and no JSON client sends.
BROWSER_ONLY_TYPES = ("text/plain", "multipart/form-data")


@dataclass(frozen=True)
class Refusal:
    """An HTTP error in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    status: int
    message: str
    code: str
    param: str | None = None
    type: str = "invalid_request_error"

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param,
                 "code": self.code}  # fmt: skip
        return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class ServedModel:
    """The names a request may give as ``model``: each means the tier's own weights."""

    names: frozenset[str]
    canonical: str

    @classmethod
    def of(cls, model_arg: str | None, resolved: str | None = None) -> ServedModel:
        """From ``--model`` as given (and its resolved path, the id /v1/models reports)."""
        names = {DEFAULT_MODEL}
        if model_arg:
            names.add(model_arg)
        if resolved:
            names.add(resolved)
        return cls(frozenset(names), model_arg or DEFAULT_MODEL)


def header_refusal(
    hosts: Collection[str],
    origins: Collection[str],
    sec_fetch_site: str | None,
    authorization: str | None,
    key: str | None,
    *,
    needs_key: bool = True,
) -> Refusal | None:
    """The refusal for a request's headers, or ``None``. ``needs_key``: False for /health."""
    if len(hosts) > 1 or (hosts and not is_loopback_host_header(next(iter(hosts)))):
        return Refusal(
            403,
            f"Host {', '.join(hosts)!r} is not served here: a chat tier only answers loopback "
            "names (localhost, 127.0.0.1, [::1]); a web page may be trying to reach it through "
            "DNS rebinding",
            "host_not_allowed",
            "host",
        )
    if origins or sec_fetch_site == "cross-site":
        return Refusal(
            403,
            "requests from web pages are refused by a chat tier (it sent an Origin header); "
            "call the proxy, which can allow origins with proxy.cors_origins",
            "origin_not_allowed",
            "origin",
        )
    if needs_key and key and not bearer_matches(authorization, key):
        return Refusal(
            401,
            "this backend only answers the stack: send the backend key as "
            "'Authorization: Bearer KEY' (print it with: mlx-stack key --backend), "
            "or call the proxy",
            "invalid_api_key",
            type="authentication_error",
        )
    return None


def content_type_refusal(content_type: str | None) -> Refusal | None:
    """A body type that a web page can send cross-site without asking first."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in BROWSER_ONLY_TYPES:
        return Refusal(
            415,
            f"Content-Type {media!r} is refused (a web page can send it to any port): send "
            "the JSON body as application/json",
            "unsupported_media_type",
            "content-type",
        )
    return None


def shape_refusal(path: str, body: dict[str, Any]) -> Refusal | None:
    """The parts of a chat or completions body that mlx_lm and LiteLLM do not refuse clearly.

    mlx_lm answers an empty ``messages`` with a 404 (which makes LiteLLM cool the tier down
    for every client); LiteLLM fails on ``"messages": "hi"`` as if the connection broke.
    """
    if path in CHAT_PATHS:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return Refusal(400, "'messages' must be a non-empty list of messages, e.g. "
                           '[{"role": "user", "content": "Hello"}]', "invalid_value",
                           "messages")  # fmt: skip
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                return Refusal(400, f"'messages[{index}]' must be an object with a 'role' "
                               "string (system, user, assistant or tool)", "invalid_value",
                               "messages")  # fmt: skip
    elif path in COMPLETION_PATHS:
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            return Refusal(400, "'prompt' must be a non-empty string", "invalid_value",
                           "prompt")  # fmt: skip
    return None


def body_refusal(raw: bytes, served: ServedModel, path: str = "") -> tuple[Refusal | None, bytes]:
    """The refusal for a POST body, or ``None`` and the body for mlx_lm (model made canonical).

    A body that is not JSON is refused here (mlx_lm would too, but a 4301-digit integer makes
    ``json.loads`` raise a plain ValueError that mlx_lm does not catch).
    """
    try:
        body: Any = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return Refusal(400, f"the body is not valid JSON: {exc}", "invalid_json"), raw
    if not isinstance(body, dict):
        return Refusal(400, "the body must be a JSON object", "invalid_json"), raw
    shape = shape_refusal(path, body)
    if shape is not None:
        return shape, raw
    for field in LOADING_FIELDS:
        if body.get(field) is not None:
            return Refusal(
                400,
                f"{field!r} is not accepted: a chat tier serves only its own model; set "
                "adapters and draft models in the stack file",
                "unsupported_parameter",
                field,
            ), raw
    model = body.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or model not in served.names:
        shown = model if isinstance(model, str) else json.dumps(model)
        return Refusal(
            400,
            f"model {shown[:200]!r} is not served here: this chat tier serves "
            f"{served.canonical!r} (also named {DEFAULT_MODEL!r}); call the proxy to choose "
            "between tiers",
            "model_not_found",
            "model",
        ), raw
    if model != DEFAULT_MODEL and model != served.canonical:
        body["model"] = served.canonical  # the resolved path: same weights, no reload
        return None, json.dumps(body).encode()
    return None, raw


def mlx_lm_refusal(status: int, raw: bytes, path: str) -> Refusal:
    """mlx_lm's own error answer, in OpenAI's shape.

    mlx_lm answers ``{"error": "text"}``, which LiteLLM cannot read (its clients get "Error
    code: 400" and no reason), and a 404 when generation fails to start for a request's
    content; a 404 from a backend makes LiteLLM cool the tier down, so that one is a 400.
    """
    try:
        message = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError, RecursionError):
        message = raw.decode("utf-8", "replace").strip()
    if not isinstance(message, str) or not message:
        message = f"the chat tier refused the request ({status})"
    if status == 404 and (path in CHAT_PATHS or path in COMPLETION_PATHS):
        status = 400
    return Refusal(status, message, "invalid_value" if status == 400 else str(status),
                   type="invalid_request_error" if status < 500 else "server_error")
