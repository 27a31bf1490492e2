"""The supervisor's prober of remote stacks: reachable, authorised, identity, latency.

Every ``INTERVAL_S`` it asks each remote proxy's identity route (``litellm/identity.py``) with
that remote's key, and this stack's own vector servers for their model cards; the verdicts
(``config/remotes.judge``) decide which remote vector models the proxy loads. The check runs
here, not only at `up`: a remote may be down at `up` and come up later (its model then joins),
or come back with another model (it is then refused). When the accepted set changes, the loop
writes ``run/remotes.json`` (read by the proxy's launcher) and restarts the proxy.

A remote that stops answering keeps its last identities: its deployments stay in the proxy,
where LiteLLM's health checks and cooldowns route around it, so a dead host restarts nothing
here. Network work runs on an executor; the loop only collects finished futures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from mlx_stack.config.plan import Plan, Probe, RemoteTarget, ServiceKind
from mlx_stack.config.remotes import (
    EMBEDDINGS_NAME,
    IDENTITY_PATH,
    RERANK_NAME,
    Judgement,
    Verdict,
    accepted_names,
    identity_of,
    judge,
    merge_identities,
)
from mlx_stack.contract.snapshot import RemoteModelStatus, RemoteStatus
from mlx_stack.supervisor.probes import new_client

INTERVAL_S = 5.0
TIMEOUT_S = 5.0
#: The proxy's first start waits this long at most for a first verdict on every remote.
SETTLE_S = 15.0


@dataclass(frozen=True)
class RemoteCheck:
    """One remote, one call: what came back."""

    reachable: bool
    authorised: bool | None = None
    latency_ms: float | None = None
    #: Its models by name at the remote (identity fields for vector models), when read.
    identities: dict[str, dict[str, Any]] | None = None
    problem: str = ""


def check_remote(target: RemoteTarget, timeout_s: float = TIMEOUT_S) -> RemoteCheck:
    """Ask a remote proxy's identity route with its key; never raises for the network."""
    url = target.remote.url + IDENTITY_PATH
    start = time.monotonic()
    try:
        with new_client(url, timeout_s) as client:
            r = client.get(url, headers={"Authorization": f"Bearer {target.key}"})
    except httpx.HTTPError as exc:
        return RemoteCheck(False, problem=f"not reachable ({type(exc).__name__})")
    ms = (time.monotonic() - start) * 1000
    if r.status_code in (401, 403):
        return RemoteCheck(True, False, ms, problem="unauthorised: the key in key_file is not "
                           "the remote's proxy key (run `mlx-stack key` over there)")
    if r.status_code != 200:
        return RemoteCheck(True, None, ms, problem=f"HTTP {r.status_code} from {IDENTITY_PATH}:"
                           " not an mlx-stack proxy, or one too old to report identities")
    try:
        models = r.json()["models"]
        ids = {str(n): dict(v) for n, v in models.items() if isinstance(v, dict)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return RemoteCheck(True, True, ms, problem="its identity answer is not readable")
    return RemoteCheck(True, True, ms, ids)


def check_local(probe: Probe, timeout_s: float = TIMEOUT_S) -> dict[str, Any] | None:
    """This stack's vector server's identity from its model card (None: not known yet)."""
    try:
        with new_client(probe.url, timeout_s) as client:
            r = client.get(f"{probe.url}/v1/models",
                           headers={"Authorization": f"Bearer {probe.key}"} if probe.key else {})
        card = r.json()["data"][0] if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(card, dict) or card.get("content_sha256") is None:
        return None
    return identity_of(card)


_VECTOR_NAMES = {ServiceKind.EMBEDDINGS: EMBEDDINGS_NAME, ServiceKind.RERANK: RERANK_NAME}


class RemoteProber:
    """Owned by the supervisor's loop (one thread); ``step`` each tick."""

    def __init__(self, executor: Executor | None = None,
                 check: Callable[[RemoteTarget], RemoteCheck] = check_remote,
                 local: Callable[[Probe], dict[str, Any] | None] = check_local,
                 interval_s: float = INTERVAL_S) -> None:
        self.executor = executor or ThreadPoolExecutor(max_workers=4,
                                                       thread_name_prefix="remotes")
        self.check = check
        self.local_check = local
        self.interval_s = interval_s
        self.targets: tuple[RemoteTarget, ...] = ()
        self.local_probes: dict[str, Probe] = {}
        self.local: dict[str, dict[str, Any] | None] = {}
        self.seen: dict[str, dict[str, dict[str, Any]] | None] = {}
        self.last: dict[str, tuple[RemoteCheck, float]] = {}
        self.judgements: dict[tuple[str, str], Judgement] = {}
        self.accepted: frozenset[str] = frozenset()
        self._round: list[tuple[str, Future[Any]]] = []
        self._next_at = 0.0
        self._since = 0.0
        self.rounds = 0

    def configure(self, plan: Plan, now: float) -> None:
        """Take the remotes and local vector servers of a (re)loaded plan; check at once."""
        names = {t.remote.name for t in plan.remotes}
        self.targets = plan.remotes
        self.local_probes = {_VECTOR_NAMES[s.kind]: s.probe for s in plan.model_servers
                             if s.kind in _VECTOR_NAMES}
        self.local = {n: self.local.get(n) for n in self.local_probes}
        self.seen = {n: v for n, v in self.seen.items() if n in names}
        self.last = {n: v for n, v in self.last.items() if n in names}
        self.judgements = judge(tuple(t.remote for t in self.targets), self.local, self.seen)
        # A model no longer named leaves at once (the loop writes the file before the proxy,
        # restarted for its new config, reads it).
        self.accepted = accepted_names(self.judgements) & self._needing_identity()
        self._next_at = now
        if not self._since:
            self._since = now

    def settled(self, now: float) -> bool:
        """Whether the proxy may start: no remotes; or a round done with every local vector
        identity known; or ``SETTLE_S`` gone (a remote down at `up` joins later)."""
        return (not self.targets or now - self._since >= SETTLE_S
                or (self.rounds > 0 and all(v is not None for v in self.local.values())))

    def step(self, now: float, wall: float) -> bool:
        """Start or collect a round; True when the accepted set changed."""
        if not self.targets:
            return False
        if self._round:
            if not all(f.done() for _, f in self._round):
                return False
            self._collect(wall)
            self.rounds += 1
            before = self.accepted
            self.judgements = judge(tuple(t.remote for t in self.targets), self.local,
                                    self.seen)
            self.accepted = accepted_names(self.judgements) & self._needing_identity()
            return self.accepted != before
        if now >= self._next_at:
            self._next_at = now + self.interval_s
            self._round = [(f"remote:{t.remote.name}", self.executor.submit(self.check, t))
                           for t in self.targets]
            self._round += [(f"local:{n}", self.executor.submit(self.local_check, p))
                            for n, p in self.local_probes.items()]
        return False

    def _needing_identity(self) -> frozenset[str]:
        return frozenset(f"{t.remote.name}/{m.name}" for t in self.targets
                         for m in t.remote.models if m.needs_identity)

    def _collect(self, wall: float) -> None:
        for tag, fut in self._round:
            kind, name = tag.split(":", 1)
            try:
                result = fut.result()
            except Exception as exc:  # a bug in a check: shown, never raised into the loop
                result = RemoteCheck(False, problem=f"check failed: {exc!r}") \
                    if kind == "remote" else None
            if kind == "local":
                if result is not None:
                    self.local[name] = result
                continue
            self.last[name] = (result, wall)
            if result.identities is not None:
                self.seen[name] = merge_identities(self.seen.get(name), result.identities)
            else:
                self.seen.setdefault(name, None)
        self._round = []

    def statuses(self) -> tuple[RemoteStatus, ...]:
        out = []
        for t in self.targets:
            r = t.remote
            check, at = self.last.get(r.name, (None, None))
            models = tuple(
                RemoteModelStatus(m.name, m.joined, j.verdict.value, j.reason)
                for m in r.models
                for j in [self.judgements.get((r.name, m.name), Judgement(Verdict.PENDING))])
            if check is None:
                out.append(RemoteStatus(r.name, r.url, models=models))
            else:
                out.append(RemoteStatus(r.name, r.url, at, check.reachable, check.authorised,
                                        check.latency_ms, check.problem, models))
        return tuple(out)

    def file_text(self) -> str:
        """``run/remotes.json``: what the proxy's launcher keeps (``litellm/remotes.py``)."""
        return json.dumps({"accepted": sorted(self.accepted)}, indent=2) + "\n"
