"""Remote stacks: other machines' mlx-stack proxies whose models join this proxy.

The stack file's ``remotes:`` section names each remote proxy (``url``, ``key_file``) and which
of its models to use; a model joins this proxy under its own name or ``as:`` another. A chat
model becomes one more deployment of the local tier of that name (LiteLLM's router balances
between them and fails over) or a new name.

An embeddings (or rerank) model is different: vectors from another model live in another
space, and a store that mixes them is silently corrupted. So a remote ``local-embed`` joins
only when its identity (weights hash, pooling, normalisation, prefixes, dimensions, read from
the remote proxy's identity route, ``litellm/identity.py``) equals the reference: the local
tier's, or with no local tier the first remote's (file order) whose identity is known. Until
it is known the model is ``pending`` and left out of the proxy; a difference makes it
``refused``, with what differs. Pure functions here; the supervisor's prober
(``supervisor/remotes.py``) feeds them what it reads over the network.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlx_stack.config.proxykey import KeyFileError, read_key_file
from mlx_stack.config.schema import Field, Problems, describe, read_mapping
from mlx_stack.errors import StateError
from mlx_stack.loopback import is_loopback

#: Names whose models produce vectors or scores: they join only with an equal identity.
EMBEDDINGS_NAME = "local-embed"
RERANK_NAME = "local-rerank"
IDENTITY_NAMES = (EMBEDDINGS_NAME, RERANK_NAME)
#: The route on a proxy that lists its local tiers' identities (keyed).
IDENTITY_PATH = "/mlx-stack/v1/identity"
#: What must be equal for two servers' vectors to live in one space (model card fields).
IDENTITY_FIELDS = ("task", "content_sha256", "pooling", "normalize", "query_prefix",
                   "document_prefix", "dimensions", "matryoshka_dimensions")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

REMOTE_FIELDS = [
    Field("url", (str,), "the remote mlx-stack proxy, http(s)://HOST:PORT (its proxy.host and "
          "proxy.port)"),
    Field("key_file", (str,), "file holding the remote proxy's key (its `mlx-stack key`), mode "
          "0600, relative to the state folder"),
    Field("models", (list,), "which of its models to use: a name (`standard`, `local-embed`) or "
          "{name: N, as: LOCAL_NAME}"),
]
MODEL_FIELDS = [
    Field("name", (str,), "the model's name at the remote proxy"),
    Field("as", (str, type(None)), "the name it joins under here; default: the same name", None),
]


@dataclass(frozen=True)
class RemoteModel:
    """One model of a remote proxy, and the name it joins under at this proxy."""

    name: str
    joined: str

    @property
    def needs_identity(self) -> bool:
        """A vector or score model joining the name of one: its identity must match."""
        return self.name in IDENTITY_NAMES and self.joined in IDENTITY_NAMES

    @property
    def mode(self) -> str:
        """LiteLLM's ``model_info.mode`` for it."""
        return {EMBEDDINGS_NAME: "embedding", RERANK_NAME: "rerank"}.get(self.name, "chat")


@dataclass(frozen=True)
class Remote:
    """A remote mlx-stack proxy (the stack file's ``remotes.NAME``)."""

    name: str
    url: str  # no trailing slash
    key_file: str
    models: tuple[RemoteModel, ...]
    #: Its position in the file: the key's environment variable, the reference order.
    index: int = 0

    @property
    def key_env(self) -> str:
        """The proxy's environment variable that holds this remote's key (never the config)."""
        return f"MLX_STACK_REMOTE_KEY_{self.index}"


class Verdict(str, enum.Enum):
    ACCEPTED = "accepted"  # in the proxy's config
    PENDING = "pending"  # identity not known yet: left out until it is
    REFUSED = "refused"  # identity differs: left out, with the reason


