"""`status` rows for ``url:`` tiers: servers the stack routes to but does not run.

No supervisor watches them (there is no process to restart), so `status` asks each one itself,
at the moment it is run, with the same real request the supervisor sends its own tiers (a
one-token chat completion or a one-text embedding, with the tier's key): ``reachable`` (it
answered correctly, with the latency), ``failing`` (it answered, wrongly: a refused key, an
unknown model) or ``unreachable`` (no answer). The probes run in parallel, each bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from mlx_stack.config.plan import Endpoint
from mlx_stack.supervisor.probes import run_probe

PROBE_TIMEOUT_S = 3.0
REACHABLE = "reachable"
FAILING = "failing"
UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class EndpointSeen:
    """What one probe of a ``url:`` tier found."""

    name: str
    kind: str
    model: str
    url: str
    port: int
    state: str
    latency_ms: float | None
    #: What was wrong (empty when reachable): the probe's own words.
    problem: str

    @property
    def detail(self) -> str:
        where = f"{self.url} (url: tier, not run by the stack)"
        return f"{where}: {self.problem}" if self.problem else where


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def _look(e: Endpoint, timeout_s: float) -> EndpointSeen:
    res = run_probe(e.probe, timeout_s)
    state = REACHABLE if res.ok else FAILING if res.answered else UNREACHABLE
    return EndpointSeen(e.name, e.kind.value, e.probe.model, e.probe.url, _port(e.probe.url),
                        state, res.latency_ms if res.answered else None,
                        "" if res.ok else res.detail)


def probe_endpoints(endpoints: Sequence[Endpoint],
                    timeout_s: float = PROBE_TIMEOUT_S) -> list[EndpointSeen]:
    """Probe every ``url:`` tier at once; never raises for a network failure."""
    if not endpoints:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(endpoints))) as pool:
        return list(pool.map(lambda e: _look(e, timeout_s), endpoints))


def unreachable_warnings(endpoints: Sequence[Endpoint]) -> list[str]:
    """What `up` says of ``url:`` tiers that do not answer: the stack is up without them (the
    proxy still routes to them; a chat tier's requests fall back to the others)."""
    return [f"{e.name} ({e.url}, a url: tier) is {e.state} ({e.problem}); the "
            "proxy routes to it anyway (chat requests fall back to the other tiers)"
            for e in probe_endpoints(endpoints) if e.state != REACHABLE]