def read_remotes(raw: Any, problems: Problems,
                 local_kinds: Mapping[str, str]) -> tuple[Remote, ...]:
    """Check the ``remotes:`` section; ``local_kinds``: the local proxy's names -> mode."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        problems.add("remotes", f"expected a mapping of remote names, got {describe(raw)}")
        return ()
    out: list[Remote] = []
    for index, (name, body) in enumerate(raw.items()):
        path = f"remotes.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            problems.add(path, f"remote name {name!r} must be lower case letters, digits, - or _")
            continue
        d = read_mapping(body, path, REMOTE_FIELDS, problems)
        if d is None:
            continue
        url = _check_url(d["url"], f"{path}.url", problems)
        key_problem = key_file_problem(d["key_file"])
        if key_problem:
            problems.add(f"{path}.key_file", key_problem)
        models = _read_models(d["models"], path, problems, local_kinds)
        if url is not None and not key_problem and models is not None:
            out.append(Remote(name, url, d["key_file"], models, index))
    return tuple(out)


def self_reference_problem(remote: Remote, proxy_host: str, proxy_port: int) -> str | None:
    """A remote that is this stack's own proxy would send requests to itself, round and round."""
    parts = urlsplit(remote.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = (parts.hostname or "").lower()
    mine = proxy_host.strip("[]").lower()
    same_host = (host == mine
                 or (mine in ("0.0.0.0", "::") and is_loopback(host))  # bound everywhere
                 or (host == "localhost" and mine in ("127.0.0.1", "::1")))
    if port == proxy_port and same_host:
        return (f"{remote.url} is this stack's own proxy: its requests would come back here "
                "for ever; name another machine's proxy")
    return None


def key_file_problem(name: str) -> str | None:
    if not name.strip() or "\0" in name:
        return f"{name!r} is not a file name; e.g. remotes/studio.key"
    try:
        Path(name).expanduser()
    except RuntimeError:
        return f"{name!r}: no such user's home folder on this machine"
    return None


def _check_url(raw: str, path: str, problems: Problems) -> str | None:
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError as exc:
        problems.add(path, f"{raw!r} is not a URL ({exc}); e.g. http://192.168.1.20:4000")
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.add(path, f"{raw!r}: use http://HOST:PORT or https://HOST:PORT, e.g. "
                     "http://192.168.1.20:4000")
        return None
    if parts.path not in ("", "/", "/v1", "/v1/") or parts.query or parts.fragment:
        problems.add(path, f"{raw!r}: give the proxy's root (scheme, host and port only)")
        return None
    if parts.username or parts.password:
        problems.add(path, f"{parts.scheme}://{parts.hostname}: no credentials in the URL; "
                     "the key goes in key_file")
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def _read_models(raw: list, path: str, problems: Problems,
                 local_kinds: Mapping[str, str]) -> tuple[RemoteModel, ...] | None:
    if not raw:
        problems.add(f"{path}.models", "name at least one model, e.g. [standard, local-embed]")
        return None
    out: list[RemoteModel] = []
    ok = True
    for i, entry in enumerate(raw):
        where = f"{path}.models[{i}]"
        if isinstance(entry, str):
            d: dict[str, Any] | None = {"name": entry, "as": None}
        else:
            d = read_mapping(entry, where, MODEL_FIELDS, problems)
        if d is None:
            ok = False
            continue
        name, joined = d["name"], d["as"] if d["as"] is not None else d["name"]
        bad = next((n for n in (name, joined) if not _MODEL_NAME.match(n)), None)
        if bad is not None:
            problems.add(where, f"{bad!r} is not a model name (letters, digits, . _ -)")
            ok = False
            continue
        model = RemoteModel(name, joined)
        problem = _join_problem(model, local_kinds)
        if problem:
            problems.add(where, problem)
            ok = False
            continue
        if any(m.joined == joined for m in out):
            problems.add(where, f"{joined!r} is named twice for this remote")
            ok = False
            continue
        out.append(model)
    return tuple(out) if ok else None


def _join_problem(model: RemoteModel, local_kinds: Mapping[str, str]) -> str | None:
    """Why ``model`` cannot join under its name here (None if it can)."""
    if model.name in IDENTITY_NAMES and model.joined in IDENTITY_NAMES \
            and model.name != model.joined:
        return (f"{model.name!r} cannot join as {model.joined!r}: only the same kind of model "
                "(local-embed as local-embed, local-rerank as local-rerank) may share a name")
    if model.name not in IDENTITY_NAMES and model.joined in IDENTITY_NAMES:
        return (f"chat model {model.name!r} cannot join as {model.joined!r}: that name is for "
                f"{'vectors' if model.joined == EMBEDDINGS_NAME else 'rerank scores'}")
    kind = local_kinds.get(model.joined)
    if kind is not None and kind != model.mode:
        return (f"{model.name!r} ({model.mode}) cannot join the local {kind} model "
                f"{model.joined!r}; give it another name with `as:`")
    return None


def read_remote_key(path: Path, remote: str) -> str:
    """A remote's key from its 0600 file (a file readable by others is repaired first)."""
    try:
        key = read_key_file(path)
    except KeyFileError as exc:
        if exc.missing:
            raise StateError(
                f"remote {remote!r}: no key file at {path}; copy the remote's `mlx-stack key` "
                f"into it (mode 0600)") from None
        raise StateError(f"remote {remote!r}: cannot read its key file {path}: "
                         f"{exc.reason}") from None
    if not key or any(c.isspace() for c in key) or not key.isprintable():
        raise StateError(f"remote {remote!r}: the key in {path} is empty or not one line; put "
                         "the remote's `mlx-stack key` output in it")
    return key


# ----- identity ---------------------------------------------------------------------------


def identity_of(card: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a model card that decide its vector space."""
    return {f: card.get(f) for f in IDENTITY_FIELDS}


def identity_differences(reference: Mapping[str, Any], other: Mapping[str, Any],
                         ref_label: str = "local", other_label: str = "remote") -> list[str]:
    """What differs between two identities, one phrase per field ([] if they are equal)."""
    out = []
    for f in IDENTITY_FIELDS:
        a, b = reference.get(f), other.get(f)
        if a != b:
            out.append(f"{f}: {ref_label} {a!r}, {other_label} {b!r}")
    if reference.get("content_sha256") is None or other.get("content_sha256") is None:
        out.append("content_sha256: unknown (a server that reports no weights hash is never "
                   "mixed with another)")
    return out


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str = ""


def judge(remotes: tuple[Remote, ...], local: Mapping[str, Mapping[str, Any] | None],
          seen: Mapping[str, Mapping[str, Mapping[str, Any]] | None],
          ) -> dict[tuple[str, str], Judgement]:
    """Each remote model's verdict (pure, table-tested).

    ``local``: this stack's vector names -> identity (None while its server has not reported
    one). ``seen``: each remote's last identities by its model names (None: never read).
    Chat models need no identity: always accepted. A vector model is compared with the local
    tier of its joined name if there is one, else with the first remote (file order) offering
    that name whose identity is known; a remote that does not list the model is refused.
    """
    out: dict[tuple[str, str], Judgement] = {}
    reference: dict[str, tuple[str, Mapping[str, Any]] | None] = {
        n: (("local", ident) if ident is not None else None) for n, ident in local.items()}
    for r in sorted(remotes, key=lambda r: r.index):
        ids = seen.get(r.name)
        for m in r.models:
            key = (r.name, m.name)
            if not m.needs_identity:
                out[key] = Judgement(Verdict.ACCEPTED)
                continue
            mine = None if ids is None else ids.get(m.name)
            if ids is not None and mine is None:
                out[key] = Judgement(Verdict.REFUSED, f"the remote serves no {m.name!r} (it "
                                     f"lists {', '.join(sorted(ids)) or 'nothing'})")
                continue
            if mine is not None and mine.get("external"):
                out[key] = Judgement(Verdict.REFUSED, f"the remote's {m.name!r} is an external "
                                     "server (e.g. Ollama) that reports no weights hash: its "
                                     "vector space cannot be checked, so it is never mixed "
                                     "with another")
                continue
            if mine is None or mine.get("content_sha256") is None:
                out[key] = Judgement(Verdict.PENDING, "its identity is not known yet (remote "
                                     "not reached, not authorised, or its server loading); "
                                     "left out until it is")
                continue
            if m.joined in reference and reference[m.joined] is None:
                out[key] = Judgement(Verdict.PENDING, f"the local {m.joined!r} has not "
                                     "reported its identity yet; left out until it does")
                continue
            ref = reference.get(m.joined)
            if ref is None:
                reference[m.joined] = (f"remote {r.name!r}", mine)
                out[key] = Judgement(Verdict.ACCEPTED)
                continue
            diffs = identity_differences(ref[1], mine, ref[0], f"remote {r.name!r}")
            out[key] = (Judgement(Verdict.ACCEPTED) if not diffs else Judgement(
                Verdict.REFUSED, f"not the vector space of {ref[0]} {m.joined!r} (mixing "
                "them would corrupt stored vectors): " + "; ".join(diffs)))
    return out


def merge_identities(old: Mapping[str, Mapping[str, Any]] | None,
                     new: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """A remote's identities after a read: an entry without a weights hash (its server is
    down or loading) keeps the last one known, so a restart over there changes no verdict;
    an external server (which never has one) replaces it."""
    out = dict(new)
    for name, entry in new.items():
        if (entry.get("content_sha256") is None and not entry.get("external") and old
                and name in old):
            out[name] = old[name]
    return out


def accepted_names(judgements: Mapping[tuple[str, str], Judgement]) -> frozenset[str]:
    """``remote/model`` of every accepted vector model (the file the proxy's launcher reads)."""
    return frozenset(f"{r}/{m}" for (r, m), j in judgements.items()
                     if j.verdict is Verdict.ACCEPTED)
